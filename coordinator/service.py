"""The coordinator's round orchestration: turns the round engine's decisions into registry writes,
assignments sent to connected devices, recorded updates and new global versions.

Networking stays in ``coordinator.server``: a :class:`Session` carries only an async ``send``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.evaluation import Evaluator
from coordinator.federation import GlobalModel, aggregate_round, load_calibration, tensor_store
from coordinator.planning import (BundleCache, check_update, expert_scores, plan_device, slice_assignment,
                                  update_meta)
from coordinator.registry import Registry
from coordinator.rounds import (Aggregate, Finished, RetryRound, RoundEngine, RoundPolicy, RoundState, StartRound,
                                Wait, resume)
from coordinator.strategy import from_name
from device_runtime.bundle import Manifest, TrainingDefaults
from device_runtime.errors import FedmoeError, UpdateRejected
from device_runtime.protocol import Ack, Assignment, FitConfig, Message, Update
from device_runtime.stats import RoutingStats
from export.planner import TrainingShape, model_shape

log = logging.getLogger("fedmoe.coord")
_POLL_S = 0.5
_STRATEGY_FIT_KEYS = {"prox_mu": "prox_mu", "kl_coef": "routing_reg_coef", "routing_prior": "routing_prior"}


@dataclass
class Session:
    """An authenticated device connection."""

    device_id: str
    profile: dict
    send: Callable[[Message], Awaitable[None]]


@dataclass
class Pending:
    """An assignment of the current (or just closed) round, rebuildable after a restart."""

    device_id: str
    round_id: int
    update_id: str
    manifest: Manifest
    expert_ids: tuple[tuple[int, ...], ...]
    fit: FitConfig

    def message(self, model: GlobalModel) -> Assignment:
        return Assignment(round_id=self.round_id, update_id=self.update_id, model_version=model.version,
                          shape_key=self.manifest.shape_key, expert_ids=self.expert_ids, config=self.fit,
                          tensors=slice_assignment(model.params, self.manifest, self.expert_ids))


def strategy_fit(base: FitConfig, strategy_config: dict) -> FitConfig:
    """``base`` with the strategy's client settings (FedProx mu, FedAlign-MoE prior and KL coefficient)."""
    values = {field: strategy_config[key] for key, field in _STRATEGY_FIT_KEYS.items() if key in strategy_config}
    if "routing_prior" in values:
        values["routing_prior"] = tuple(tuple(float(p) for p in layer) for layer in values["routing_prior"])
    return dataclasses.replace(base, **values)


