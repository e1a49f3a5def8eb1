"""FedAlign-MoE (Fang et al., "Aggregation Alignment for Federated Learning with Mixture-of-Experts under
Data Heterogeneity", arXiv 2603.21276).

Three parts (``docs/algorithms.md``):

1. Routing-consistency weighting of the router. Row e of client i gets weight omega_i(e) among the clients
   that held e, by ``router_weighting``:
   - ``"usage"``: omega_i(e) = u_i(e) / sum_j u_j(e) (the paper's s_i(e) / sum_j s_j(e), s = usage);
   - ``"kl"``: omega_i(e) proportional to 1 / (1 + KL(p_i || p_global)), p_i = client i's usage normalised
     over its kept experts, p_global = the round's prior restricted to those experts and renormalised.
2. Distribution regularisation: ``configure_fit`` sends ``routing_prior`` (p_global per MoE layer) and
   ``routing_reg_coef`` (lambda_r) so each client adds lambda_r KL(p_local || p_global) to its loss. The
   prior is the strategy's state (``prior/<layer>``: taken and returned by ``aggregate_fit``, durable across
   restarts): after each round it becomes the example-weighted mean usage of the holders of each expert (unheld
   experts keep their previous mass), renormalised.
3. Expert semantic alignment. With Delta_i(e) = E_e(i) - E_e(t) (over all EXPERT tensors of the layer,
   concatenated) and the mean direction m(e) = sum_i n_i Delta_i(e) / sum_i n_i over the holders,
   expert e is the n_i-weighted mean over the clients with cos(Delta_i(e), m(e)) >= ``threshold``; if none
   passes, over all holders; if none holds e, unchanged. A zero update has cosine 0, so a held but
   untrained copy only counts in the fallback (it scales m without turning it).

Streaming: the cosine needs m(e), which depends on every client, and keeping per-client sufficient
statistics (a Gram matrix) grows with clients^2. We make TWO streaming passes over a re-openable
``results`` (a list, or a callable that re-reads the stored update files): pass 1 averages everything
(routers and OTHER final, experts as the all-holders fallback) and yields m; pass 2 re-weights the experts
by alignment. Memory stays O(model size), independent of the number of clients: measured peak about
5x the model size (96 MiB model: +450 MiB for 5 or 40 clients; float64 sums, the pass-1 average, m, the
pass-2 sums, the output).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from coordinator.strategy.aggregate import cosine_similarity, expert_rows, kl_divergence
from coordinator.strategy.base import (
    Strategy,
    StreamingAggregation,
    feed,
    open_results,
    require_reopenable,
    round_metrics,
    split_state,
)
from coordinator.strategy.types import Aggregated, ClientUpdate, Failure, Params, Results, StrategyState
from coordinator.strategy.validate import validate_update
from device_runtime.bundle import EXPERT_ROLES, TensorRole, TensorSpec
from device_runtime.errors import ConfigError, UpdateRejected
from device_runtime.wire import FitConfig

ROUTER_WEIGHTINGS = ("usage", "kl")


class FedAlign(Strategy):
    """Routing-consistency router weighting, a global routing prior, and aligned-only expert averaging."""

    name = "fedalign"

    def __init__(
        self,
        router_weighting: str = "usage",
        threshold: float = 0.0,
        routing_reg_coef: float = 0.01,
        num_experts: Sequence[int] | None = None,
    ):
        """Args:
            router_weighting: ``"usage"`` or ``"kl"`` (see the module docstring).
            threshold: cosine similarity an update direction needs to count as aligned, in [-1, 1].
            routing_reg_coef: lambda_r of the clients' KL(p_local || p_global) regulariser, >= 0.
            num_experts: global experts per MoE layer; when given, round 1 sends a uniform prior.
        Raises:
            ConfigError: a parameter is out of range.
        """
        if router_weighting not in ROUTER_WEIGHTINGS:
            raise ConfigError(f"router_weighting must be one of {ROUTER_WEIGHTINGS}, got {router_weighting!r}")
        if not -1.0 <= threshold <= 1.0 or not routing_reg_coef >= 0.0:
            raise ConfigError(
                f"need -1 <= threshold <= 1 and routing_reg_coef >= 0; got {threshold}, {routing_reg_coef}"
            )
        self.router_weighting, self.threshold = router_weighting, float(threshold)
        self.routing_reg_coef = float(routing_reg_coef)
        self.num_experts = tuple(num_experts or ())

    state_kinds = ("prior",)  # prior/<layer>: float64, a probability per global expert of the MoE layer

    def initial_state(self) -> StrategyState:
        """The uniform routing prior of each MoE layer (none without ``num_experts``)."""
        return {f"prior/{layer}": np.full(count, 1.0 / count) for layer, count in enumerate(self.num_experts)}

    def check_state(self, state: StrategyState) -> StrategyState:
        self._prior(state)
        return state

    def _prior(self, state: StrategyState | None) -> dict[int, np.ndarray]:
        """The routing prior by MoE layer. Raises ConfigError: ``state`` is not a FedAlign-MoE state."""
        prior = split_state(self.name, self.initial_state() if state is None else state, self.state_kinds)["prior"]
        if not all(layer.isdigit() for layer in prior):
            raise ConfigError(f"the {self.name} prior is per MoE layer number, got {sorted(prior)[:3]}")
        return {int(layer): np.asarray(p, np.float64) for layer, p in prior.items()}

    def fit_config(self, server_round: int, state: StrategyState | None = None) -> FitConfig:
        prior = self._prior(state)
        routing_prior = tuple(tuple(float(p) for p in prior[layer]) for layer in sorted(prior)) or None
        return dataclasses.replace(
            super().fit_config(server_round), routing_reg_coef=self.routing_reg_coef, routing_prior=routing_prior
        )

    def aggregate_fit(
        self,
        server_round: int,
        results: Results,
        failures: Sequence[Failure],
        global_params: Params,
        state: StrategyState | None = None,
    ) -> Aggregated:
        require_reopenable(results)
        start_prior = self._prior(state)
        usage = _UsageAccumulator()
        first = StreamingAggregation(global_params, functools.partial(self._first_pass_weights, start_prior))
        rejected = feed(first, open_results(results), on_accept=usage.add)
        averaged = first.finish()
        direction = {name: averaged[name] - global_params[name] for name in first.expert_names}
        aligned = _AlignedPass(global_params, direction, self.threshold)
        accepted = set(first.accepted_positions)
        for position, update in enumerate(open_results(results)):
            if position in accepted:
                aligned.accumulate(update, rejected)
        new_params = aligned.aggregation.finish(base=averaged)
        prior = usage.prior(start_prior)
        metrics = round_metrics(server_round, first, failures, rejected)
        metrics.update(aligned.metrics(first))
        return Aggregated(new_params, metrics, {f"prior/{layer}": p for layer, p in prior.items()})

    def _first_pass_weights(
        self,
        start_prior: dict[int, np.ndarray],
        update: ClientUpdate,
        name: str,
        meta: TensorSpec,
        num_experts: tuple[int, ...],
    ) -> np.ndarray | float:
        n = float(update.num_examples)
        if meta.role is TensorRole.SHARED:
            return n
        kept = update.rows(meta)
        if meta.role in EXPERT_ROLES:
            return np.full(len(kept), n)
        layer = meta.moe_layer
        usage = np.asarray(update.routing[layer].usage, np.float64)
        if self.router_weighting == "usage":
            return usage
        prior = start_prior.get(layer)
        if prior is None or len(prior) != num_experts[layer]:
            prior = np.ones(num_experts[layer])
        return np.full(len(kept), 1.0 / (1.0 + kl_divergence(usage, prior[list(kept)])))


def alignment_cosines(update: ClientUpdate, direction: Params, global_params: Params) -> dict[int, np.ndarray]:
    """cos(Delta_c(e), m(e)) per MoE layer and kept expert, over all EXPERT tensors of the layer.

    Args:
        update: a validated client update.
        direction: m, name -> (global shape) mean update direction of each EXPERT tensor.
        global_params: the round's starting model E(t).
    Returns:
        layer -> ``(E_local,)`` cosines (0 where either direction is zero).
    """
    stats: dict[int, np.ndarray] = {}  # layer -> (3, E_local): dot, |Delta|^2, |m|^2
    for name, tensor in update.tensors.items():
        meta = update.tensor_meta[name]
        if meta.role not in EXPERT_ROLES or name not in direction:
            continue
        layer = meta.moe_layer
        ids = list(update.expert_ids[layer])
        delta = (
            expert_rows(tensor, meta.expert_axis).astype(np.float64)
            - expert_rows(global_params[name], meta.expert_axis)[ids]
        )
        delta = delta.reshape(len(ids), -1)
        mean = expert_rows(direction[name], meta.expert_axis)[ids].reshape(len(ids), -1)
        part = np.stack([np.sum(delta * mean, 1), np.sum(delta * delta, 1), np.sum(mean * mean, 1)])
        stats[layer] = stats.get(layer, 0.0) + part
    return {layer: cosine_similarity(*s) for layer, s in stats.items()}


class _AlignedPass:
    """Pass 2: n_c-weighted sums of the EXPERT rows whose update direction is aligned."""

    def __init__(self, global_params: Params, direction: Params, threshold: float):
        self.global_params, self.direction, self.threshold = global_params, direction, threshold
        self._aligned: dict[int, np.ndarray] = {}
        self.aggregation = StreamingAggregation(global_params, self._weights, roles=EXPERT_ROLES)
        self.pairs = 0
        self.aligned_pairs = 0

    def accumulate(self, update: ClientUpdate, rejected: dict[str, str]) -> None:
        try:
            validate_update(update, self.global_params)
            cosines = alignment_cosines(update, self.direction, self.global_params)
            self._aligned = {layer: cos >= self.threshold for layer, cos in cosines.items()}
            self.aggregation.accumulate(update)
        except UpdateRejected as exc:
            rejected.setdefault(str(update.client_id), f"changed between passes: {exc.reason}")
            return
        self.pairs += sum(len(a) for a in self._aligned.values())
        self.aligned_pairs += sum(int(a.sum()) for a in self._aligned.values())

    def _weights(self, update: ClientUpdate, name: str, meta: TensorSpec, num_experts: tuple[int, ...]) -> np.ndarray:
        return np.where(self._aligned[meta.moe_layer], float(update.num_examples), 0.0)

    def metrics(self, first: StreamingAggregation) -> dict[str, float]:
        """``aligned_fraction`` of (client, expert) pairs and ``fallback_experts`` (held, none aligned)."""
        fallback = 0
        for name in first.expert_names:
            totals = self.aggregation.accumulator.totals(name)
            held = first.accumulator.added_totals(name) > 0
            fallback += int(np.sum(held & ~(totals > 0))) if totals is not None else int(held.sum())
        return {
            "aligned_fraction": self.aligned_pairs / self.pairs if self.pairs else 0.0,
            "fallback_experts": fallback,
        }


class _UsageAccumulator:
    """Example-weighted mean usage per global expert over its holders, for the next routing prior."""

    def __init__(self) -> None:
        self.sums: dict[int, np.ndarray] = {}
        self.totals: dict[int, np.ndarray] = {}

    def add(self, update: ClientUpdate, num_experts: tuple[int, ...]) -> None:
        for layer in range(len(update.expert_ids)):
            ids = update.held_ids(layer)
            sums = self.sums.setdefault(layer, np.zeros(num_experts[layer]))
            totals = self.totals.setdefault(layer, np.zeros(num_experts[layer]))
            sums[list(ids)] += update.num_examples * np.asarray(update.routing[layer].usage, np.float64)
            totals[list(ids)] += update.num_examples

    def prior(self, previous: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """The next p_global: mean usage where held, the previous prior (or uniform) elsewhere, normalised."""
        out = dict(previous)
        for layer, sums in self.sums.items():
            totals = self.totals[layer]
            base = previous.get(layer)
            if base is None or len(base) != len(sums):
                base = np.full(len(sums), 1.0 / len(sums))
            p = np.where(totals > 0, sums / np.maximum(totals, 1e-12), base)
            out[layer] = p / p.sum() if p.sum() > 0 else np.full(len(p), 1.0 / len(p))
        return out
