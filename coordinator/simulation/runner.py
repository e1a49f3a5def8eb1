"""Run one simulated federation per strategy and collect its metrics.

For each strategy: a fresh coordinator state (registry, global state v0, calibration) from the same
checkpoint, ``fedmoe-coord serve`` as a process on a free loopback port, every device enrolled over the
websocket with a one-time token and started as a ``fedmoe-device run`` process under its memory budget.
The coordinator scores each new global model version on the held-out set (``eval_data``,
``coordinator/evaluation.py``); this process watches the registry and turns each scored round into one
:class:`RoundRecord`, with the round's federated evaluation (the devices' scores of the version the round started
from on their held-out records, ``fed_eval_*`` metrics of the round) beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

from coordinator.config import CoordinatorConfig, make_strategy, save_config
from coordinator.federation import FED_EVAL, export_latest, fit_context, initialize
from coordinator.privacy import PrivacyConfig
from coordinator.registry import Registry
from coordinator.registry.store import utc_now
from coordinator.rounds import RoundPolicy
from coordinator.simulation.processes import (
    MIB,
    Child,
    enroll_device,
    free_port,
    start_coordinator,
    start_device,
    wait_healthy,
)
from coordinator.simulation.profiles import SimulatedDevice
from coordinator.simulation.ray_pool import RayOptions, RemoteChild
from coordinator.simulation.report import DeviceRound, RoundRecord, experts_label
from coordinator.strategy import ClientInfo
from coordinator.tensor_store import TensorStore
from coordinator.tls import local_url, pinned_token, with_new_authority
from device_runtime.errors import FedmoeError
from device_runtime.shape_key import ShapeKey
from device_runtime.wire import FitConfig
from export.planner import model_shape


@dataclass(frozen=True)
class Federation:
    """Everything one strategy's run needs.

    Attributes:
        strategy: strategy name (``coordinator.strategy.STRATEGIES``). rounds: rounds to run.
        checkpoint: the MoE checkpoint. devices / data_files: the simulated devices and their JSONL data.
        fit: local training settings. trainable_mode / lora_rank: what devices train. frozen_experts: what they hold
            of the experts they do not train (``CoordinatorConfig.frozen_experts``).
        calibration_texts: text sample for the initial expert importance. seed: selection / data seed.
        slots: concurrent trainings allowed on this machine. round_deadline_s: per-round deadline.
        eval_data: the held-out JSONL set the coordinator scores every version on.
        privacy: the coordinator's ``[privacy]`` table (DP-FedAvg's noise and clip, secure aggregation).
        ray: where the device processes run: None = this machine, else a Ray cluster
            (``coordinator.simulation.ray_pool``); the coordinator runs here either way.
    """

    strategy: str
    rounds: int
    checkpoint: Path
    devices: tuple[SimulatedDevice, ...]
    data_files: tuple[Path, ...]
    fit: FitConfig
    eval_data: Path
    trainable_mode: str = "experts"
    lora_rank: int = 0
    frozen_experts: str = "float16"
    calibration_texts: tuple[str, ...] = ()
    seed: int = 0
    slots: int = 2
    round_deadline_s: float = 1800.0  # from the round's opening, bundle exports included: a loaded 2-core machine
    # took 6.5 min to export the default's three graphs and 2 slots x 5 devices ~8 min to train one round
    privacy: PrivacyConfig = PrivacyConfig()
    ray: RayOptions | None = None


def coordinator_config(fed: Federation, out: Path, port: int) -> CoordinatorConfig:
    """The coordinator config of ``fed`` with its state under ``out``, listening on ``port``."""
    return CoordinatorConfig(
        checkpoint=str(fed.checkpoint.resolve()),
        state_dir=str((out / "state").resolve()),
        port=port,
        strategy=fed.strategy,
        rounds=RoundPolicy(
            min_fit_clients=len(fed.devices),
            max_fit_clients=len(fed.devices),
            num_rounds=fed.rounds,
            deadline_s=fed.round_deadline_s,
        ),
        trainable_mode=fed.trainable_mode,
        lora_rank=fed.lora_rank,
        frozen_experts=fed.frozen_experts,
        seed=fed.seed,
        eval_data=str(fed.eval_data.resolve()),
        fit=fed.fit,
        privacy=fed.privacy,
        host=fed.ray.listen_host if fed.ray else "127.0.0.1",
    )


class Watch:
    """Reads a running federation's registry: new model versions, and each round's per-device facts."""

    def __init__(self, cfg: CoordinatorConfig):
        self.registry = Registry(cfg.registry_url)
        self.store = TensorStore(Path(cfg.state_dir) / "tensors")
        devices = self.registry.list_devices()
        self.names = {d.id: d.name for d in devices}
        self.backends = {d.id: str((d.profile or {}).get("backend", "")) for d in devices}
        self.num_experts = model_shape(cfg.checkpoint).num_experts

    def scored_round(self, strategy: str, version: int, peak: dict) -> RoundRecord | None:
        """The record of the round that made model ``version``, once the coordinator has scored it."""
        row = self.registry.get_model_version(version)
        if row is None:
            return None
        scores = {m.name: m.value for m in self.registry.metrics(round_id=row.round_id) if m.device_id is None}
        if not {"eval_accuracy", "eval_loss"} <= scores.keys():
            return None
        devices = self.device_rounds(row.round_id, peak)
        round_row = self.registry.get_round(row.round_id)
        wall = (round_row.finished_at - round_row.started_at).total_seconds() if round_row.finished_at else 0.0
        fed_loss, fed_accuracy, fed_examples = self.federated(row.round_id)
        return RoundRecord(
            strategy,
            version,
            scores["eval_accuracy"],
            scores["eval_loss"],
            wall,
            sum(d.bytes_up for d in devices),
            sum(d.bytes_down for d in devices),
            devices,
            fed_loss,
            fed_accuracy,
            fed_examples,
        )

    def federated(self, round_id: int) -> tuple[float | None, float | None, int]:
        """The round's federated evaluation as the coordinator logged it (``Coordinator._log_federated_evaluation``):
        ``(loss, accuracy, examples)``, None / 0 where there is none."""
        logged = {m.name: m.value for m in self.registry.metrics(round_id=round_id) if m.device_id is None}
        return (
            logged.get(FED_EVAL + "loss"),
            logged.get(FED_EVAL + "accuracy"),
            int(logged.get(FED_EVAL + "num_examples", 0)),
        )

    def device_rounds(self, round_id: int, peak: dict) -> tuple[DeviceRound, ...]:
        """Per device of ``round_id``: its training loss, bytes up / down, peak RSS (MiB), experts kept, and its
        score of the model it received on its held-out records (``Update.evaluation``, stored with the update)."""
        moved: dict[tuple[str, str], int] = {}
        for metric in self.registry.metrics(round_id=round_id):
            if metric.device_id is not None:
                key = (metric.device_id, metric.name)
                moved[key] = moved.get(key, 0) + int(metric.value)
        updates = {u.device_id: u for u in self.registry.accepted_updates(round_id)}
        rows = []
        for assignment in self.registry.assignments(round_id):
            device = assignment.device_id
            meta = (updates[device].meta or {}) if device in updates else {}
            metrics, scored = meta.get("metrics", {}), meta.get("evaluation") or {}
            rss = metrics.get("peak_rss_mb")
            rows.append(
                DeviceRound(
                    device=self.names.get(device, device),
                    loss=metrics.get("loss"),
                    bytes_up=moved.get((device, "bytes_up"), 0),
                    bytes_down=moved.get((device, "bytes_down"), 0),
                    peak_rss_mib=rss,
                    experts_kept=max(len(ids) for ids in assignment.expert_ids),
                    experts=experts_label(assignment.expert_ids),
                    frozen=ShapeKey.from_id(assignment.shape_key).held_label(self.num_experts),
                    eval_loss=scored.get("loss"),
                    eval_examples=int(scored.get("num_examples", 0)),
                    backend=self.backends.get(device, ""),
                    train_s=metrics.get("train_seconds"),
                )
            )
            if rss is not None:
                peak[rows[-1].device] = max(peak.get(rows[-1].device, 0.0), float(rss))
        return tuple(rows)

    def close(self) -> None:
        self.registry.close()


def participants(fed: Federation, cfg: CoordinatorConfig) -> list[tuple[SimulatedDevice, Path]]:
    """The devices (with their data files) the strategy gives work in round 1. A simulated budget never changes,
    so any other device would sit out every round (e.g. ``dense-fedavg`` and a device that cannot hold every
    expert): it is not started, and the round quorum counts only the participants.

    Raises:
        FedmoeError: no device gets anything to train.
    """
    strategy = make_strategy(dataclasses.replace(cfg, strategy=fed.strategy)).bind(fit_context(cfg))
    planned = strategy.configure_fit(
        1, {}, [ClientInfo(d.name, {"memory_mib": d.memory_mib, "backend": d.backend}) for d in fed.devices]
    )
    chosen = [(d, f) for d, f in zip(fed.devices, fed.data_files) if d.name in planned]
    if not chosen:
        raise FedmoeError(
            f"{fed.strategy} gives none of the {len(fed.devices)} devices anything to train "
            "(their budgets cannot hold what it trains)"
        )
    return chosen


def _start_devices(
    fed: Federation, devices: Sequence[tuple[SimulatedDevice, Path]], out: Path, cfg: CoordinatorConfig, url: str
) -> Sequence[Child | RemoteChild]:
    registry = Registry(cfg.registry_url)
    try:
        tokens = [pinned_token(registry.create_enroll_token(d.name, 600), cfg) for d, _ in devices]
    finally:
        registry.close()
    if fed.ray is not None:
        from coordinator.simulation.ray_pool import start_devices

        placed = [(d.name, d.memory_mib, d.backend, data) for d, data in devices]
        return start_devices(fed.ray, placed, tokens, url, out, slots=fed.slots, max_message_mib=cfg.max_message_mib)
    children, slots = [], f"{out / 'slots'}:{fed.slots}"
    for (device, data), token in zip(devices, tokens):
        home = out / "devices" / device.name
        enroll_device(url, token, device.name, home, device.memory_mib, device.backend)
        children.append(
            start_device(
                url,
                device.name,
                home,
                data,
                device.memory_mib,
                threads=1,
                slots=slots,
                max_message_mib=cfg.max_message_mib,
                backend=device.backend,
            )
        )
    return children


def _check_alive(children: Sequence[Child | RemoteChild]) -> None:
    """Raise naming any device that died (e.g. its bundle did not fit its memory limit)."""
    for child in children:
        if child.poll() is not None:
            raise FedmoeError(
                f"device {child.name} (memory limit {child.extra.get('memory_mib')} MiB) exited with status "
                f"{child.returncode}; its log ends:\n{child.tail(8)}"
            )


def run_federation(
    fed: Federation, out: Path, on_round: Callable[[RoundRecord], None], *, poll_s: float = 1.0
) -> tuple[list[RoundRecord], dict]:
    """Run ``fed`` to completion in ``out``; returns its round records and each device's peak RSS (MiB).
    The final global model is written to ``out / "model"`` (a Hugging Face checkpoint directory). With ``fed.ray``,
    where each device ran (Ray node id and host name) is written to ``out / "placement.json"``.

    ``on_round`` sees each record once the coordinator has scored the round's model version.

    Raises:
        FedmoeError: the coordinator or a device process died, or a round failed for good.
    """
    out.mkdir(parents=True, exist_ok=True)
    cfg = coordinator_config(fed, out, free_port())
    version = initialize(cfg, list(fed.calibration_texts), seq_len=fed.fit.seq_len)
    # devices enroll and run over mutual TLS, as in a deployment; on Ray they reach the coordinator at its host
    hosts = [fed.ray.coordinator_host] if fed.ray else []
    cfg = with_new_authority(cfg, hosts)
    devices = participants(fed, cfg)
    # The largest message is an assignment of every expert (the global state) plus its header.
    state_mib = TensorStore(Path(cfg.state_dir) / "tensors").path(version.tensor_sha256).stat().st_size / MIB
    cfg = dataclasses.replace(
        cfg,
        max_message_mib=max(cfg.max_message_mib, math.ceil(state_mib * 1.05) + 16),
        rounds=dataclasses.replace(cfg.rounds, min_fit_clients=len(devices), max_fit_clients=len(devices)),
    )
    save_config(cfg, out / "fedmoe-coord.toml")
    coordinator = start_coordinator(out / "fedmoe-coord.toml", out / "coordinator.log")
    children: Sequence[Child | RemoteChild] = []
    peak: dict[str, float] = {}
    url = local_url(cfg) if fed.ray is None else f"wss://{_url_host(fed.ray.coordinator_host)}:{cfg.port}"
    try:
        wait_healthy(cfg.port, coordinator, cafile=cfg.tls_ca_cert)
        children = _start_devices(fed, devices, out, cfg, url)
        if fed.ray is not None:
            placement = {c.name: {k: c.extra[k] for k in ("node_id", "host")} for c in children}
            (out / "placement.json").write_text(json.dumps(placement, indent=2))
        records = _watch_rounds(fed, cfg, coordinator, children, on_round, peak, poll_s)
    finally:
        for child in children:
            child.stop()
        coordinator.stop()
    for child in children:  # the OS's view: the device process's whole-life peak RSS
        peak[child.name] = max(peak.get(child.name, 0.0), child.peak_rss_mib or 0.0)
    export_latest(cfg, out / "model")  # the final global model as a Hugging Face checkpoint directory
    return records, peak


def _url_host(host: str) -> str:
    """``host`` as it goes in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def _watch_rounds(fed, cfg, coordinator, children, on_round, peak, poll_s) -> list[RoundRecord]:
    watch = Watch(cfg)
    records, progress = [], time.monotonic()
    try:
        while len(records) < fed.rounds:
            if coordinator.poll() is not None:
                raise FedmoeError(f"the coordinator exited ({coordinator.returncode}):\n{coordinator.tail(20)}")
            _check_alive(children)
            record = watch.scored_round(fed.strategy, len(records) + 1, peak)
            if record is None:
                _check_failed_rounds(watch, fed.strategy)
                _check_progress(progress, fed, children)
                time.sleep(poll_s)
                continue
            records.append(record)
            progress = time.monotonic()
            on_round(record)
    finally:
        watch.close()
    return records