class Coordinator:
    """Registry, global model, bundle cache, round engine and the authenticated sessions.

    Raises (on construction):
        ConfigError: the state directory is not initialised (run ``fedmoe-coord init``) or the config is bad.
    """

    def __init__(self, cfg: CoordinatorConfig, *, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.clock = cfg, clock
        self.registry = Registry(cfg.registry_url)
        self.model = GlobalModel(self.registry, tensor_store(cfg))
        self.calibration = load_calibration(cfg)
        self.strategy = from_name(cfg.strategy, **cfg.strategy_params)
        self.shape = model_shape(cfg.checkpoint)
        fit = cfg.fit_config
        self.bundles = BundleCache(Path(cfg.state_dir) / "bundles", cfg.checkpoint, TrainingDefaults(
            fit.batch_size, fit.seq_len, fit.learning_rate, fit.aux_loss_coef, fit.local_steps))
        policy = RoundPolicy(cfg.min_fit_clients, cfg.max_fit_clients, cfg.fraction_fit, cfg.round_deadline_s,
                             cfg.max_round_attempts, cfg.num_rounds)
        self.engine = RoundEngine(policy, seed=cfg.seed)
        self.sessions: dict[str, Session] = {}
        self.pending: dict[str, Pending] = {}
        self.reported: dict[str, RoutingStats] = {}
        self.unplannable: dict[str, str] = {}  # device_id -> why planning failed (cleared on reconnect)
        self.wake = asyncio.Event()
        self.evaluator = Evaluator.from_config(cfg)
        self._evaluations: set[asyncio.Task] = set()
        self._evaluating = asyncio.Lock()  # one evaluation at a time: they share the evaluator's model
        self._resume()

    def close(self) -> None:
        self.registry.close()

    # ------------------------------------------------------------ sessions

    async def attach(self, session: Session) -> None:
        """A device authenticated: make it available and re-send its pending assignment, if any."""
        self.sessions[session.device_id] = session
        self.unplannable.pop(session.device_id, None)
        current = self.engine.current
        if current is not None:
            current.device_back(session.device_id)
            for update_id in current.pending():
                pending = self.pending.get(update_id)
                if pending is not None and pending.device_id == session.device_id:
                    await self._send(session, pending.message(self.model))
        self.wake.set()

    def detach(self, session: Session) -> None:
        if self.sessions.get(session.device_id) is session:
            del self.sessions[session.device_id]
            if self.engine.current is not None:
                self.engine.current.device_lost(session.device_id)
            self.wake.set()

    def count_bytes(self, device_id: str, direction: str, size: int) -> None:
        """Record ``size`` bytes moved to (``bytes_down``) or from (``bytes_up``) a device in the current round."""
        current = self.engine.current
        self.registry.log_metric(direction, size, round_id=None if current is None else current.round_id,
                                 device_id=device_id)

    def _available(self) -> list[str]:
        """Connected, plannable, non-revoked devices; [] while a round runs (the engine does not select then)."""
        if self.engine.current is not None or self.engine.busy:
            return []
        return self.registry.active_device_ids(d for d in self.sessions if d not in self.unplannable)

    async def _send(self, session: Session, msg: Message) -> bool:
        try:
            await session.send(msg)
            return True
        except Exception as exc:  # connection closed or broken: the device is lost, the round goes on
            log.warning("sending %s to %s failed: %s", msg.TYPE, session.device_id, exc)
            return False

    # ------------------------------------------------------------ the round loop

    async def run_rounds(self, stop: asyncio.Event) -> None:
        """Drive the engine until ``stop`` is set."""
        while not stop.is_set():
            action = self.engine.step(self.clock(), self._available())
            if isinstance(action, StartRound):
                await self._start_round(action.devices)
            elif isinstance(action, Aggregate):
                await self._aggregate(action)
            elif isinstance(action, RetryRound):
                log.warning("round %d failed: %s", action.round_id, action.reason)
                self.registry.finish_round(action.round_id, metrics={"reason": action.reason}, status="failed")
                self.engine.closed(failed=True)
            else:
                if isinstance(action, Finished):
                    log.info("rounds finished: %s", action.reason)
                timeout = _POLL_S if not isinstance(action, Wait) or action.until is None else \
                    min(_POLL_S, max(0.0, action.until - self.clock()))
                await self._idle(timeout)

    async def _idle(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self.wake.clear()

    def _fit_for(self, round_id: int) -> FitConfig:
        base = dataclasses.replace(self.cfg.fit_config, seed=(self.cfg.seed + round_id) % 2**32)
        return strategy_fit(base, self.strategy.fit_config(round_id))

    async def _start_round(self, devices: tuple[str, ...]) -> None:
        row = self.registry.start_round(self.strategy.name, {"model_version": self.model.version})
        fit = self._fit_for(row.id)
        # Open the round first: a device planned early may send its update while later ones are planned.
        state = self.engine.started(row.id, {}, self.clock())
        deliveries = []
        for device_id in devices:
            session = self.sessions.get(device_id)
            pending = None if session is None else await self._plan(row.id, session, fit)
            if pending is not None:
                state.assign(pending.update_id, device_id)
                deliveries.append(asyncio.create_task(self._deliver(state, session, pending)))
        await asyncio.gather(*deliveries)
        log.info("round %d started with %d of %d devices", row.id, len(state.devices), len(devices))

    async def _deliver(self, state: RoundState, session: Session, pending: Pending) -> None:
        """Send an assignment while the next device is planned; withdraw it from the round if that fails."""
        message = await asyncio.to_thread(pending.message, self.model)
        if not await self._send(session, message):
            state.withdraw(pending.update_id)

    async def _plan(self, round_id: int, session: Session, fit: FitConfig) -> Pending | None:
        """Plan, build the bundle if needed, record the assignment; None (logged) if the device cannot take part."""
        try:
            pending = await asyncio.to_thread(self._plan_sync, round_id, session, fit)
        except FedmoeError as exc:
            log.warning("device %s skipped in round %d: %s", session.device_id, round_id, exc)
            self.unplannable[session.device_id] = str(exc)
            return None
        self.registry.record_assignment(round_id, session.device_id, update_id=pending.update_id,
                                        shape_key=pending.manifest.shape_key.id,
                                        expert_ids=[list(ids) for ids in pending.expert_ids])
        self.pending[pending.update_id] = pending
        return pending

    def _plan_sync(self, round_id: int, session: Session, fit: FitConfig) -> Pending:
        lam, beta = float(getattr(self.strategy, "lam", 0.5)), float(getattr(self.strategy, "beta", 0.1))
        scores = expert_scores(self.calibration, self.reported.get(session.device_id), lam=lam, beta=beta)
        train = TrainingShape(fit.batch_size, fit.seq_len, self.cfg.trainable_mode, self.cfg.lora_rank)
        plan = plan_device(self.shape, train, session.profile, scores, prox=fit.prox_mu > 0)
        manifest = self.bundles.ensure(plan.shape_key)
        update_id = f"r{round_id}-{session.device_id}-{secrets.token_hex(4)}"
        return Pending(session.device_id, round_id, update_id, manifest, plan.expert_ids, fit)

    async def _aggregate(self, action: Aggregate) -> None:
        current = self.engine.current
        rows = {r.update_id: r for r in self.registry.accepted_updates(action.round_id)}
        try:
            version = await asyncio.to_thread(aggregate_round, self.model, self.strategy, action.round_id,
                                              [rows[u] for u in action.update_ids], current.failures())
        except FedmoeError as exc:
            log.error("round %d aggregation failed: %s", action.round_id, exc)
            self.registry.finish_round(action.round_id, metrics={"reason": str(exc)}, status="failed")
            self.engine.closed(failed=True)
            return
        self.registry.finish_round(action.round_id, metrics={**version.metrics, "model_version": version.version})
        log.info("round %d aggregated %d updates -> model version %d", action.round_id, len(rows), version.version)
        self.pending = {u: p for u, p in self.pending.items() if p.round_id >= action.round_id}
        self.engine.closed()
        if self.evaluator is not None:  # the next round starts meanwhile
            task = asyncio.create_task(self._evaluate(action.round_id, version.tensor_sha256))
            self._evaluations.add(task)
            task.add_done_callback(self._evaluations.discard)

    async def _evaluate(self, round_id: int, tensor_sha256: str) -> None:
        """Score a new global version on the held-out set in a worker thread; log ``eval_accuracy`` and
        ``eval_loss`` (nats per label token) as metrics of ``round_id``. A failure is logged, rounds go on."""
        async with self._evaluating:
            try:
                params = await asyncio.to_thread(self.model.store.load, tensor_sha256)
                score = await asyncio.to_thread(self.evaluator.score, params)
            except Exception:  # noqa: BLE001 - evaluation is advisory; the federation must not stop for it
                log.exception("evaluating round %d failed", round_id)
                return
        self.registry.log_metric("eval_accuracy", score.accuracy, round_id=round_id)
        self.registry.log_metric("eval_loss", score.loss, round_id=round_id)
        log.info("round %d evaluated: accuracy %.4f, label loss %.4f on %d examples", round_id, score.accuracy,
                 score.loss, score.num_examples)

    # ------------------------------------------------------------ updates

    async def handle_update(self, session: Session, msg: Update) -> Ack:
        """Validate, store and record an update once per update_id; the Ack says whether it counts."""
        pending = self.pending.get(msg.update_id)
        if pending is None or (pending.device_id, pending.round_id) != (session.device_id, msg.round_id):
            return Ack(update_id=msg.update_id, accepted=False, reason="no such assignment for this device and round")
        meta = update_meta(pending.manifest, pending.expert_ids, msg.trained_experts, msg.routing, msg.metrics)
        reason, sha = "", None
        try:
            sha = await self._validate_and_store(pending, msg)
        except UpdateRejected as exc:
            reason = exc.reason
        row, created = self.registry.record_update(
            update_id=msg.update_id, round_id=msg.round_id, device_id=session.device_id,
            num_examples=msg.num_examples, num_tokens=msg.num_tokens, tensor_sha256=sha, metadata=meta,
            accepted=sha is not None, reason=reason)
        if not created:
            return Ack(update_id=msg.update_id, accepted=row.accepted, reason="already recorded")
        if self.engine.on_update(msg.update_id, row.accepted, reason) and row.accepted:
            self.reported[session.device_id] = RoutingStats.from_dict(msg.routing)
        self.wake.set()
        return Ack(update_id=msg.update_id, accepted=row.accepted, reason=reason)

    async def _validate_and_store(self, pending: Pending, msg: Update) -> str:
        current = self.engine.current
        if current is None or current.round_id != msg.round_id:
            raise UpdateRejected(f"round {msg.round_id} is closed")
        tensors = check_update(pending.manifest, pending.expert_ids, num_examples=msg.num_examples,
                               tensors=msg.tensors, trained_experts=msg.trained_experts, routing=msg.routing,
                               norm_bound=self.cfg.update_norm_bound)
        return await asyncio.to_thread(self.model.store.put, tensors)

    # ------------------------------------------------------------ crash recovery

    def _resume(self) -> None:
        """Rebuild the engine from the registry: finished rounds count, a running round continues."""
        rounds = sorted(self.registry.list_rounds(limit=1_000_000), key=lambda r: r.id)
        self.engine.rounds_done = sum(r.status == "finished" for r in rounds)
        running = [r for r in rounds if r.status == "running"]
        for stale in running[:-1]:
            self.registry.finish_round(stale.id, metrics={"reason": "superseded at restart"}, status="failed")
        if not running:
            return
        row, latest = running[-1], self.registry.latest_model_version()
        if latest.round_id == row.id:  # crashed after committing the version, before closing the round
            self.registry.finish_round(row.id, metrics=latest.metrics)
            self.engine.rounds_done += 1
            return
        self._resume_round(row.id)

    def _resume_round(self, round_id: int) -> None:
        fit = self._fit_for(round_id)
        assigned = self.registry.assignments(round_id)
        accepted = self.registry.accepted_updates(round_id)
        accepted_ids = [u.update_id for u in accepted]
        rejected = {a.update_id: "rejected before restart" for a in assigned
                    if a.status == "reported" and a.update_id not in accepted_ids}
        for a in assigned:
            manifest = self.bundles.manifest(a.shape_key)
            self.pending[a.update_id] = Pending(a.device_id, round_id, a.update_id, manifest,
                                                tuple(tuple(ids) for ids in a.expert_ids), fit)
        for u in accepted:
            self.reported[u.device_id] = RoutingStats.from_dict(u.meta["routing"])
        resume(self.engine, round_id, {a.update_id: a.device_id for a in assigned}, accepted_ids, rejected,
               self.clock())
        log.info("resumed round %d: %d assigned, %d accepted", round_id, len(assigned), len(accepted_ids))
