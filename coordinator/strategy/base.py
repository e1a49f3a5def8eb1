"""The ``Strategy`` interface (Flower style) and the streaming single-pass aggregation every strategy uses.

A strategy owns both ends of a round: ``configure_fit`` tells each selected client what to train (a
:class:`~coordinator.strategy.types.FitIns`: its experts, from the budget planner and the strategy's expert
choice, and its FitConfig), ``aggregate_fit`` merges what came back. A strategy that picks experts differently
overrides :meth:`Strategy.select_experts` (or :meth:`Strategy.fit_ins` to size the subset differently or let a
client sit a round out) and is registered in ``coordinator.strategy.registry``.

A round's updates arrive as :data:`~coordinator.strategy.types.Results`; client failures are data
(``(client_id, reason)`` pairs) and so are updates that fail validation: both are counted and reported
in the metrics, neither stops the round.

Federated evaluation (Flower's ``configure_evaluate`` / ``aggregate_evaluate``) rides on fit: ``FitConfig.
eval_fraction`` in :meth:`Strategy.fit_config` tells each device to score the model it receives on its held-out
split before training, and :meth:`Strategy.aggregate_evaluate` merges those scores (example-weighted by default,
or by ``evaluate_metrics_aggregation_fn``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from coordinator.strategy.aggregate import RowAccumulator, RowCombine, weighted_loss_avg, weighted_metrics_avg
from coordinator.strategy.secure_rows import SecureRows
from coordinator.strategy.selection import affordable_fit, expert_scores, split_fit, training_order
from coordinator.strategy.types import (
    Aggregated,
    ClientEvaluation,
    ClientInfo,
    ClientUpdate,
    Failure,
    FitContext,
    FitIns,
    MetricsAggregationFn,
    Params,
    Results,
    StrategyState,
)
from coordinator.strategy.validate import validate_update
from device_runtime.bundle import EXPERT_ROLES, TensorRole, TensorSpec
from device_runtime.errors import ConfigError, FedmoeError, UpdateRejected
from device_runtime.modes import Order
from device_runtime.stats import IMPORTANCE_BETA, IMPORTANCE_LAMBDA
from device_runtime.wire import FitConfig, ImportanceWeighting
from export.planner import select_experts

log = logging.getLogger("fedmoe.coord")

RowWeights = Callable[[ClientUpdate, str, TensorSpec, tuple[int, ...]], "np.ndarray | float"]
"""``(update, tensor name, meta, global experts per layer) -> weights``: one per row of the tensor's expert axis
(``ClientUpdate.rows``), or a scalar for OTHER."""


class Strategy(ABC):
    """An aggregation algorithm: what clients are told to do (``configure_fit``) and how results merge
    (``aggregate_fit``, and their held-out scores: ``aggregate_evaluate``). ``configure_fit`` needs the strategy
    bound to its federation (:meth:`bind`).

    Attributes:
        evaluate_metrics_aggregation_fn: Flower's hook: ``[(num_examples, metrics) per client] -> metrics`` merges
            the clients' evaluation metrics (all but the loss); None: each metric's example-weighted mean over the
            clients that reported it (``aggregate.weighted_metrics_avg``). Set it on the instance.
    """

    name: ClassVar[str]
    context: FitContext | None = None
    evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None
    lam: float = IMPORTANCE_LAMBDA  # lambda and beta of the importance I(e) that ranks experts (HFedMoE's)
    beta: float = IMPORTANCE_BETA

    def bind(self, context: FitContext) -> Strategy:
        """Give the strategy the federation's model, calibration and training settings; returns ``self``."""
        self.context = context
        return self

    def fit_config(self, server_round: int, state: StrategyState | None = None) -> FitConfig:
        """The FitConfig every client gets in round ``server_round`` (1-based): the federation's ``[fit]`` with
        the round's seed; strategies add their own inputs (``prox_mu``, ``routing_prior`` ...), some from ``state``
        (the last :meth:`aggregate_fit`'s; None: :meth:`initial_state`).

        Raises:
            ConfigError: the strategy is not bound (:meth:`bind`).
        """
        context = self._bound()
        return dataclasses.replace(context.fit, seed=(context.seed + server_round) % 2**32)

    def configure_fit(
        self,
        server_round: int,
        global_params: Params,
        clients: Sequence[ClientInfo],
        state: StrategyState | None = None,
    ) -> dict[str, FitIns]:
        """What each client trains in round ``server_round`` (1-based): ``client_id -> FitIns``.

        A client left out sits the round out: :meth:`fit_ins` returned None, or it raised a FedmoeError
        (e.g. BudgetError: one expert per layer does not fit), which is logged.

        Args:
            global_params: the global model the round starts from (name -> array); not modified.
            state: the strategy state the round starts from (None: :meth:`initial_state`).
        Raises:
            ConfigError: the strategy is not bound (:meth:`bind`).
        """
        config = self.fit_config(server_round, state)
        out = {}
        for client in clients:
            try:
                ins = self.fit_ins(server_round, client, config)
            except FedmoeError as exc:
                log.warning(
                    "device %s sits out round %d: %s: %s", client.client_id, server_round, type(exc).__name__, exc
                )
                continue
            if ins is not None:
                out[client.client_id] = ins
        return out

    def fit_ins(self, server_round: int, client: ClientInfo, config: FitConfig) -> FitIns | None:
        """One client's FitIns: as many experts per layer as its budget affords, chosen by
        :meth:`select_experts`, the others held frozen where the budget affords that
        (``selection.affordable_fit``); None to let it sit the round out.

        Raises:
            ConfigError: the profile has no usable budget. BudgetError: one expert per layer does not fit.
        """
        context = self._bound()
        kept, frozen_dtype, merged = affordable_fit(context, config, client.profile)
        ids = self.select_experts(server_round, client, kept)
        if training_order(client.profile) == Order.HYBRID:  # split mode: the bottom's experts, HO-SFL settings
            ids, config = split_fit(context, config, ids)
        return FitIns(ids, config, context.trainable_mode, context.lora_rank, frozen_dtype, merged)

    def select_experts(self, server_round: int, client: ClientInfo, kept: int) -> tuple[tuple[int, ...], ...]:
        """Per MoE layer, the ``kept`` global expert ids (ascending) ``client`` trains: by default the top
        ``kept`` by importance (:meth:`expert_scores`; HFedMoE's budgeted selection)."""
        return select_experts(self.expert_scores(client), kept)

    def expert_scores(self, client: ClientInfo) -> list[np.ndarray]:
        """I(e) per MoE layer over the global experts, ``(num_experts,)`` each: the calibration statistics
        with the client's last reported ones laid over (``coordinator.strategy.selection.expert_scores``)."""
        return expert_scores(self._bound().calibration, client.routing, lam=self.lam, beta=self.beta)

    def _bound(self) -> FitContext:
        if self.context is None:
            raise ConfigError(
                f"strategy {self.name!r} is not bound to a federation: call bind(FitContext(...)) "
                "(Coordinator.from_config does)"
            )
        return self.context

    state_kinds: ClassVar[tuple[str, ...]] = ()  # the ``"<kind>/"`` prefixes of this strategy's state keys

    def initial_state(self) -> StrategyState:
        """The state of round 1 (:data:`StrategyState`); {} for a stateless strategy."""
        return {}

    def check_state(self, state: StrategyState) -> StrategyState:
        """``state`` (e.g. read back from a model version) if this strategy can carry it.

        Raises:
            ConfigError: ``state`` holds an array this strategy does not carry.
        """
        split_state(self.name, state, self.state_kinds)
        return state

    @abstractmethod
    def aggregate_fit(
        self,
        server_round: int,
        results: Results,
        failures: Sequence[Failure],
        global_params: Params,
        state: StrategyState | None = None,
    ) -> Aggregated:
        """Merge the round's client updates into a new global model.

        Args:
            server_round: the round number (1-based).
            results: the client updates (see ``Results``).
            failures: ``(client_id, reason)`` of the clients that returned nothing usable.
            global_params: the global model the round started from; not modified.
            state: the strategy state the round started from (None: :meth:`initial_state`); not modified.
        Returns:
            :class:`Aggregated` ``(params, metrics, state)``: the coordinator commits the state with the version
            (``coordinator.federation``) and passes it to the next round.
        """

    secure_weighting: ClassVar[str | None] = None
    """How devices weigh their rows under secure aggregation (``coordinator.secagg``): ``"examples"`` (by
    num_examples, FedAvg), ``"unit"`` (1 each, DP-FedAvg), ``"hfedmoe"`` (per row, HFedMoE's weights computed by
    each device from :meth:`secure_importance`); None: the strategy needs individual updates and refuses secure
    aggregation."""

    def secure_importance(self) -> ImportanceWeighting | None:
        """The parameters a device needs to compute ``"hfedmoe"`` row weights itself (None for other weightings)."""
        return None

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
        """Merge a securely aggregated round: only each row's sums over its holders are known (``sums``).

        The default (``secure_weighting`` "examples" or "hfedmoe"): every row with a positive weight sum becomes
        global + sum_i w_i d_i / sum_i w_i (d_i: the holders' deltas), i.e. the weighted mean of the holders' rows
        (FedAvg's, or HFedMoE's with its per-row weights); other rows are unchanged. ``sampling_rate``: the
        round's q (privacy accounting).

        Raises:
            ConfigError: the strategy has no ``secure_weighting``.
        """
        if self.secure_weighting not in ("examples", "hfedmoe"):
            raise ConfigError(f"strategy {self.name!r} cannot aggregate securely")

        def average(name: str, base: np.ndarray, row_sums: np.ndarray, totals: np.ndarray) -> np.ndarray:
            out: np.ndarray = base + row_sums / totals.reshape(-1, 1)
            return out

        params = sums.apply(global_params, average, by_weight=True)
        metrics = sums.metrics(server_round, failures)
        return Aggregated(params, metrics, self.initial_state() if state is None else state)

    def aggregate_evaluate(
        self, server_round: int, results: Sequence[ClientEvaluation], failures: Sequence[Failure]
    ) -> tuple[float | None, dict[str, float]]:
        """Merge the clients' scores of the round's starting global model on their held-out data (Flower's
        ``aggregate_evaluate``).

        Args:
            server_round: the round number (1-based); the clients scored the model the round started from.
            results: one :class:`ClientEvaluation` per client that reported one.
            failures: ``(client_id, reason)`` of the clients that reported none (counted, nothing else).
        Returns:
            ``(loss, metrics)``: the example-weighted mean loss (``aggregate.weighted_loss_avg``; None without
            results) and ``metrics``: ``num_clients``, ``num_examples``, ``num_failures`` and the clients' other
            metrics merged by ``evaluate_metrics_aggregation_fn`` (default: example-weighted means, e.g.
            ``accuracy`` over the clients that computed it).
        """
        usable = [r for r in results if r.num_examples > 0]
        counts: dict[str, float] = {"num_clients": len(usable), "num_examples": sum(r.num_examples for r in usable)}
        counts["num_failures"] = len(failures) + len(results) - len(usable)
        if not usable:
            return None, counts
        loss = weighted_loss_avg([(r.num_examples, r.loss) for r in usable])
        pairs: list[tuple[int, Mapping[str, float]]] = [(r.num_examples, dict(r.metrics)) for r in usable]
        aggregate = self.evaluate_metrics_aggregation_fn or weighted_metrics_avg
        return loss, {**aggregate(pairs), **counts}