def _check_progress(since: float, fed: Federation, children: Sequence[Child]) -> None:
    """Raise if no round was scored for 1.5 round deadlines plus a minute (e.g. a device hangs connected
    but silent, so no round can start or reach its quorum); names every device's last log line."""
    stalled = time.monotonic() - since
    if stalled > 1.5 * fed.round_deadline_s + 60:
        tails = "\n".join(f"  {c.name}: {c.tail(1)}" for c in children)
        raise FedmoeError(f"{fed.strategy}: no round finished in {stalled:.0f} s; devices' last log lines:\n{tails}")


def _check_failed_rounds(watch: Watch, strategy: str, limit: int = 3, *, grace_s: float = 120.0) -> None:
    """Raise after ``limit`` failed rounds in a row, or when the newest round failed over ``grace_s`` seconds ago
    and none started since: the coordinator excludes a device that failed twice for a back-off, and the
    simulation's quorum (every participant) can then never be met again."""
    rounds = watch.registry.list_rounds(limit=limit)
    failed = [r for r in rounds if r.status == "failed"]
    if len(failed) >= limit:
        raise FedmoeError(f"{strategy}: {limit} rounds failed ({failed[0].metrics}); see coordinator.log")
    newest = rounds[0] if rounds else None
    if newest is not None and newest.status == "failed" and newest.finished_at is not None:
        finished = newest.finished_at if newest.finished_at.tzinfo else newest.finished_at.replace(tzinfo=UTC)
        idle = (utc_now() - finished).total_seconds()
        if idle > grace_s:
            raise FedmoeError(
                f"{strategy}: round {newest.id} failed ({newest.metrics}) and no round started in the "
                f"{idle:.0f} s since (a device excluded for repeated failures leaves the quorum of "
                "every participant unmet); see coordinator.log and the devices' logs"
            )
