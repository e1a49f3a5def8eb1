"""The coordinator's configuration: one TOML file, read into a frozen :class:`CoordinatorConfig`.

Example (``fedmoe-coord init`` writes one)::

    checkpoint = "moe"                      # HF MoE checkpoint directory (the frozen model)
    state_dir = "state"                     # tensor store, bundle store, calibration statistics
    database_url = ""                       # "" = sqlite:///<state_dir>/registry.db
    host = "127.0.0.1"
    port = 8765
    max_message_mib = 256
    max_connections = 4096                  # connections in total (also capped by the descriptor limit)
    max_unauthenticated_per_address = 32    # connections per address that have not logged in yet
    login_timeout_s = 30                    # seconds from TCP accept to a completed login
    handshake_timeout_s = 10                # seconds from TCP accept to a completed TLS handshake
    certified_share = 0.25                  # share of max_connections only client-certified peers may use
    strategy = "hfedmoe"
    trainable_mode = "experts"              # or "lora" (with lora_rank > 0)
    lora_rank = 0
    frozen_experts = "float16"              # experts a device does not train: resident, frozen ("pruned": dropped)
    update_norm_bound = 1e4                 # L2 norm bound of one update tensor
    keep_update_tensors = false             # true: keep devices' update files after their round is aggregated
    tls_cert = "state/tls/server.pem"      # written by init, with tls_key and the CA: wss:// + mutual TLS
    tls_key = "state/tls/server.key"
    tls_ca_cert = "state/tls/ca.pem"        # issues the devices' client certificates ("" = no mutual TLS)
    tls_ca_key = "state/tls/ca.key"         # also signs bundles and assignments (device_runtime.signing)
    insecure = false                        # true: plain ws:// (no TLS), with a loud warning
    eval_data = ""                          # held-out JSONL: every new model version is scored on it
    eval_text_field = "text"
    eval_label_field = "label"

    [strategy_params]
    tau = 0.01

    [rounds]                                # coordinator.rounds.RoundPolicy fields
    min_fit_clients = 2
    max_fit_clients = 10
    fraction_fit = 1.0
    deadline_s = 600                        # seconds a round collects updates
    max_attempts = 3                        # consecutive failed rounds before rounds back off (and an alert)
    backoff_s = 10                          # first back-off of rounds, and exclusion of a failing device
    max_backoff_s = 600                     # (both double per failure up to this)
    num_rounds = 0                          # 0: keep running rounds

    [privacy]                               # coordinator.privacy.PrivacyConfig fields (strategy = "dp-fedavg")
    noise_multiplier = 1.0                  # z; 0 (the default): no differential privacy
    clip = 0.1                              # S, L2 clip of a device's update delta (or target_quantile: adaptive)
    delta = 1e-5
    epsilon_budget = 8.0                    # rounds stop before epsilon would pass it (0: no budget)
    secure_aggregation = true               # the coordinator sees only each row's sum (coordinator.secagg)
    secure_min_holders = 2                  # rows with fewer holders keep their global value that round

    [split]                                 # device_runtime.wire.SplitConfig fields: devices with the
    cut_layer = 1                           # split backend train layers < cut_layer with the coordinator
    perturbations = 2                       # (HO-SFL); keep_ratio < 1: ACP-SL prunes their smashed data
    keep_ratio = 1.0
    learning_rate = 1e-5                    # the bottom's SGD step size

    [fit]                                   # device_runtime.wire.FitConfig fields
    batch_size = 8
    seq_len = 128
    learning_rate = 1e-4
    local_steps = 10
    labels = ["business", "sport", "tech"]  # the candidate labels of classification data, and
    logit_adjustment = 1.0                  # tau of each device's balanced softmax over them (0 = off)
    eval_fraction = 0.1                     # local records each device holds out and scores the received
                                            # model on before training (federated evaluation; 0 = off)

Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

from coordinator.privacy import PrivacyConfig
from coordinator.rounds import RoundPolicy
from device_runtime.errors import ConfigError
from device_runtime.modes import lora_rank_mismatch
from device_runtime.shape_key import FROZEN_DTYPES, TRAINABLE_MODES
from device_runtime.units import MIB
from device_runtime.wire import FitConfig, SplitConfig, validate

if TYPE_CHECKING:
    from coordinator.strategy import Strategy

PRUNED = "pruned"
DEFAULT_CUT_LAYER = 1  # [split] cut_layer when the config does not set it: the device runs the embeddings + layer 0
DEFAULT_EVAL_FRACTION = 0.1  # [fit] eval_fraction when the config does not set it (FitConfig's own default is 0)
FROZEN_EXPERTS = (*FROZEN_DTYPES, PRUNED)

# top-level keys of configs written before the [rounds] table -> their name there
MOVED_TO_ROUNDS = {
    "min_fit_clients": "min_fit_clients",
    "max_fit_clients": "max_fit_clients",
    "fraction_fit": "fraction_fit",
    "round_deadline_s": "deadline_s",
    "max_round_attempts": "max_attempts",
    "retry_backoff_s": "backoff_s",
    "max_retry_backoff_s": "max_backoff_s",
    "num_rounds": "num_rounds",
}
_PATHS = ("checkpoint", "state_dir", "tls_cert", "tls_key", "tls_ca_cert", "tls_ca_key", "eval_data")


@dataclass(frozen=True)
class CoordinatorConfig:
    """Every coordinator setting (see the module docstring for the TOML layout).

    Attributes:
        checkpoint: MoE checkpoint directory. state_dir: coordinator state (tensors, bundles, statistics).
        database_url: SQLAlchemy URL of the registry ("" = SQLite file in ``state_dir``).
        host, port: where to listen (port 0: any free port). max_message_mib: largest websocket message (MiB).
        max_connections, max_unauthenticated_per_address, login_timeout_s, handshake_timeout_s,
            certified_share: admission control (``coordinator.admission``, ``coordinator.accept``; seconds;
            certified_share is the fraction of max_connections kept for peers that present a client
            certificate of this CA, with mutual TLS only).
        strategy, strategy_params: aggregation strategy name and keyword arguments.
        rounds: how rounds run, the ``[rounds]`` table (``coordinator.rounds.RoundPolicy``: client selection,
            deadline, back-off of failed rounds and failing devices, rounds to run); a dict of its fields is
            accepted. trainable_mode, lora_rank: what devices train.
        privacy: client-level differential privacy, the ``[privacy]`` table (``coordinator.privacy.PrivacyConfig``;
            a dict of its fields is accepted): noise_multiplier > 0 needs strategy ``"dp-fedavg"``.
        frozen_experts: what a device holds of the experts it does not train: ``"float16"``, every one, frozen in
            float16, so its forward pass routes over the whole global model (HFedMoE's design; experts mode,
            first-order devices whose budget affords it, ``export.planner``); ``"pruned"``, none (the router
            and top-k shrink to the trained experts: ``export.prune``).
        split: split mode, the ``[split]`` table (``device_runtime.wire.SplitConfig``; a dict of its fields is
            accepted): where devices with the ``split`` backend are cut and how they step (HO-SFL, ACP-SL).
        update_norm_bound: largest L2 norm of one update tensor.
        fit: the local training settings every round starts from (a dict of FitConfig fields is accepted; a dict
            or the default without ``eval_fraction`` gets :data:`DEFAULT_EVAL_FRACTION`: each device holds out that
            share of its records and scores the model it receives on them, federated evaluation).
        keep_update_tensors: keep the devices' update files in the tensor store once their round is aggregated
            (default: delete them; their registry rows stay).
        tls_cert, tls_key: PEM files; both set = serve ``wss://``. tls_ca_cert, tls_ca_key: the CA that issues
            devices' client certificates (``coordinator.tls``); set = login needs mutual TLS; the CA key also
            signs bundles and assignments, with or without TLS (``device_runtime.signing``). insecure: serve
            plain ``ws://`` without TLS files (refused otherwise). heartbeat_s: keep-alive interval (seconds).
        seed: client-sampling seed.
        eval_data: held-out JSONL set ("" = none); each new global version is scored on it by label
            log-likelihood (``coordinator.evaluation``). eval_text_field, eval_label_field: its fields.
    """

    checkpoint: str
    state_dir: str = "state"
    database_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8765
    max_message_mib: float = 256.0
    max_connections: int = 4096
    max_unauthenticated_per_address: int = 32
    login_timeout_s: float = 30.0
    handshake_timeout_s: float = 10.0
    certified_share: float = 0.25
    strategy: str = "hfedmoe"
    strategy_params: dict = field(default_factory=dict)
    rounds: RoundPolicy = field(default_factory=RoundPolicy)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    split: SplitConfig = field(default_factory=lambda: SplitConfig(cut_layer=DEFAULT_CUT_LAYER))
    trainable_mode: str = "experts"
    lora_rank: int = 0
    frozen_experts: str = "float16"
    update_norm_bound: float = 1e4
    keep_update_tensors: bool = False
    fit: FitConfig = field(default_factory=lambda: FitConfig(eval_fraction=DEFAULT_EVAL_FRACTION))
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca_cert: str = ""
    tls_ca_key: str = ""
    insecure: bool = False
    heartbeat_s: float = 20.0
    seed: int = 0
    eval_data: str = ""
    eval_text_field: str = "text"
    eval_label_field: str = "label"

    def __post_init__(self):
        if isinstance(self.rounds, dict):
            try:
                object.__setattr__(self, "rounds", RoundPolicy(**self.rounds))
            except TypeError as exc:
                raise ConfigError(f"config [rounds]: {exc}") from exc
        if isinstance(self.privacy, dict):
            try:
                object.__setattr__(self, "privacy", PrivacyConfig(**self.privacy))
            except TypeError as exc:
                raise ConfigError(f"config [privacy]: {exc}") from exc
        if isinstance(self.split, dict):
            try:
                object.__setattr__(self, "split", validate(SplitConfig, {"cut_layer": DEFAULT_CUT_LAYER, **self.split}))
            except ValueError as exc:
                raise ConfigError(f"config [split]: {exc}") from exc
        if isinstance(self.fit, dict):
            try:
                fit = {"eval_fraction": DEFAULT_EVAL_FRACTION, **self.fit}
                object.__setattr__(self, "fit", FitConfig.from_dict(fit))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"config [fit]: {exc}") from exc
        try:
            _check(self)
        except TypeError as exc:  # e.g. a string where TOML should hold a number
            raise ConfigError(f"config: a value has the wrong type ({exc})") from exc

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mib * MIB)

    @property
    def registry_url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.state_dir) / 'registry.db'}"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def mutual_tls(self) -> bool:
        return self.tls and bool(self.tls_ca_cert)


def _check(cfg: CoordinatorConfig) -> None:
    """Raise ConfigError naming the first invalid value."""
    problems = [
        (not cfg.checkpoint, "checkpoint must name the MoE checkpoint directory"),
        (not 0 <= cfg.port <= 65535, f"port {cfg.port} is not in [0, 65535]"),
        (not 0 < cfg.max_message_mib <= 4096, f"max_message_mib {cfg.max_message_mib} is not in (0, 4096]"),
        (cfg.trainable_mode not in TRAINABLE_MODES, f"trainable_mode must be one of {TRAINABLE_MODES}"),
        (
            lora_rank_mismatch(cfg.trainable_mode, cfg.lora_rank) is not None,
            "lora_rank > 0 exactly when trainable_mode is lora",
        ),
        (cfg.frozen_experts not in FROZEN_EXPERTS, f"frozen_experts must be one of {FROZEN_EXPERTS}"),
        (not (cfg.update_norm_bound > 0 and math.isfinite(cfg.update_norm_bound)), "update_norm_bound must be > 0"),
        (bool(cfg.tls_cert) != bool(cfg.tls_key), "set both tls_cert and tls_key, or neither"),
        (bool(cfg.tls_ca_cert) != bool(cfg.tls_ca_key), "set both tls_ca_cert and tls_ca_key, or neither"),
        (
            bool(cfg.tls_ca_cert) and not cfg.tls and not cfg.insecure,
            "tls_ca_cert needs tls_cert and tls_key (or insecure = true: the CA key then only signs)",
        ),
        (not isinstance(cfg.insecure, bool), "insecure must be true or false"),
        (not cfg.heartbeat_s > 0, "heartbeat_s must be > 0"),
        (
            cfg.max_connections < 1 or cfg.max_unauthenticated_per_address < 1,
            "max_connections and max_unauthenticated_per_address must be >= 1",
        ),
        (not cfg.login_timeout_s > 0, "login_timeout_s must be > 0"),
        (not cfg.handshake_timeout_s > 0, "handshake_timeout_s must be > 0"),
        (not 0 <= cfg.certified_share < 1, f"certified_share must be in [0, 1), got {cfg.certified_share}"),
        (not isinstance(cfg.keep_update_tensors, bool), "keep_update_tensors must be true or false"),
        (
            cfg.fit.logit_adjustment > 0 and len(set(cfg.fit.labels or ())) < 2,
            "[fit] logit_adjustment needs labels = [...], the candidate labels (at least two)",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(f"config: {message}")
    make_strategy(cfg)  # raises ConfigError


def make_strategy(cfg: CoordinatorConfig) -> Strategy:
    """The (unbound) strategy of ``cfg``: ``strategy`` with ``strategy_params``, and the ``[privacy]`` table for
    ``dp-fedavg``.

    Raises:
        ConfigError: unknown strategy or bad parameters; ``[privacy]`` with a strategy that cannot be private, or
        ``dp-fedavg`` without it; ``secure_aggregation`` with a strategy that reads individual updates
        (``coordinator.secagg.check_secure``).
    """
    from coordinator.secagg import check_secure
    from coordinator.strategy import from_name
    from coordinator.strategy.dp_fedavg import NOT_PRIVATE, DPFedAvg

    params = dict(cfg.strategy_params)
    if cfg.strategy == DPFedAvg.name:
        if "privacy" in params:
            raise ConfigError("config: dp-fedavg takes its privacy settings from the [privacy] table only")
        params["privacy"] = cfg.privacy
    elif cfg.privacy.enabled:
        why = NOT_PRIVATE.get(cfg.strategy, "it is not a differentially private strategy")
        raise ConfigError(
            f"config: [privacy] noise_multiplier > 0 needs strategy = {DPFedAvg.name!r}; {cfg.strategy!r} cannot be "
            f"private: {why}"
        )
    strategy = from_name(cfg.strategy, **params)
    if cfg.privacy.secure_aggregation:
        check_secure(cfg.strategy, strategy.secure_weighting, cfg.privacy, cfg.fit)
    return strategy


def load_config(path: str | Path) -> CoordinatorConfig:
    """Read a TOML config; relative paths are resolved against its directory.

    Raises:
        ConfigError: unreadable file, invalid TOML, unknown key or invalid value.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}; create one with `fedmoe-coord init`") from exc
    known = {f.name for f in dataclasses.fields(CoordinatorConfig)}
    moved = sorted(set(data) & set(MOVED_TO_ROUNDS))
    if moved:
        raise ConfigError(
            f"config {path}: {moved} moved to the [rounds] table: write "
            + ", ".join(f"{MOVED_TO_ROUNDS[k]} = {data[k]!r}" for k in moved)
            + " under [rounds]"
        )
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config {path}: unknown keys {unknown}")
    for key in _PATHS:
        if data.get(key):
            data[key] = str((path.parent / data[key]).resolve())
    try:
        return CoordinatorConfig(**data)
    except TypeError as exc:
        raise ConfigError(f"config {path}: {exc}") from exc


def save_config(cfg: CoordinatorConfig, path: str | Path) -> None:
    """Write ``cfg`` as TOML (absolute paths as given)."""
    data = dataclasses.asdict(cfg)
    data["fit"] = {k: v for k, v in data["fit"].items() if v is not None}  # TOML has no null
    Path(path).write_text(tomli_w.dumps(data))