def split_state(strategy: str, state: StrategyState, kinds: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """``state`` by kind: ``kind -> {name: array}`` for each of ``kinds`` (``"<kind>/<name>"`` keys).

    Raises:
        ConfigError: a key of another kind or without a name (the state of another strategy).
    """
    out: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in kinds}
    for key, array in state.items():
        kind, _, name = key.partition("/")
        if kind not in out or not name:
            raise ConfigError(f"the {strategy} state cannot hold {key!r} (it carries {', '.join(kinds) or 'nothing'})")
        out[kind][name] = array
    return out


def open_results(results: Results) -> Iterable[ClientUpdate]:
    """A fresh iterable over ``results`` (calls it when it is a zero-argument factory)."""
    return results() if callable(results) else results


def require_reopenable(results: Results) -> None:
    """Two-pass strategies need to iterate twice.

    Raises:
        TypeError: ``results`` is a one-shot iterator; pass a list or a callable returning a fresh iterable.
    """
    if isinstance(results, collections.abc.Iterator):
        raise TypeError(
            "this strategy reads the updates twice: pass a list or a zero-argument callable "
            "returning a fresh iterable, not a one-shot iterator"
        )


class StreamingAggregation:
    """One round's weighted per-row average, fed one update at a time (memory O(model size)).

    Usage: ``agg.accumulate(update)`` for each update, then ``agg.finish()``.
    """

    def __init__(
        self,
        global_params: Params,
        weigh: RowWeights,
        *,
        roles: frozenset[TensorRole] | None = None,
        prepare: Callable[[ClientUpdate], ClientUpdate] | None = None,
    ):
        """Args:
        global_params: the round's starting global model.
        weigh: the strategy's weight per (update, tensor, local expert row).
        roles: only tensors of these roles are aggregated (default: all).
        prepare: maps each validated update to what is summed (e.g. its clipped delta, ``dp_fedavg``).
        """
        self.global_params = global_params
        self.accumulator = RowAccumulator(global_params)
        self._weigh = weigh
        self._roles = roles
        self._prepare = prepare
        self._seen: set[str] = set()
        self._expert_layer: dict[str, int] = {}
        self._attempts = 0
        self.accepted_positions: list[int] = []
        self.num_examples = 0

    def accumulate(self, update: ClientUpdate) -> tuple[int, ...]:
        """Validate ``update`` and add it to the running sums.

        Returns:
            the global expert count per MoE layer of the update.
        Raises:
            UpdateRejected: the update is malformed or its client already sent one; nothing was added.
        """
        position, self._attempts = self._attempts, self._attempts + 1
        if update.client_id in self._seen:
            raise UpdateRejected(f"client {update.client_id!r} sent more than one update this round")
        num_experts = validate_update(update, self.global_params)
        self._seen.add(update.client_id)
        self.accepted_positions.append(position)
        self.num_examples += int(update.num_examples)
        if self._prepare is not None:
            update = self._prepare(update)
        for name, tensor in update.tensors.items():
            meta = update.tensor_meta[name]
            if self._roles is not None and meta.role not in self._roles:
                continue
            ids = update.rows(meta) if meta.indexed else ()
            self.accumulator.add(name, tensor, meta, ids, self._weigh(update, name, meta, num_experts))
            if meta.role in EXPERT_ROLES:
                self._expert_layer[name] = meta.moe_layer
        return num_experts

    @property
    def num_clients(self) -> int:
        return len(self._seen)

    @property
    def expert_names(self) -> tuple[str, ...]:
        """Names of the EXPERT tensors aggregated so far."""
        return tuple(self._expert_layer)

    def experts_updated(self) -> dict[int, int]:
        """Per MoE layer: how many global experts received a non-zero weight in some EXPERT tensor."""
        per_layer: dict[int, np.ndarray] = {}
        for name, layer in self._expert_layer.items():
            held = self.accumulator.added_totals(name) > 0
            per_layer[layer] = held | per_layer.get(layer, np.zeros_like(held))
        return {layer: int(held.sum()) for layer, held in sorted(per_layer.items())}

    def finish(self, base: Params | None = None, combine: RowCombine | None = None) -> Params:
        """The averaged model (held rows: ``combine``, see ``RowAccumulator.finish``); rows nobody contributed
        keep ``base`` (default: the global model)."""
        return self.accumulator.finish(base, combine)


