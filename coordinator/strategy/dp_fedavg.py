"""DP-FedAvg with client-level differential privacy, central model (McMahan et al., "Learning Differentially
Private Recurrent Language Models", ICLR 2018; adaptive clipping: Andrew et al., "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021). The mechanism, its sensitivity argument for rows with
different holders, and the accounting are in ``coordinator.privacy``; this module runs it in one streaming pass.

Per round: each accepted update becomes its delta against the round's global rows, clipped to L2 norm S over
every row it sent (routers included); each row sums its holders' clipped deltas (weight 1 per holder: the
weights of ``fedavg`` (num_examples) or ``hfedmoe`` / ``fedalign`` (routing statistics) depend on the data and
are refused); each held row's sum gets N(0, (z_v S)^2) per coordinate before it is divided by its holder count
and added to the global row. Unheld rows stay unchanged and noiseless. Memory O(model): one update at a time.

State (``"dp/<name>"``, committed with each version, restored at restart):
``dp/clip`` ``(1,)``, the clip S of the next round (adaptive; fixed clipping ignores it) and ``dp/rounds``, one
``(z, q)`` row per aggregated round for the accountant. Metrics per round: ``dp_clip``, ``dp_noise_std`` (per
coordinate of a row sum), ``dp_clipped`` (devices clipped: the coordinator's own number, exact, not released),
``dp_epsilon`` (spent so far, at ``dp_delta``), ``dp_sampling_rate``; adaptive: ``dp_next_clip`` and
``dp_unclipped_share`` (the noised share b~).

Devices may train with FedProx's proximal term (``prox_mu``: client-side only, no effect on the privacy).
Which experts a device trains is the base ``Strategy``'s importance choice (routing statistics: not protected).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from coordinator.privacy import PrivacyConfig, adaptive_clip_step, clip_factor, epsilon, l2_norm, noisy_rows
from coordinator.strategy.aggregate import expert_rows
from coordinator.strategy.base import Strategy, StreamingAggregation, feed, open_results, round_metrics, split_state
from coordinator.strategy.secure_rows import SecureRows
from coordinator.strategy.types import Aggregated, ClientUpdate, Failure, Params, Results, StrategyState
from device_runtime.bundle import TensorSpec
from device_runtime.errors import ConfigError
from device_runtime.wire import FitConfig

NOT_PRIVATE = {
    "fedavg": "it weighs rows by num_examples (data-dependent: it leaks and lets one device exceed the clip)",
    "fedmoe": "it weighs rows by num_examples (data-dependent: it leaks and lets one device exceed the clip)",
    "fedprox": "it weighs rows by num_examples; dp-fedavg takes prox_mu itself (strategy_params)",
    "dense-fedavg": "it weighs rows by num_examples (data-dependent)",
    "hfedmoe": "its gate weights come from routing statistics (data-dependent, unclipped)",
    "fedalign": "its weights come from routing statistics and update similarities (data-dependent, unclipped)",
    "fedadam": "a server optimizer over a DP average is not combined with dp-fedavg yet",
    "fedyogi": "a server optimizer over a DP average is not combined with dp-fedavg yet",
}
"""Why each other registered strategy cannot run with ``[privacy]`` (the config refuses it)."""


class DPFedAvg(Strategy):
    """Clipped, noised, unweighted per-row FedAvg of update deltas (``coordinator.privacy``)."""

    name = "dp-fedavg"
    state_kinds = ("dp",)
    secure_weighting: ClassVar[str | None] = "unit"  # devices clip their own delta to S under secure aggregation
    accounts_privacy = True  # aggregate_fit takes the round's sampling_rate (coordinator.federation)

    def __init__(self, privacy: PrivacyConfig | Mapping[str, Any] | None = None, prox_mu: float = 0.0):
        """Args:
            privacy: the config's ``[privacy]`` table (a dict of its fields is accepted), noise_multiplier > 0.
            prox_mu: FedProx's mu sent to the devices (>= 0; 0: plain local training).
        Raises:
            ConfigError: no privacy settings or noise_multiplier 0, or a bad value.
        """
        if isinstance(privacy, Mapping):
            try:
                privacy = PrivacyConfig(**privacy)
            except TypeError as exc:
                raise ConfigError(f"config [privacy]: {exc}") from exc
        if privacy is None or not privacy.enabled:
            raise ConfigError(
                "strategy 'dp-fedavg' needs a [privacy] table with noise_multiplier > 0 and clip (or "
                "target_quantile): without noise nothing is private; use strategy 'fedavg' instead"
            )
        if not prox_mu >= 0:
            raise ConfigError(f"prox_mu must be >= 0, got {prox_mu}")
        self.privacy: PrivacyConfig = privacy
        self.prox_mu = float(prox_mu)

    def fit_config(self, server_round: int, state: StrategyState | None = None) -> FitConfig:
        config = super().fit_config(server_round, state)
        return dataclasses.replace(config, prox_mu=self.prox_mu) if self.prox_mu > 0 else config

    def initial_state(self) -> StrategyState:
        p = self.privacy
        return {"dp/clip": np.array([p.initial_clip if p.adaptive else p.clip]), "dp/rounds": np.zeros((0, 2))}

    def check_state(self, state: StrategyState) -> StrategyState:
        parts = split_state(self.name, state, self.state_kinds)["dp"]
        if set(parts) != {"clip", "rounds"} or np.size(parts["clip"]) != 1 or np.shape(parts["rounds"])[1:] != (2,):
            raise ConfigError(f"the {self.name} state needs dp/clip (1,) and dp/rounds (n, 2); got {sorted(state)}")
        return state

    def clip(self, state: StrategyState | None) -> float:
        """The clip S a round starting from ``state`` uses (the fixed clip, or the adaptive one carried)."""
        if not self.privacy.adaptive:
            return self.privacy.clip
        return float((self.initial_state() if state is None else state)["dp/clip"].reshape(-1)[0])

    def spent(self, state: StrategyState | None, *more: tuple[float, float]) -> float:
        """Epsilon at the configured delta after the rounds in ``state`` (and ``more`` ``(z, q)`` rounds)."""
        done = np.zeros((0, 2)) if state is None else np.asarray(state["dp/rounds"], np.float64)
        return epsilon([(float(z), float(q)) for z, q in done.tolist()] + list(more), self.privacy.delta)

    def budget_exceeded(self, state: StrategyState | None, sampling_rate: float) -> str | None:
        """Why a round with ``sampling_rate`` must not start from ``state``: it would take epsilon past
        ``epsilon_budget``; None when it may (or there is no budget)."""
        budget = self.privacy.epsilon_budget
        if budget <= 0:
            return None
        after = self.spent(state, (self.privacy.noise_multiplier, sampling_rate))
        if after <= budget:
            return None
        return (
            f"privacy budget: the next round (sampling rate {sampling_rate:.3g}) would reach epsilon {after:.4g} > "
            f"epsilon_budget {budget:g} at delta {self.privacy.delta:g} (spent: {self.spent(state):.4g})"
        )

    def aggregate_fit(
        self,
        server_round: int,
        results: Results,
        failures: Sequence[Failure],
        global_params: Params,
        state: StrategyState | None = None,
        *,
        sampling_rate: float = 1.0,
    ) -> Aggregated:
        """See :meth:`Strategy.aggregate_fit`; ``sampling_rate`` is the round's q (devices selected / eligible;
        1.0, no amplification, when unknown)."""
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
        p = self.privacy
        state = self.check_state(self.initial_state() if state is None else state)
        clip, rng = self.clip(state), p.rng(server_round)
        norms: list[float] = []

        def clipped_delta(update: ClientUpdate) -> ClientUpdate:
            deltas: dict[str, np.ndarray] = {}
            for name, tensor in update.tensors.items():
                meta = update.tensor_meta[name]
                axis = meta.expert_axis  # None: unindexed, one row (as RowAccumulator.add)
                ids = [0] if axis is None else list(update.rows(meta))
                rows = expert_rows(np.asarray(tensor, np.float64), axis)  # (k, ...)
                deltas[name] = rows - expert_rows(global_params[name], axis)[ids]
            norm = l2_norm(list(deltas.values()))
            norms.append(norm)
            factor = clip_factor(norm, clip)
            tensors = {n: _layout(d * factor, update.tensor_meta[n]) for n, d in deltas.items()}
            return dataclasses.replace(update, tensors=tensors)

        aggregation = StreamingAggregation(global_params, _one_per_row, prepare=clipped_delta)
        rejected = feed(aggregation, open_results(results))
        std = p.value_noise_multiplier * clip

        def add_noise(name: str, base: np.ndarray, sums: np.ndarray, holders: np.ndarray) -> np.ndarray:
            return noisy_rows(base, sums, holders, std, rng)

        params = aggregation.finish(combine=add_noise)
        metrics: dict[str, Any] = round_metrics(server_round, aggregation, failures, rejected)
        metrics["dp_clipped"] = sum(n > clip for n in norms)
        rounds = self._account(metrics, state, clip, sampling_rate)
        next_clip = clip
        if p.adaptive and norms:
            next_clip, share = adaptive_clip_step(
                clip,
                sum(n <= clip for n in norms),
                len(norms),
                target_quantile=p.target_quantile,
                learning_rate=p.clip_learning_rate,
                count_stddev=p.clipped_count_stddev,
                rng=rng,
            )
            metrics |= {"dp_next_clip": next_clip, "dp_unclipped_share": share}
        return Aggregated(params, metrics, {"dp/clip": np.array([next_clip]), "dp/rounds": rounds})

    def _account(self, metrics: dict[str, Any], state: StrategyState, clip: float, sampling_rate: float) -> np.ndarray:
        """Add the round's DP metrics (``dp_clip``, ``dp_noise_std``, ``dp_sampling_rate``, ``dp_epsilon``,
        ``dp_delta``) to ``metrics``; returns ``dp/rounds`` with this round appended."""
        p = self.privacy
        rounds = np.concatenate([np.asarray(state["dp/rounds"], np.float64), [[p.noise_multiplier, sampling_rate]]])
        metrics |= {
            "dp_clip": clip,
            "dp_noise_std": p.value_noise_multiplier * clip,
            "dp_sampling_rate": sampling_rate,
            "dp_epsilon": epsilon([(float(z), float(q)) for z, q in rounds.tolist()], p.delta),
            "dp_delta": p.delta,
        }
        return rounds

    def aggregate_secure(
        self,
        server_round: int,
        sums: SecureRows,
        failures: Sequence[Failure],
        global_params: Params,
        state: StrategyState | None = None,
        *,
        sampling_rate: float = 1.0,
    ) -> Aggregated:
        """The same mechanism over a securely aggregated round: each device clipped its own delta to S
        (``SecAggStart.clip``) and weighed it 1, so ``sums`` holds sum_{i holds r} c_{i,r} per row; each row with
        at least ``min_holders`` holders gets N(0, (z S)^2) per coordinate and is divided by its holder count.
        The clip is fixed (adaptive clipping needs every device's norm: refused with secure aggregation)."""
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
        state = self.check_state(self.initial_state() if state is None else state)
        clip, rng = self.clip(state), self.privacy.rng(server_round)
        std = self.privacy.value_noise_multiplier * clip

        def add_noise(name: str, base: np.ndarray, row_sums: np.ndarray, holders: np.ndarray) -> np.ndarray:
            return noisy_rows(base, row_sums, holders, std, rng)

        params = sums.apply(global_params, add_noise, by_weight=False)
        metrics = sums.metrics(server_round, failures)
        rounds = self._account(metrics, state, clip, sampling_rate)
        return Aggregated(params, metrics, {"dp/clip": np.array([clip]), "dp/rounds": rounds})


def _one_per_row(update: ClientUpdate, name: str, meta: TensorSpec, num_experts: tuple[int, ...]) -> float:
    """Weight 1 per row a device holds (broadcast over its rows): data-independent, so a device moves each row
    sum by exactly its clipped delta."""
    return 1.0


def _layout(rows: np.ndarray, meta: TensorSpec) -> np.ndarray:
    """``(k, ...)`` rows back to the tensor's layout (the expert axis where ``meta`` has it; unindexed: none)."""
    return rows[0] if meta.expert_axis is None else np.moveaxis(rows, 0, meta.expert_axis)
