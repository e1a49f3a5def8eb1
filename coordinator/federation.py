"""The coordinator's model side, free of networking: state layout, the initial global state, the
calibration statistics, and one round's aggregation streamed over the stored updates.

State directory layout::

    <state_dir>/tensors/           content-addressed safetensors (global versions, their strategy states,
                                   device updates)
    <state_dir>/bundles/<shape>/   bundle store by shape key id
    <state_dir>/calibration.json   RoutingStats.to_dict() of the calibration pass
    <state_dir>/registry.db        the SQL registry (unless database_url points elsewhere)
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load, load_file, save

from coordinator.config import PRUNED, CoordinatorConfig
from coordinator.planning import to_client_update
from coordinator.registry import Registry
from coordinator.registry.tables import ModelVersion, UpdateRecord
from coordinator.secagg import SecureRound, masked_payload, secure_sums
from coordinator.strategy.base import Strategy
from coordinator.strategy.dp_fedavg import DPFedAvg
from coordinator.strategy.types import Aggregated, ClientEvaluation, ClientUpdate, FitContext, Params, StrategyState
from coordinator.tensor_store import TensorStore
from device_runtime.errors import ConfigError
from device_runtime.stats import RoutingStats

log = logging.getLogger("fedmoe.coord")
CALIBRATION_FILE = "calibration.json"


def fit_context(cfg: CoordinatorConfig) -> FitContext:
    """What the strategy's ``configure_fit`` needs from an initialised federation (``bind``).

    Raises:
        ConfigError: the state directory holds no calibration (run ``fedmoe-coord init``). ModelError: bad checkpoint.
    """
    from export.planner import model_shape

    return FitContext(
        model_shape(cfg.checkpoint),
        load_calibration(cfg),
        cfg.fit,
        cfg.trainable_mode,
        cfg.lora_rank,
        cfg.seed,
        None if cfg.frozen_experts == PRUNED else cfg.frozen_experts,
        split=cfg.split,
    )


def tensor_store(cfg: CoordinatorConfig) -> TensorStore:
    return TensorStore(Path(cfg.state_dir) / "tensors")


def load_calibration(cfg: CoordinatorConfig) -> RoutingStats:
    """The calibration RoutingStats written by :func:`initialize`.

    Raises:
        ConfigError: the file is missing or malformed (run ``fedmoe-coord init``).
    """
    path = Path(cfg.state_dir) / CALIBRATION_FILE
    try:
        return RoutingStats.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}); run `fedmoe-coord init` first") from exc


def initialize(cfg: CoordinatorConfig, texts: Sequence[str], *, seq_len: int = 128) -> ModelVersion:
    """Create the registry, global state version 0 and the calibration statistics (needs torch).

    Args:
        texts: calibration sample (e.g. ``export.calibration.default_texts()``), each truncated to ``seq_len`` tokens.
    Raises:
        ConfigError: the registry already has a model version (this state directory is initialised).
        ModelError: the checkpoint cannot be loaded.
    """
    from export.global_state import init_global_state

    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    registry = Registry(cfg.registry_url)
    try:
        if registry.latest_model_version() is not None:
            raise ConfigError(f"{cfg.registry_url} already holds a global model; use a new --state-dir")
        with tempfile.TemporaryDirectory() as tmp:
            state_file = Path(tmp) / "state.safetensors"
            init_global_state(
                cfg.checkpoint, state_file, trainable_mode=cfg.trainable_mode, lora_rank=cfg.lora_rank, seed=cfg.seed
            )
            sha = tensor_store(cfg).put(load_file(str(state_file)))
        stats = _calibrate(cfg.checkpoint, texts, seq_len)
        (Path(cfg.state_dir) / CALIBRATION_FILE).write_text(json.dumps(stats.to_dict()))
        return registry.add_model_version(sha, metrics={"calibration_tokens": stats.num_tokens})
    finally:
        registry.close()


def _calibrate(checkpoint: str, texts: Sequence[str], seq_len: int) -> RoutingStats:
    from export.calibration import calibrate
    from export.loading import load_causal_lm

    stats = calibrate(load_causal_lm(checkpoint), Path(checkpoint) / "tokenizer.json", texts, seq_len=seq_len)
    if stats.num_tokens == 0:
        raise ConfigError("the calibration texts produced no tokens; pass a non-empty sample")
    return stats


class GlobalModel:
    """The latest global state in memory (name -> float32 array, expert axis 0), its version, and the strategy
    state committed with it (``strategy_state``: {} until :meth:`restore`)."""

    def __init__(self, registry: Registry, store: TensorStore):
        self.registry, self.store = registry, store
        latest = registry.latest_model_version()
        if latest is None:
            raise ConfigError("the registry holds no global model; run `fedmoe-coord init` first")
        self.version, self.params = latest.version, self._load(latest.tensor_sha256)
        self.strategy_state: StrategyState = {}

    def _load(self, sha: str) -> Params:
        return {name: np.asarray(t, dtype=np.float32) for name, t in self.store.load(sha).items()}

    def discard(self, shas: Iterable[str]) -> int:
        """Delete the tensor files of ``shas`` but those the registry still references
        (``Registry.referenced_shas``: a global version byte-identical to an update shares its file); returns
        the bytes freed. Raises OSError (a file could not be deleted)."""
        return self.store.discard(set(shas) - self.registry.referenced_shas())

    def check_store(self, *, delete_orphans: bool) -> tuple[list[str], int]:
        """Startup consistency check of the tensor store against the registry: returns the referenced files
        that are missing (sha256, for the log) and the bytes freed by deleting orphans (files no registry row
        names, e.g. left by a crash between a file write and its row) when ``delete_orphans``."""
        referenced, stored = self.registry.referenced_shas(), self.store.shas()
        orphans = stored - referenced - set(self.registry.update_shas()) if delete_orphans else set()
        return sorted(referenced - stored), self.store.discard(orphans)

    def commit(self, params: Params, round_id: int, metrics: dict, state: StrategyState) -> ModelVersion:
        """Store ``params`` and the strategy ``state`` that produced them (atomic file writes first; the state in
        its own dtypes), then record the version naming both in one transaction."""
        sha = self.store.put({n: np.ascontiguousarray(a, dtype=np.float32) for n, a in params.items()})
        state_sha = self.store.put(save({k: np.ascontiguousarray(a) for k, a in state.items()}))
        row = self.registry.add_model_version(sha, round_id=round_id, metrics=metrics, strategy_state_sha256=state_sha)
        self.version, self.params, self.strategy_state = row.version, params, state
        return row

    def restore(self, strategy: Strategy) -> None:
        """Set :attr:`strategy_state` to the state committed with the latest version, so that ``strategy`` goes on
        as if the coordinator had not stopped; logged. A version of another strategy, or of a fedmoe before
        durable strategy state, gives ``strategy.initial_state()`` (a warning).

        Raises:
            ConfigError: the stored state does not fit ``strategy``. ModelError: its file is missing or corrupted.
        """
        self.strategy_state = strategy.initial_state()
        latest = self.registry.latest_model_version()
        if latest.round_id is None:
            return  # version 0: no round made it
        made_by = self.registry.get_round(latest.round_id).strategy
        if latest.strategy_state_sha256 is None or made_by != strategy.name:
            log.warning(
                "model version %d carries no %s state (made by %s%s): %s starts from its initial state",
                latest.version,
                strategy.name,
                made_by,
                "" if latest.strategy_state_sha256 else " before durable strategy state",
                strategy.name,
            )
            return
        state = self.strategy_state = strategy.check_state(load(self.store.get(latest.strategy_state_sha256)))
        log.info("restored the %s state of model version %d (%d arrays)", strategy.name, latest.version, len(state))


def stored_updates(store: TensorStore, rows: Sequence[UpdateRecord]) -> Callable[[], Iterator[ClientUpdate]]:
    """A re-openable stream of ClientUpdates read one at a time from the tensor store (memory: one update)."""

    def open_stream() -> Iterator[ClientUpdate]:
        for row in rows:
            tensors = store.load(row.tensor_sha256)
            yield to_client_update(row.device_id, row.num_examples, row.meta, tensors)

    return open_stream


def aggregate_round(
    model: GlobalModel,
    strategy: Strategy,
    rows: Sequence[UpdateRecord],
    failures: Sequence[tuple[str, str]],
    *,
    server_round: int,
    round_id: int,
    sampling_rate: float = 1.0,
) -> ModelVersion:
    """Aggregate the accepted updates ``rows`` of a round and commit the new global version.

    The rows are taken in device id order, not arrival order: float sums in another order can differ in the
    last bit, and the new version should not depend on which device was faster.

    Args:
        server_round: the strategy's 1-based round number (rounds that produced a model, this one included).
        round_id: the registry's id of the round (the new version records it).
        sampling_rate: the round's share of the eligible devices selected (``RoundEngine.sampling_rate``), for a
            differentially private strategy's accountant; its epsilon spent is also logged as the round's
            ``dp_epsilon`` metric.
    The round starts from ``model.strategy_state``; the state the strategy returns becomes it only with a committed
    version (``GlobalModel.commit``).

    Raises:
        ModelError: a stored update file is missing or corrupted.
    """
    rows = sorted(rows, key=lambda r: r.device_id)
    results = stored_updates(model.store, rows)
    if isinstance(strategy, DPFedAvg):
        aggregated = strategy.aggregate_fit(
            server_round, results, failures, model.params, model.strategy_state, sampling_rate=sampling_rate
        )
    else:
        aggregated = strategy.aggregate_fit(server_round, results, failures, model.params, model.strategy_state)
    return _commit(model, strategy, aggregated, rows, failures, server_round=server_round, round_id=round_id)


def aggregate_secure_round(
    model: GlobalModel,
    strategy: Strategy,
    secure: SecureRound,
    rows: Sequence[UpdateRecord],
    failures: Sequence[tuple[str, str]],
    *,
    server_round: int,
    round_id: int,
    sampling_rate: float = 1.0,
) -> ModelVersion:
    """:func:`aggregate_round` for a securely aggregated round: the revealed shares give the secrets
    (``SecureRound.secrets``), the masked payloads of ``rows`` (the accepted ``SecAggMasked``, read one at a time)
    their per-row sums (``coordinator.secagg.secure_sums``), which the strategy's ``aggregate_secure`` merges.
    Nothing is committed unless every step succeeds.

    Raises:
        ProtocolError: fewer than t devices revealed, a reconstructed key is wrong, or a payload does not fit.
        ModelError: a stored payload is missing or corrupted.
    """
    seeds, masks = secure.secrets()
    sha = {r.device_id: r.tensor_sha256 for r in rows}
    sums = secure_sums(secure, lambda device: masked_payload(model.store.get(sha[device])), model.params, seeds, masks)
    aggregated = strategy.aggregate_secure(
        server_round, sums, failures, model.params, model.strategy_state, sampling_rate=sampling_rate
    )
    return _commit(model, strategy, aggregated, rows, failures, server_round=server_round, round_id=round_id)


def _commit(
    model: GlobalModel,
    strategy: Strategy,
    aggregated: Aggregated,
    rows: Sequence[UpdateRecord],
    failures: Sequence[tuple[str, str]],
    *,
    server_round: int,
    round_id: int,
) -> ModelVersion:
    """Commit a round's aggregate as the next version, with its metrics (JSON-safe), the devices' mean training
    loss and the federated evaluation; log ``dp_epsilon`` as a round metric when the strategy reports one."""
    params, metrics, state = aggregated
    metrics = json.loads(json.dumps(metrics, default=float))  # JSON-safe (int keys -> strings)
    metrics["train_loss"] = _mean_loss(rows)
    metrics.update(federated_evaluation(strategy, server_round, rows, failures))
    version = model.commit(params, round_id, metrics, state)
    if "dp_epsilon" in metrics:
        model.registry.log_metrics({"dp_epsilon": metrics["dp_epsilon"]}, round_id=round_id)
    return version


def privacy_budget(strategy: Strategy, model: GlobalModel) -> Callable[[float], str | None] | None:
    """The round engine's ``budget`` for ``strategy``: whether a round with a given sampling rate may start from
    the strategy state ``model`` holds now (``DPFedAvg.budget_exceeded``); None for a strategy without DP."""
    if not isinstance(strategy, DPFedAvg):
        return None
    return lambda sampling_rate: strategy.budget_exceeded(model.strategy_state, sampling_rate)


FED_EVAL = "fed_eval_"
"""Prefix of the federated-evaluation metrics of a round (``fed_eval_loss``, ``fed_eval_accuracy`` ...), apart from
the coordinator's own held-out score of the new version (``eval_loss``, ``eval_accuracy``)."""


