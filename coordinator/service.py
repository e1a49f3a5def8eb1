"""The coordinator's round orchestration: turns the round engine's decisions into registry writes,
assignments (a strategy's FitIns) sent to connected devices, recorded updates and new global versions.

A :class:`Coordinator` is assembled from its parts (registry, global model and its tensor store, a bound
strategy, bundle store, round engine, evaluator); :meth:`Coordinator.from_config` builds them from a
``CoordinatorConfig``. :meth:`Coordinator.step` runs one tick of the round loop, :meth:`Coordinator.run_rounds`
runs them until stopped. Networking stays in ``coordinator.server``: a :class:`Session` carries only an async
``send``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.config import MIB, CoordinatorConfig, make_strategy
from coordinator.evaluation import Evaluator, background_executor
from coordinator.federation import (
    FED_EVAL,
    GlobalModel,
    aggregate_round,
    aggregate_secure_round,
    fit_context,
    privacy_budget,
    tensor_store,
)
from coordinator.planning import BundleStore, check_evaluation, check_update, slice_assignment, update_meta
from coordinator.presence import Presence
from coordinator.registry import Registry
from coordinator.rounds import (
    Action,
    Aggregate,
    Finished,
    RetryRound,
    RoundEngine,
    RunningRound,
    StartRound,
    Wait,
)
from coordinator.secagg import SecureMember, SecureRound, SecureSettings, masked_blob
from coordinator.split_rounds import SplitMember, SplitRounds
from coordinator.strategy import ClientInfo, FitIns, Strategy
from coordinator.strategy.selection import estimated_work
from coordinator.zo_updates import expand_zo_update
from device_runtime.bundle import Manifest
from device_runtime.errors import FedmoeError, ProtocolError, UpdateRejected
from device_runtime.secagg import slots_of
from device_runtime.shape_key import ShapeKey
from device_runtime.signing import Signer
from device_runtime.stats import RoutingStats
from device_runtime.timing import log_timing, timed
from device_runtime.wire import (
    Ack,
    Assignment,
    Error,
    FitConfig,
    Message,
    SecAggKeys,
    SecAggMasked,
    SecAggReveal,
    SecAggShares,
    SmashedData,
    SplitScalars,
    Update,
)
from device_runtime.wire.fields import to_json

log = logging.getLogger("fedmoe.coord")
_POLL_S = 0.5


def _signer(cfg: CoordinatorConfig) -> Signer | None:
    """The CA key's signer (``device_runtime.signing``), or None with a warning: devices that pinned a key
    at enrollment refuse what is unsigned. Raises ConfigError (unreadable key)."""
    if cfg.tls_ca_key:
        return Signer.load(cfg.tls_ca_key)
    log.warning(
        "no CA key (tls_ca_key) in the config: bundles and assignments go out UNSIGNED, and devices "
        "that pinned a coordinator key at enrollment refuse them; `fedmoe-coord init` makes the CA"
    )
    return None


@dataclass
class Session:
    """An authenticated device connection: ``send`` a message to it; ``revoked()`` ends it (the registry says the
    device was revoked: returns at once, the connection closes in the background; again is harmless)."""

    device_id: str
    profile: dict
    send: Callable[[Message], Awaitable[None]]
    revoked: Callable[[], None]


@dataclass
class Pending:
    """An assignment of the current (or just closed) round, rebuildable after a restart."""

    device_id: str
    round_id: int
    update_id: str
    manifest: Manifest
    fit: FitIns

    def message(self, model: GlobalModel) -> Assignment:
        return Assignment(
            round_id=self.round_id,
            update_id=self.update_id,
            model_version=model.version,
            shape_key=self.manifest.shape_key,
            expert_ids=self.fit.expert_ids,
            config=self.fit.config,
            tensors=slice_assignment(model.params, self.manifest, self.fit.expert_ids),
        )


ORDER_WAIT_S = 10.0  # the longest one assignment's send holds back the next of the round (_deliver_longest_first)


class Coordinator:
    """Registry, global model, strategy, bundle store, round engine, evaluator and the authenticated sessions.

    Args:
        cfg: the settings used here (``update_norm_bound``, ``keep_update_tensors``, ``max_message_bytes``).
        registry: the SQL registry. model: the global model over its tensor store. strategy: bound to the
        federation (``Strategy.bind``). bundles: the bundle store. engine: a fresh round engine (the registry's
        rounds are resumed into it here). evaluator: scores each new version, or None. clock: seconds, monotonic.
        signer: signs assignments (and, in ``bundles``, manifests) with the CA key, or None (unsigned).
    Raises:
        ConfigError: a running round's bundle is missing from the cache.
    """

    def __init__(
        self,
        cfg: CoordinatorConfig,
        *,
        registry: Registry,
        model: GlobalModel,
        strategy: Strategy,
        bundles: BundleStore,
        engine: RoundEngine,
        evaluator: Evaluator | None = None,
        clock: Callable[[], float] = time.monotonic,
        signer: Signer | None = None,
    ):
        self.cfg, self.clock, self.signer = cfg, clock, signer
        self.registry, self.model, self.strategy, self.bundles, self.engine = registry, model, strategy, bundles, engine
        self.evaluator = evaluator
        self.sessions: dict[str, Session] = {}
        self.presence = Presence(registry, self.sessions)  # last_seen and revocations, batched
        self.pending: dict[str, Pending] = {}
        self.reported: dict[str, RoutingStats] = {}
        self._stop_logged: str | None = None  # the RoundEngine.stopped reason last logged
        self.wake = asyncio.Event()
        self._evaluations: set[asyncio.Task] = set()
        self._evaluating = asyncio.Lock()  # one evaluation at a time: they share the evaluator's model
        self._evaluation_pool = background_executor() if self.evaluator is not None else None
        self.split = SplitRounds(cfg.checkpoint, trainable_mode=cfg.trainable_mode, lora_rank=cfg.lora_rank)
        self._split_tasks: set[asyncio.Task] = set()
        weighting = strategy.secure_weighting
        self.secure_settings = (
            SecureSettings.from_config(cfg.privacy, cfg.fit, weighting, strategy.secure_importance())
            if cfg.privacy.secure_aggregation and weighting is not None
            else None
        )
        self.secure: SecureRound | None = None  # the secure round in progress (coordinator.secagg)
        self._revealed = asyncio.Event()  # set by each reveal of the secure round being unmasked
        self._round_cpu = 0.0  # time.process_time() when the current round started
        self._resume()

    @classmethod
    def from_config(cls, cfg: CoordinatorConfig, *, clock: Callable[[], float] = time.monotonic) -> Coordinator:
        """Build every part from ``cfg`` and resume the registry's rounds.

        Raises:
            ConfigError: the state directory is not initialised (run ``fedmoe-coord init``) or the config is bad.
            ModelError: the checkpoint cannot be read. DataError: ``eval_data`` is unreadable.
        """
        signer = _signer(cfg)
        registry = Registry(cfg.registry_url)
        try:
            model = GlobalModel(registry, tensor_store(cfg))
            strategy = make_strategy(cfg).bind(fit_context(cfg))
            model.restore(strategy)
            bundles = BundleStore(Path(cfg.state_dir) / "bundles", cfg.checkpoint, cfg.fit, signer)
            policy = cfg.rounds
            return cls(
                cfg,
                registry=registry,
                model=model,
                strategy=strategy,
                bundles=bundles,
                engine=RoundEngine(policy, seed=cfg.seed, budget=privacy_budget(strategy, model)),
                evaluator=Evaluator.from_config(cfg),
                clock=clock,
                signer=signer,
            )
        except BaseException:
            registry.close()
            raise

    def close(self) -> None:
        if self._evaluation_pool is not None:
            self._evaluation_pool.shutdown(wait=False, cancel_futures=True)
        self.registry.close()

    # ------------------------------------------------------------ sessions

    async def attach(self, session: Session) -> None:
        """A device authenticated: make it available (to the engine's participation rules) and re-send its
        pending assignment, if any."""
        self.sessions[session.device_id] = session
        self.engine.device_back(session.device_id, session.profile)
        pending = self._pending_of(session.device_id)
        if self.secure is not None:  # its secure-aggregation messages so far, each idempotent on the device
            for msg in self.secure.sent.get(session.device_id, []):
                await self._send(session, msg)
        if pending is not None:
            await self._send(session, pending.message(self.model))
        self.wake.set()

    def detach(self, session: Session) -> None:
        if self.sessions.get(session.device_id) is session:
            del self.sessions[session.device_id]
            self._lost(session.device_id)

    def count_bytes(self, device_id: str, direction: str, size: int) -> None:
        """Record ``size`` bytes moved to (``bytes_down``) or from (``bytes_up``) a device in the current round."""
        current = self.engine.current
        self.registry.log_metrics(
            {direction: size}, round_id=None if current is None else current.round_id, device_id=device_id
        )

    def _lost(self, device_id: str) -> None:
        """``device_id``'s connection closed or a send to it failed: tell the engine (holding an assignment
        counts as a failure) and log an exclusion; its split steps go on without it until it is back."""
        pending = self._pending_of(device_id)
        if pending is not None:
            self._split_left(pending.update_id)
        self._log_exclusion(device_id, self.engine.device_lost(device_id, self.clock()), "it disconnected")
        self.wake.set()

    def _log_exclusion(self, device_id: str, until: float | None, why: str) -> None:
        """Log that ``device_id`` is excluded until ``until`` (None: it is not) after a failure (``why``)."""
        if until is not None:
            log.warning(
                "device %s failed %d assignments in a row (last: %s); not selected for %.0f s",
                device_id,
                self.engine.participation.failures(device_id),
                why,
                until - self.clock(),
            )

    def _available(self) -> list[str]:
        """Connected, non-revoked devices; [] while a round runs or once rounds stopped (the engine does not
        select then; its participation rules filter these)."""
        if not self.engine.selecting:
            return []
        # Sessions belong to logged-in, hence enrolled, devices: only revocations since their login matter, and
        # the presence sweep asks for those every SWEEP_S (it ends their sessions, too).
        revoked = self.presence.revoked
        return [d for d in self.sessions if d not in revoked]

    async def _send(self, session: Session, msg: Message) -> bool:
        try:
            await session.send(msg)
            return True
        except Exception as exc:  # connection closed or broken: the device is lost, the round goes on
            log.warning("sending %s to %s failed: %s", msg.TYPE, session.device_id, exc)
            return False

    # ------------------------------------------------------------ the round loop

    async def run_rounds(self, stop: asyncio.Event) -> None:
        """Run :meth:`step` until ``stop`` is set, idling while the engine waits. Never raises (but
        CancelledError): a step that fails is logged and its round abandoned (:meth:`_abandon`). Once rounds
        stop (``Finished``) that is logged once and devices are still served."""
        while not stop.is_set():
            try:
                action = await self.step()
            except Exception:  # noqa: BLE001 - a bug or a registry error must not end the federation
                log.exception("a round step failed; abandoning the round")
                self._abandon()
                await self._idle(_POLL_S)
                continue
            if isinstance(action, (Wait, Finished)):
                until = action.until if isinstance(action, Wait) else None
                await self._idle(_POLL_S if until is None else min(_POLL_S, max(0.0, until - self.clock())))

    async def step(self) -> Action:
        """One tick of the round loop: ask the engine what to do now and do it (start a round: the strategy's
        ``configure_fit``, bundles, assignments; aggregate a round: the strategy's ``aggregate_fit`` and a new
        model version; mark a round failed). Returns the engine's action; ``Wait`` and ``Finished`` do nothing.

        Raises:
            Exception: a registry, storage or strategy error; the round stays busy in the engine (``run_rounds``
            abandons it).
        """
        if self.secure is not None and self.secure.phase in ("keys", "shares"):
            await self._advance_secure()
        action = self.engine.step(self.clock(), self._available())
        if isinstance(action, StartRound):
            await self._start_round(action.devices)
        elif isinstance(action, Aggregate):
            await self._aggregate(action)
        elif isinstance(action, RetryRound):
            log.warning("round %d failed: %s", action.round_id, action.reason)
            self.secure = None
            self.registry.finish_round(action.round_id, metrics={"reason": action.reason}, status="failed")
            self._closed_failed(action.reason)
        elif isinstance(action, Finished):
            self._rounds_stopped(action.reason)
        return action

    def _rounds_stopped(self, reason: str) -> None:
        """Log once that no more rounds start (``num_rounds`` are done, or the privacy budget is spent)."""
        if reason != self._stop_logged:
            self._stop_logged = reason
            log.info("rounds stopped: %s; still serving devices", reason)

    def _closed_failed(self, reason: str) -> None:
        """Close the engine's round as failed; from ``[rounds] max_attempts`` consecutive failures on, alert."""
        self.engine.closed(failed=True)
        if self.engine.backing_off:
            excluded = sorted(self.engine.participation.excluded(self.clock()))
            log.error(
                "ALERT: %d consecutive rounds failed (last: %s); rounds back off and resume when the back-off "
                "ends or an eligible device not tried yet connects; excluded devices: %s",
                self.engine.failed_attempts,
                reason,
                ", ".join(excluded) or "none",
            )

    def _abandon(self) -> None:
        """After a failed step: a round being started counts as a failed attempt; a round being closed is
        finished if its model version was committed, else failed. Registry errors here are logged."""
        round_id = self.engine.abandon()
        if round_id is None:
            return
        try:
            latest = self.registry.latest_model_version()
            committed = latest is not None and latest.round_id == round_id
            metrics = latest.metrics if committed else {"reason": "coordinator error (see its log)"}
            self.registry.finish_round(round_id, metrics=metrics, status="finished" if committed else "failed")
        except Exception:  # noqa: BLE001 - the registry is down: the round is closed here and resumed at restart
            log.exception("closing round %d in the registry failed", round_id)
            committed = False
        self.engine.closed(failed=not committed)

    async def _idle(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except TimeoutError:
            pass
        self.wake.clear()

    async def _start_round(self, devices: tuple[str, ...]) -> None:
        """Open a round, ask the strategy what each device trains, build the bundles and record every assignment,
        then send them. Nothing is sent before the whole selection is recorded: a crash in between would
        leave an update acknowledged in a round that cannot be rebuilt at restart."""
        self._round_cpu = time.process_time()  # the coordinator's CPU seconds from here: coordinator_cpu_s
        row = self.registry.start_round(self.strategy.name, {"model_version": self.model.version})
        server_round = self.engine.server_round
        self.engine.started(row.id, {}, self.clock())
        clients = [ClientInfo(d, s.profile, self.reported.get(d)) for d in devices if (s := self.sessions.get(d))]
        with timed(log, "plan", round=row.id):
            fits = await asyncio.to_thread(
                self.strategy.configure_fit, server_round, self.model.params, clients, self.model.strategy_state
            )
        for client in clients:
            if client.client_id not in fits:
                self.engine.participation.unplannable(
                    client.client_id, f"{self.strategy.name} gave it nothing to train"
                )
        await self._write_bundles(row.id, [fit.shape_key for fit in fits.values()])
        prepared = []
        for device_id, fit in fits.items():
            pending = await self._prepare(row.id, device_id, fit)
            if pending is not None:
                self.engine.assign(pending.update_id, device_id)
                prepared.append(pending)
        await self._start_split(row.id, [p for p in prepared if p.fit.config.split is not None])
        if self.secure_settings is not None:
            members = [self._secure_member(p) for p in prepared]
            self.secure = SecureRound(row.id, members, self.secure_settings, now=self.clock())
        await self._deliver_longest_first(prepared)
        log.info(
            "round %d (server round %d) started with %d of %d devices",
            row.id,
            server_round,
            len(prepared),
            len(devices),
        )

    async def _start_split(self, round_id: int, split: list[Pending]) -> None:
        """Open the round's split group (HO-SFL) for its split assignments; if the top cannot be built, they are
        rejected (the round goes on with the others)."""
        members = [SplitMember(p.update_id, p.device_id, p.fit.expert_ids) for p in split]
        try:
            await self.split.start(round_id, split[0].fit.config if split else self.cfg.fit, self.model.params, members)
        except Exception as exc:  # noqa: BLE001 - a bad cut or an unloadable checkpoint: those devices sit out
            log.exception("round %d: the split group could not start", round_id)
            for pending in split:
                self._reject(pending, f"split mode could not start: {type(exc).__name__}: {exc}")

    async def handle_split(self, session: Session, msg: SmashedData | SplitScalars) -> None:
        """A split device's step message: hand it to the round's group, send what that releases.

        Raises:
            ProtocolError("unexpected"): not this device's split assignment, or the group refused the message.
        """
        pending = self.pending.get(msg.update_id)
        if pending is None or pending.device_id != session.device_id or pending.round_id != msg.round_id:
            raise ProtocolError("unexpected", f"{msg.TYPE}: no split assignment {msg.update_id} of this device")
        await self._send_split(await self.split.handle(msg.update_id, msg))

    async def _send_split(self, replies: list[tuple[str, Message]]) -> None:
        for update_id, message in replies:
            pending = self.pending.get(update_id)
            session = None if pending is None else self.sessions.get(pending.device_id)
            if session is not None:
                await self._send(session, message)

    def _split_left(self, update_id: str) -> None:
        """A split member left: its group's step goes on without it (in a task: this is called synchronously)."""
        group = self.split.group
        if group is None or update_id not in group.members:
            return

        async def drop() -> None:
            await self._send_split(await self.split.drop(update_id))

        task = asyncio.get_running_loop().create_task(drop())
        self._split_tasks.add(task)
        task.add_done_callback(self._split_tasks.discard)

    def estimated_work(self, pending: Pending) -> float:
        """The planner's compute estimate of ``pending`` (GFLOP, ``selection.estimated_work``); 0.0 when
        the device is not connected or the strategy is not bound."""
        session, context = self.sessions.get(pending.device_id), getattr(self.strategy, "context", None)
        if session is None or context is None:
            return 0.0
        try:
            return estimated_work(context, pending.fit, session.profile)
        except FedmoeError:  # e.g. a shape the planner cannot estimate: no order for it
            return 0.0

    async def _deliver_longest_first(self, prepared: list[Pending]) -> None:
        """Build and send the round's assignments one at a time, longest estimated training first
        (:meth:`estimated_work`, ties: more trained experts first; longest-processing-time-first list
        scheduling), each send started once the one before it is written out or after :data:`ORDER_WAIT_S`
        seconds (a slow link does not hold the others back longer). The devices then receive them in that order:
        started together, a small assignment arrives (and is decoded) seconds before a large one, so where devices
        share cores (the simulation's training slots, first come first served) the fastest trained first and the
        slowest last."""

        def order(pending: Pending) -> tuple[float, int]:
            return self.estimated_work(pending), sum(len(ids) for ids in pending.fit.expert_ids)

        sends = []
        for pending in sorted(prepared, key=order, reverse=True):
            message = await self._build(pending)
            if message is not None:
                sends.append(asyncio.create_task(self._deliver(pending, message)))
                await asyncio.wait({sends[-1]}, timeout=ORDER_WAIT_S)
        await asyncio.gather(*sends)

    async def _build(self, pending: Pending) -> Assignment | None:
        """``pending``'s Assignment, or None (logged, and the assignment rejected) if it cannot be built."""
        start = time.perf_counter()
        try:
            message = await asyncio.to_thread(pending.message, self.model)
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the round's other deliveries
            log.exception("building assignment %s failed", pending.update_id)
            self._reject(pending, f"assignment could not be built: {type(exc).__name__}: {exc}")
            return None
        log_timing(log, "build_assignment", time.perf_counter() - start, round=pending.round_id)
        return message

    async def _deliver(self, pending: Pending, message: Assignment | None = None) -> None:
        """Send an assignment (``message``, else built here) to its device's connection of the moment.

        Never raises. An assignment that cannot be built is rejected. If the device is gone or the send fails,
        the assignment stays pending with the device lost: :meth:`attach` re-sends it if the device reconnects
        before the round closes (a connection that came up meanwhile already got it there)."""
        if message is None:
            message = await self._build(pending)
            if message is None:
                return
        session = self.sessions.get(pending.device_id)
        secure = [] if self.secure is None else self.secure.sent.get(pending.device_id, [])
        sent = session is not None
        for msg in [*secure, message]:  # a secure round's SecAggStart goes before the Assignment
            sent = sent and await self._send(session, msg)
        if sent:
            return
        now = self.sessions.get(pending.device_id)
        if now is None or now is session:
            self._lost(pending.device_id)

    async def _write_bundles(self, round_id: int, keys: list[ShapeKey]) -> None:
        """Write the round's bundles not cached yet, together (``BundleStore.ensure_all``: one export process).
        A failure is logged; :meth:`_prepare` then tries each device's bundle alone and reports its own."""
        try:
            with timed(log, "bundle_ensure_all", round=round_id):
                await asyncio.to_thread(self.bundles.ensure_all, keys)
        except Exception as exc:  # noqa: BLE001 - a shape that does not fit fails only its own devices, below
            log.warning("round %d: writing its bundles together failed (%s); each is tried alone", round_id, exc)

    async def _prepare(self, round_id: int, device_id: str, fit: FitIns) -> Pending | None:
        """Build the FitIns's bundle if needed and record the assignment; None (logged, and the device
        unplannable until it reconnects) if that fails."""
        try:
            with timed(log, "bundle_ensure", round=round_id):
                manifest = await asyncio.to_thread(self.bundles.ensure, fit.shape_key)
            update_id = f"r{round_id}-{device_id}-{secrets.token_hex(4)}"
            self.registry.record_assignment(
                round_id,
                device_id,
                update_id=update_id,
                shape_key=manifest.shape_key.id,
                expert_ids=[list(ids) for ids in fit.expert_ids],
                config=to_json(fit.config),
            )
        except Exception as exc:  # noqa: BLE001 - FedmoeError: it does not fit; else a bug or a full disk
            log.log(
                logging.WARNING if isinstance(exc, FedmoeError) else logging.ERROR,
                "device %s skipped in round %d: %s: %s",
                device_id,
                round_id,
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, FedmoeError),
            )
            self.engine.participation.unplannable(device_id, str(exc))
            return None
        pending = Pending(device_id, round_id, update_id, manifest, fit)
        self.pending[update_id] = pending
        return pending

    async def _aggregate(self, action: Aggregate) -> None:
        current = self.engine.current
        rows = {r.update_id: r for r in self.registry.accepted_updates(action.round_id)}
        accepted = [rows[u] for u in action.update_ids]
        kwargs = {"server_round": self.engine.server_round, "round_id": action.round_id}
        secure, self.secure = self.secure, None
        aggregating = time.perf_counter()
        try:
            if secure is not None and secure.round_id == action.round_id:
                await self._unmask(secure, [r.device_id for r in accepted])
                version = await asyncio.to_thread(
                    aggregate_secure_round,
                    self.model,
                    self.strategy,
                    secure,
                    accepted,
                    current.failures(),
                    sampling_rate=self.engine.sampling_rate,
                    **kwargs,
                )
            else:
                version = await asyncio.to_thread(
                    aggregate_round,
                    self.model,
                    self.strategy,
                    accepted,
                    current.failures(),
                    sampling_rate=self.engine.sampling_rate,
                    **kwargs,
                )
        except FedmoeError as exc:
            log.error("round %d aggregation failed: %s", action.round_id, exc)
            self.registry.finish_round(action.round_id, metrics={"reason": str(exc)}, status="failed")
            self._closed_failed(str(exc))
            return
        log.info("round %d aggregated %d updates -> model version %d", action.round_id, len(rows), version.version)
        log_timing(log, "aggregate", time.perf_counter() - aggregating, round=action.round_id)
        self.split.close()
        cpu = time.process_time() - self._round_cpu  # every thread of the process, evaluation of the last version too
        self.registry.log_metrics({"coordinator_cpu_s": cpu}, round_id=action.round_id)
        self._log_federated_evaluation(action.round_id, version.metrics)
        self.pending = {u: p for u, p in self.pending.items() if p.round_id >= action.round_id}
        self.engine.closed()
        if not self.cfg.keep_update_tensors:
            await self._discard_updates(action.round_id, [r.tensor_sha256 for r in rows.values()])
        if self.evaluator is not None:  # the next round starts meanwhile
            task = asyncio.create_task(self._evaluate(action.round_id, version.tensor_sha256))
            self._evaluations.add(task)
            task.add_done_callback(self._evaluations.discard)

    def _log_federated_evaluation(self, round_id: int, metrics: dict) -> None:
        """Record the round's federated evaluation (``federation.federated_evaluation``, in the version's
        ``metrics``) as registry metrics of ``round_id``: the aggregate (``fed_eval_loss``, ``fed_eval_accuracy``
        if devices computed one, ``fed_eval_num_examples``, ``fed_eval_num_clients``) and each device's own
        (``Registry.log_device_result``: ``fed_eval_loss``, ``fed_eval_num_examples``, ``fed_eval_accuracy``); and
        log it. Nothing when no device sent a score. A registry error is logged, the rounds go on."""
        loss = metrics.get(FED_EVAL + "loss")
        if loss is None:
            return
        keys = ("loss", "accuracy", "num_examples", "num_clients")
        try:
            self.registry.log_metrics(
                {FED_EVAL + k: metrics[FED_EVAL + k] for k in keys if metrics.get(FED_EVAL + k) is not None},
                round_id=round_id,
            )
            for device_id, scored in metrics.get(FED_EVAL + "devices", {}).items():
                for key in ("loss", "num_examples", "accuracy"):
                    if scored.get(key) is not None:
                        self.registry.log_device_result(
                            FED_EVAL + key, scored[key], round_id=round_id, device_id=device_id
                        )
        except Exception:  # noqa: BLE001 - the scores are advisory; the version is committed
            log.exception("recording round %d's federated evaluation failed", round_id)
        accuracy = metrics.get(FED_EVAL + "accuracy")
        log.info(
            "round %d federated evaluation of the model it started from: loss %.4f%s on %d held-out examples of %d "
            "devices",
            round_id,
            loss,
            "" if accuracy is None else f", accuracy {accuracy:.4f}",
            int(metrics.get(FED_EVAL + "num_examples", 0)),
            int(metrics.get(FED_EVAL + "num_clients", 0)),
        )

    async def _discard_updates(self, round_id: int, shas: list[str]) -> None:
        """Delete an aggregated round's update files (their registry rows stay) but those the registry still
        references (``GlobalModel.discard``). A failure is logged."""
        try:
            freed = await asyncio.to_thread(self.model.discard, shas)
        except OSError as exc:
            log.warning("round %d: could not delete its update files: %s", round_id, exc)
            return
        log.info("round %d: deleted %d update files (%.1f MiB)", round_id, len(shas), freed / MIB)

    async def _evaluate(self, round_id: int, tensor_sha256: str) -> None:
        """Score a new global version on the held-out set in a low-priority worker thread
        (``evaluation.background_executor``); log ``eval_accuracy`` and ``eval_loss`` (nats per label token) as
        metrics of ``round_id``. A failure is logged, rounds go on."""
        async with self._evaluating:
            start = time.perf_counter()
            try:
                score = await asyncio.get_running_loop().run_in_executor(
                    self._evaluation_pool, lambda: self.evaluator.score(self.model.store.load(tensor_sha256))
                )
                log_timing(log, "evaluate", time.perf_counter() - start, round=round_id)
            except Exception:  # noqa: BLE001 - evaluation is advisory; the federation must not stop for it
                log.exception("evaluating round %d failed", round_id)
                return
        self.registry.log_metrics({"eval_accuracy": score.accuracy, "eval_loss": score.loss}, round_id=round_id)
        log.info(
            "round %d evaluated: accuracy %.4f, label loss %.4f on %d examples",
            round_id,
            score.accuracy,
            score.loss,
            score.num_examples,
        )

    # ------------------------------------------------------------ updates

    async def handle_update(self, session: Session, msg: Update) -> Ack:
        """Validate, store and record an update once per update_id; the Ack says whether it counts.

        A replayed update_id is answered from the registry before anything is stored, also once its round is
        closed and its assignment forgotten (after the next aggregation or a restart). An update that arrives
        while its round is being aggregated (or after) is rejected: "accepted" always means aggregated."""

        async def store(pending: Pending, _: Message) -> tuple[str, dict | None]:
            if pending.fit.config.split is not None:  # its steps are here already: the group's model, its rows
                return await self._store_split(pending, msg)
            return await self._validate_and_store(pending, msg), None

        return await self._receive(session, msg, msg.update_id, store)

    async def _receive(
        self,
        session: Session,
        msg: Update | SecAggMasked,
        update_id: str,
        store: Callable[[Pending, Message], Awaitable[tuple[str, dict | None]]],
    ) -> Ack:
        """:meth:`handle_update` for an Update or a SecAggMasked: ``store(pending, msg)`` validates and stores the
        result (its sha256; raises UpdateRejected). A masked result records no example count (it is masked)."""
        num_examples, num_tokens = (msg.num_examples, msg.num_tokens) if isinstance(msg, Update) else (0, 0)
        known = self.registry.get_update(update_id)
        if known is not None and (known.device_id, known.round_id) == (session.device_id, msg.round_id):
            return Ack(update_id=update_id, accepted=known.accepted, reason="already recorded")
        pending = self.pending.get(update_id)
        if (
            known is not None
            or pending is None
            or (pending.device_id, pending.round_id) != (session.device_id, msg.round_id)
        ):
            return Ack(update_id=update_id, accepted=False, reason="no such assignment for this device and round")
        reason, sha, evaluation, meta = "", None, None, None
        try:
            evaluation = check_evaluation(msg.evaluation, pending.fit.config)
            sha, meta = await store(pending, msg)
        except UpdateRejected as exc:
            reason, evaluation, meta = exc.reason, None, None
        meta = meta or update_meta(
            pending.manifest, pending.fit.expert_ids, msg.trained_experts, msg.routing, msg.metrics, evaluation
        )
        if sha is not None and not self._collecting(msg.round_id):  # aggregation began while the file was written
            await asyncio.to_thread(self.model.discard, [sha])
            reason, sha = f"round {msg.round_id} closed while the update was stored", None
        row, created = self.registry.record_update(
            update_id=update_id,
            round_id=msg.round_id,
            device_id=session.device_id,
            num_examples=num_examples,
            num_tokens=num_tokens,
            tensor_sha256=sha,
            metadata=meta,
            accepted=sha is not None,
            reason=reason,
        )
        if not created:  # a concurrent copy of this update_id was recorded first
            if sha is not None:
                await asyncio.to_thread(self.model.discard, [sha])
            return Ack(update_id=update_id, accepted=row.accepted, reason="already recorded")
        if self.engine.on_update(update_id, row.accepted, reason) and row.accepted:
            self.reported[session.device_id] = RoutingStats.from_dict(msg.routing)
        self.wake.set()
        return Ack(update_id=update_id, accepted=row.accepted, reason=reason)

    def _collecting(self, round_id: int) -> bool:
        """Whether round ``round_id`` still takes updates (it is current and no aggregation or retry is under way)."""
        current = self.engine.current
        return current is not None and current.round_id == round_id and not self.engine.busy

    def device_error(self, session: Session, msg: Error) -> None:
        """A device sent ``Error``. Any code but ``unexpected`` (its reply to a message it did not expect) means
        it dropped its pending assignment of the current round (training failed, or the bundle or assignment
        frame was bad): that assignment is rejected now instead of awaited until the deadline. An Error naming
        another of the device's assignments (``"<update_id>: ..."``, a late one of a past round) rejects nothing."""
        log.warning("device %s reported %s: %s", session.device_id, msg.code, msg.message)
        pending = self._pending_of(session.device_id)
        if msg.code == "unexpected" or pending is None:
            return
        if any(
            msg.message.startswith(f"{u}:")
            for u, p in self.pending.items()
            if p.device_id == session.device_id and u != pending.update_id
        ):
            return
        self._reject(pending, f"device reported {msg.code}: {msg.message}")
        self._log_exclusion(
            session.device_id, self.engine.device_failed(pending.update_id, self.clock()), f"it reported {msg.code}"
        )

    def assignment_refused(self, session: Session, update_id: str, frame_bytes: int) -> None:
        """The device closed its connection with code 1009 (message too big) after the Assignment frame of
        ``update_id`` (``frame_bytes`` bytes): reject that assignment rather than re-send it on every reconnect,
        and select the device no more until it connects with another profile."""
        pending = self._pending_of(session.device_id)
        if pending is None or pending.update_id != update_id:
            return
        reason = f"assignment of {frame_bytes / MIB:.2f} MiB exceeds the device's max message size"
        log.error(
            "device %s: %s (%d bytes); it is not selected again until its profile changes",
            session.device_id,
            reason,
            frame_bytes,
        )
        self.engine.participation.refused(session.device_id, session.profile)
        self._reject(pending, reason)

    def _pending_of(self, device_id: str) -> Pending | None:
        """The device's assignment still awaited in the current round, or None."""
        update_id = self.engine.pending_of(device_id)
        return None if update_id is None else self.pending.get(update_id)

    def _reject(self, pending: Pending, reason: str) -> None:
        """End ``pending``'s part in its round: recorded once as a rejected update (no tensors) in the registry
        and counted as rejected by the engine, so the round decides at once. Never raises: a registry error is
        logged (the engine still counts the rejection)."""
        reason = reason[:2000]
        log.warning(
            "round %d: assignment %s of device %s rejected: %s",
            pending.round_id,
            pending.update_id,
            pending.device_id,
            reason,
        )
        try:
            _, created = self.registry.record_update(
                update_id=pending.update_id,
                round_id=pending.round_id,
                device_id=pending.device_id,
                num_examples=0,
                num_tokens=0,
                tensor_sha256=None,
                metadata={},
                accepted=False,
                reason=reason,
            )
        except Exception as exc:  # noqa: BLE001 - UpdateRejected (unknown round / device) or the registry is down
            log.warning(
                "recording the rejection of %s failed: %s",
                pending.update_id,
                exc,
                exc_info=not isinstance(exc, UpdateRejected),
            )
            created = True
        if created:
            self.engine.on_update(pending.update_id, False, reason)
        self.wake.set()

    async def _validate_and_store(self, pending: Pending, msg: Update) -> str:
        if not self._collecting(msg.round_id):
            raise UpdateRejected(f"round {msg.round_id} is closed")
        if self.secure_settings is not None:
            raise UpdateRejected("this federation aggregates securely: an update in clear is refused (SecAggMasked)")
        tensors = msg.tensors
        if msg.zo is not None:  # seeds and scalars (FedKSeed): expand against the assignment's weights
            assigned = slice_assignment(self.model.params, pending.manifest, pending.fit.expert_ids)
            tensors = await asyncio.to_thread(expand_zo_update, msg, assigned, pending.manifest, pending.fit.config)
        with timed(log, "validate_update", round=msg.round_id):  # norms of 100s of MiB: off the event loop
            tensors = await asyncio.to_thread(
                functools.partial(
                    check_update,
                    pending.manifest,
                    pending.fit.expert_ids,
                    device_id=pending.device_id,
                    num_examples=msg.num_examples,
                    tensors=tensors,
                    trained_experts=msg.trained_experts,
                    routing=msg.routing,
                    metrics=msg.metrics,
                    norm_bound=self.cfg.update_norm_bound,
                    global_params=self.model.params,
                )
            )
        with timed(log, "store_update", round=msg.round_id):
            return await asyncio.to_thread(self.model.store.put, tensors)

    async def _store_split(self, pending: Pending, msg: Update) -> tuple[str, dict]:
        if not self._collecting(msg.round_id):
            raise UpdateRejected(f"round {msg.round_id} is closed")
        tensors, meta = self.split.update_of(pending.update_id, msg, self.cfg.update_norm_bound, self.model.params)
        return await asyncio.to_thread(self.model.store.put, tensors), meta

    # ------------------------------------------------------------ secure aggregation

    def _secure_member(self, pending: Pending) -> SecureMember:
        """A device of a secure round: what it holds (from its assignment's manifest) and the rows it sends."""
        ids, manifest = pending.fit.expert_ids, pending.manifest
        return SecureMember(pending.device_id, pending.update_id, ids, manifest.held_ids(ids), slots_of(manifest, ids))

    async def _advance_secure(self) -> None:
        """Close the secure round's key or share phase when it is due (``SecureRound.advance``): send the roster
        or the inboxes, reject the assignments of the devices that did not answer, or all of them when too few
        did (the engine then retries the round: nothing was aggregated)."""
        secure = self.secure
        if secure is None:
            return
        advance = secure.advance(self.clock())
        dropped = dict(advance.dropped)
        if advance.failed is not None:
            log.error("round %d: secure aggregation failed: %s", secure.round_id, advance.failed)
            dropped |= {d: f"secure aggregation failed: {advance.failed}" for d in secure.members}
            self.secure = None
        for device_id, reason in dropped.items():
            pending = self.pending.get(secure.members[device_id].update_id)
            if pending is not None and self.engine.pending_of(device_id) == pending.update_id:
                self._reject(pending, reason)
        await asyncio.gather(*(self._send_to(device_id, msg) for device_id, msg in advance.sends))

    async def _send_to(self, device_id: str, msg: Message) -> None:
        """Send to the device's session of the moment, if it has one (a reconnect re-sends, :meth:`attach`)."""
        session = self.sessions.get(device_id)
        if session is not None:
            await self._send(session, msg)

    async def _unmask(self, secure: SecureRound, masked: list[str]) -> None:
        """Ask the devices whose masked rows were accepted for their shares (``SecureRound.unmask``) and wait
        until every one still connected answered, or ``secure_timeout_s`` passed; ``SecureRound.secrets`` then
        needs t of them.

        Raises:
            ProtocolError: too few of them can be unmasked without exposing a thin row.
        """
        self.secure = secure  # reveals are taken while it waits
        try:
            sends = secure.unmask(masked)
            await asyncio.gather(*(self._send_to(device_id, msg) for device_id, msg in sends))
            deadline = self.clock() + secure.timeout_s
            while not set(secure.reveals) >= set(secure.asked) & set(self.sessions):  # a lost device never answers
                if self.clock() >= deadline:
                    break
                self._revealed.clear()
                try:
                    await asyncio.wait_for(self._revealed.wait(), _POLL_S)
                except TimeoutError:
                    pass
            if set(secure.reveals) != set(secure.asked):
                log.warning(
                    "round %d: %d of %d devices asked revealed their shares (the others disconnected, or did not "
                    "answer within %.0f s)",
                    secure.round_id,
                    len(secure.reveals),
                    len(secure.asked),
                    secure.timeout_s,
                )
        finally:
            self.secure = None

    async def handle_secure(self, session: Session, msg: Message) -> Ack | None:
        """A device's secure-aggregation message: keys, shares and reveals are recorded (nothing to answer), a
        masked result is handled like an Update (its Ack).

        Raises:
            ProtocolError: no secure round is running, or the message does not fit it (sent back as Error).
        """
        if isinstance(msg, SecAggMasked):
            return await self._receive(session, msg, msg.update_id, self._store_masked)
        secure = self.secure
        if secure is None:
            raise ProtocolError("unexpected", f"{msg.TYPE}: no secure aggregation round is running")
        if isinstance(msg, SecAggKeys):
            secure.on_keys(session.device_id, msg)
        elif isinstance(msg, SecAggShares):
            secure.on_shares(session.device_id, msg)
        elif isinstance(msg, SecAggReveal):
            secure.on_reveal(session.device_id, msg)
            self._revealed.set()
        self.wake.set()
        return None

    async def _store_masked(self, pending: Pending, msg: Message) -> tuple[str, dict | None]:
        """Check a SecAggMasked against the secure round (size of its payload) and its clear fields against the
        assignment (``check_update`` on stand-in zero tensors: trained experts, routing statistics, metrics),
        then store its words (``masked_blob``). Raises UpdateRejected."""
        if not isinstance(msg, SecAggMasked) or not self._collecting(msg.round_id):
            raise UpdateRejected(f"round {pending.round_id} is closed")
        secure = self.secure
        if secure is None or secure.round_id != msg.round_id:
            raise UpdateRejected(f"round {msg.round_id} is not a running secure round")
        try:
            secure.check_masked(pending.device_id, msg)
        except ProtocolError as exc:
            raise UpdateRejected(str(exc)) from exc
        stand_in = {s.name: np.zeros(s.shape, np.float32) for s in pending.manifest.tensors if s.trainable}
        check_update(
            pending.manifest,
            pending.fit.expert_ids,
            device_id=pending.device_id,
            num_examples=1,
            tensors=stand_in,
            trained_experts=msg.trained_experts,
            routing=msg.routing,
            metrics=msg.metrics,
            norm_bound=float("inf"),
            global_params=self.model.params,
        )
        return await asyncio.to_thread(self.model.store.put, masked_blob(msg.data)), None

    # ------------------------------------------------------------ crash recovery

    def _resume(self) -> None:
        """Rebuild the engine from the registry: finished rounds count, a running round continues."""
        rounds = sorted(self.registry.list_rounds(limit=1_000_000), key=lambda r: r.id)
        done = sum(r.status == "finished" for r in rounds)
        running = [r for r in rounds if r.status == "running"]
        for stale in running[:-1]:
            self.registry.finish_round(stale.id, metrics={"reason": "superseded at restart"}, status="failed")
        if running and self.secure_settings is not None:  # its keys, shares and reveals were in memory only
            reason = "a secure round cannot resume after a restart (its protocol state was in memory); retried"
            self.registry.finish_round(running[-1].id, metrics={"reason": reason}, status="failed")
            running = []
        self._sweep_update_files(running[-1].id if running else None)
        self.engine.resume(done, self._resume_round(running[-1].id, done + 1) if running else None, self.clock())

    def _sweep_update_files(self, running: int | None) -> None:
        """Check the tensor store against the registry (missing referenced files are logged), then, unless
        ``keep_update_tensors``, delete the update files of every round but the ``running`` one (those of
        failed rounds, those a crash left between a round's commit and its cleanup) and orphan files; never a
        file the registry still references (``GlobalModel.discard``)."""
        keep = self.cfg.keep_update_tensors
        missing, freed = self.model.check_store(delete_orphans=not keep)
        for sha in missing:
            log.error(
                "tensor file %s... referenced by the registry is missing from %s; restore it from a backup",
                sha[:12],
                self.model.store.root,
            )
        if not keep:
            freed += self.model.discard(self.registry.update_shas(except_round=running))
        if freed:
            log.info("deleted %.1f MiB of update and orphan files of past rounds", freed / MIB)

    def _resume_round(self, round_id: int, server_round: int) -> RunningRound:
        """The running round's assignments back as Pending, each with the FitConfig recorded with it (so the
        re-sent assignment is the one signed before; the strategy's FitConfig of the round for a row of an older
        fedmoe), and its recorded updates."""
        assigned = self.registry.assignments(round_id)
        accepted = self.registry.accepted_updates(round_id)
        accepted_ids = [u.update_id for u in accepted]
        rejected = {
            a.update_id: "rejected before restart"
            for a in assigned
            if a.status == "reported" and a.update_id not in accepted_ids
        }
        for a in assigned:
            manifest = self.bundles.manifest(a.shape_key)
            config = self.strategy.fit_config(server_round) if a.config is None else FitConfig.from_dict(a.config)
            fit = FitIns(
                tuple(tuple(ids) for ids in a.expert_ids),
                config,
                manifest.shape_key.trainable_mode,
                manifest.shape_key.lora_rank,
                manifest.shape_key.frozen_dtype,
                manifest.shape_key.merged,
            )
            self.pending[a.update_id] = Pending(a.device_id, round_id, a.update_id, manifest, fit)
        for u in accepted:
            self.reported[u.device_id] = RoutingStats.from_dict(u.meta["routing"])
        log.info("resumed round %d: %d assigned, %d accepted", round_id, len(assigned), len(accepted_ids))
        return RunningRound(round_id, {a.update_id: a.device_id for a in assigned}, accepted_ids, rejected)