def feed(
    aggregation: StreamingAggregation,
    updates: Iterable[ClientUpdate],
    on_accept: Callable[[ClientUpdate, tuple[int, ...]], None] | None = None,
) -> dict[str, str]:
    """Accumulate every update; returns ``client_id -> reason`` of the rejected ones (they are skipped)."""
    rejected: dict[str, str] = {}
    for update in updates:
        try:
            num_experts = aggregation.accumulate(update)
        except UpdateRejected as exc:
            rejected.setdefault(str(update.client_id), exc.reason)
            continue
        if on_accept is not None:
            on_accept(update, num_experts)
    return rejected


def round_metrics(
    server_round: int, aggregation: StreamingAggregation, failures: Sequence[Failure], rejected: dict[str, str]
) -> dict[str, Any]:
    """The metrics every strategy reports for a round."""
    return {
        "round": server_round,
        "num_clients": aggregation.num_clients,
        "num_examples": aggregation.num_examples,
        "num_failures": len(failures) + len(rejected),
        "failures": {str(client): str(reason) for client, reason in failures},
        "rejected": rejected,
        "experts_updated": aggregation.experts_updated(),
    }


class SinglePassStrategy(Strategy):
    """A strategy that is a weighted per-row average: subclasses define ``row_weights`` only."""

    @abstractmethod
    def row_weights(
        self, update: ClientUpdate, name: str, meta: TensorSpec, num_experts: tuple[int, ...]
    ) -> np.ndarray | float:
        """Weight of each expert row of ``update.tensors[name]`` (``(len(update.rows(meta)),)``), or a scalar for
        OTHER.

        ``num_experts[layer]`` is the global expert count of each MoE layer of the update.
        """

    def aggregation(self, global_params: Params) -> StreamingAggregation:
        """A fresh streaming aggregation for one round (``accumulate`` / ``finish``)."""
        return StreamingAggregation(global_params, self.row_weights)

    def aggregate_fit(
        self,
        server_round: int,
        results: Results,
        failures: Sequence[Failure],
        global_params: Params,
        state: StrategyState | None = None,
    ) -> Aggregated:
        aggregation = self.aggregation(global_params)
        rejected = feed(aggregation, open_results(results))
        metrics = round_metrics(server_round, aggregation, failures, rejected)
        return Aggregated(aggregation.finish(), metrics, self.initial_state() if state is None else state)