def client_evaluations(rows: Sequence[UpdateRecord]) -> list[ClientEvaluation]:
    """The devices' held-out scores in the accepted updates ``rows`` (``planning.check_evaluation`` wrote them in
    ``meta["evaluation"]``), each tagged with its assignment's shape key; rows without one are left out."""
    out = []
    for row in rows:
        scored = (row.meta or {}).get("evaluation")
        if scored:
            extra = {k: float(v) for k, v in scored.items() if k not in ("loss", "num_examples")}
            out.append(
                ClientEvaluation(
                    row.device_id,
                    float(scored["loss"]),
                    int(scored["num_examples"]),
                    extra,
                    str(row.meta.get("shape_key", "")),
                )
            )
    return out


def federated_evaluation(
    strategy: Strategy, server_round: int, rows: Sequence[UpdateRecord], failures: Sequence[tuple[str, str]]
) -> dict:
    """The round's federated evaluation as version metrics: the strategy's ``aggregate_evaluate`` of the devices'
    scores of the model the round STARTED from (the previous version), as ``fed_eval_loss`` (nats per completion
    token, example-weighted), ``fed_eval_<metric>`` (``num_examples``, ``num_clients``, ``num_failures``,
    ``accuracy`` where devices computed it ...) and ``fed_eval_devices``: per device its ``loss``,
    ``num_examples``, other numbers and ``shape_key`` (what it held: a pruned bundle scores only its kept experts).
    {} when no device sent a score (``eval_fraction`` 0)."""
    results = client_evaluations(rows)
    if not results:
        return {}
    loss, metrics = strategy.aggregate_evaluate(server_round, results, failures)
    out = {FED_EVAL + "loss": loss, **{FED_EVAL + k: float(v) for k, v in metrics.items()}}
    out[FED_EVAL + "devices"] = {
        r.client_id: {"loss": r.loss, "num_examples": r.num_examples, **r.metrics, "shape_key": r.shape_key}
        for r in results
    }
    return out


def _mean_loss(rows: Sequence[UpdateRecord]) -> float | None:
    """num_examples-weighted mean of the devices' reported ``loss``; the plain mean when no row has a count (a
    securely aggregated round records none: its weights are masked)."""
    pairs = [(r.num_examples, r.meta.get("metrics", {}).get("loss")) for r in rows]
    pairs = [(n, float(l)) for n, l in pairs if l is not None]
    if pairs and not any(n for n, _ in pairs):
        pairs = [(1, l) for _, l in pairs]
    total = sum(n for n, _ in pairs)
    return sum(n * l for n, l in pairs) / total if total else None


def export_latest(cfg: CoordinatorConfig, out_dir: str | Path) -> int:
    """Write the latest global version merged into the checkpoint as a Hugging Face checkpoint directory
    ``out_dir`` (needs torch); returns the version number.

    Raises:
        ConfigError: there is no global model yet (run ``fedmoe-coord init``).
    """
    from export.global_state import export_checkpoint

    registry = Registry(cfg.registry_url)
    try:
        latest = registry.latest_model_version()
    finally:
        registry.close()
    if latest is None:
        raise ConfigError("no global model yet; run `fedmoe-coord init` first")
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.safetensors"
        state.write_bytes(tensor_store(cfg).get(latest.tensor_sha256))
        export_checkpoint(cfg.checkpoint, state, out_dir)
    return latest.version
