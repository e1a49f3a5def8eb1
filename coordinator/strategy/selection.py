"""How a strategy picks a client's experts: the budget planner gives how many, importance scores give which.

HFedMoE's budgeted importance maximisation (Fang et al., arXiv 2601.00583): the planner
(``export.planner.plan``) gives the uniform number C of experts per layer the device's budget affords, then the
top-C experts of each layer by I(e) = s_b(e) - beta KL_e are kept (``export.planner.select_experts``). I(e)
comes from the calibration statistics (``fedmoe-coord init``) with the device's own last reported statistics
laid over the experts it held (rescaled to the calibration's mass on those experts, since the device's router
probabilities are a softmax over its kept experts only). The importance itself is
``device_runtime.stats.LayerRouting.information_score``, the one implementation devices use too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from coordinator.strategy.types import FitContext, FitIns
from device_runtime.errors import BudgetError, ConfigError
from device_runtime.modes import SPLIT_BACKEND, ZO_BACKEND, Order, TrainableMode
from device_runtime.stats import RoutingStats
from device_runtime.wire import FitConfig
from export.planner import Budget, TrainingShape, estimate, plan


def budget_of(profile: Mapping[str, Any]) -> Budget:
    """A device's Budget from its profile: ``memory_mib`` (else ``memory_available_mib``) and ``gflops``.

    Raises:
        ConfigError: no usable memory figure, or values out of range.
    """
    memory = profile.get("memory_mib", profile.get("memory_available_mib"))
    try:
        return Budget(memory_mib=float(memory), gflops=float(profile.get("gflops") or 10.0))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"device profile has no usable memory_mib / gflops: {exc}") from exc


def training_order(profile: Mapping[str, Any]) -> Order:
    """``"zeroth-order"`` for a device that trains with the ``zo`` backend (its profile's ``backend``),
    ``"hybrid-order"`` for the ``split`` backend, else ``"first-order"``: the planner gives a forward-only device
    the experts its smaller footprint affords."""
    backend = profile.get("backend")
    return Order.ZEROTH if backend == ZO_BACKEND else Order.HYBRID if backend == SPLIT_BACKEND else Order.FIRST


def affordable_experts(context: FitContext, config: FitConfig, profile: Mapping[str, Any]) -> int:
    """C: the largest uniform number of experts per MoE layer the device's budget affords to train
    (:func:`affordable_fit`'s count).

    Raises:
        ConfigError: the profile has no usable budget. BudgetError: one expert per layer does not fit.
    """
    return affordable_fit(context, config, profile)[0]


def affordable_fit(context: FitContext, config: FitConfig, profile: Mapping[str, Any]) -> tuple[int, str | None, bool]:
    """``(C, frozen_dtype, merged)``: the largest uniform number of experts per MoE layer the device's budget affords
    to train (``export.planner``), the dtype it holds the others frozen in (None: pruned, or none left), and whether
    they are merged into one stand-in per layer.

    The ladder, HFedMoE's device design first: with ``context.frozen_dtype`` set, a first-order device in experts
    mode gets C trained experts with every other one resident and frozen if one trained expert per layer fits that
    way; else (``context.merged``) with the others merged into a frozen stand-in (FLUX); else it is pruned to the C
    its budget affords (the router and top-k shrink to them).

    Raises:
        ConfigError: the profile has no usable budget. BudgetError: one expert per layer does not fit.
    """
    budget, order = budget_of(profile), training_order(profile)
    order = Order.ZEROTH if order == Order.HYBRID else order  # a split bottom is forward-only (planned as a whole)
    shape = TrainingShape(config.batch_size, config.seq_len, context.trainable_mode, context.lora_rank, order=order)
    if context.frozen_dtype is not None and order == Order.FIRST and context.trainable_mode == TrainableMode.EXPERTS:
        for merged in (False, True)[: 1 + context.merged]:
            try:
                kept = plan(
                    context.model, replace(shape, frozen_dtype=context.frozen_dtype, merged=merged), budget
                ).experts_per_layer
            except BudgetError:
                continue
            if kept == context.model.num_experts:
                return kept, None, False
            return kept, context.frozen_dtype, merged
    return plan(context.model, shape, budget).experts_per_layer, None, False


def estimated_work(context: FitContext, fit: FitIns, profile: Mapping[str, Any]) -> float:
    """The planner's compute estimate of one FitIns (GFLOP): ``export.planner.estimate``'s step for the experts it
    trains, what it holds frozen and its training order, at 1 GFLOP/s (so its seconds are GFLOP), times the local
    steps (an epoch, ``local_steps = 0``, counts as one step). Not divided by the profile's ``gflops``: it orders
    the round's deliveries longest first (``Coordinator._start_round``), which matters where devices share cores
    (the simulation, where a device's own ``gflops`` reading says only how busy the machine was when it started:
    2 to 171 GFLOP/s among the five devices of one run). 0.0 for a profile without a usable budget."""
    try:
        budget_of(profile)
    except ConfigError:
        return 0.0
    order = training_order(profile)
    order = Order.ZEROTH if order == Order.HYBRID else order
    shape = TrainingShape(
        fit.config.batch_size,
        fit.config.seq_len,
        fit.trainable_mode,
        fit.lora_rank,
        order=order,
        frozen_dtype=fit.frozen_dtype,
        merged=fit.merged,
    )
    kept = max((len(ids) for ids in fit.expert_ids), default=1)
    step = estimate(context.model, shape, kept, gflops=1.0).step_s
    return step * max(1, fit.config.local_steps)


def split_fit(
    context: FitContext, config: FitConfig, ids: tuple[tuple[int, ...], ...]
) -> tuple[tuple[tuple[int, ...], ...], FitConfig]:
    """A split device's ``(expert ids below the cut, FitConfig)`` from its whole-model selection ``ids``: the MoE
    layers below ``context.split.cut_layer`` (every decoder layer of the supported families is a MoE layer), the
    round's config with ``split`` set, no held-out evaluation (the bottom has no loss of its own) and no
    seed-and-scalar upload (its steps travel as scalars already).

    Raises:
        BudgetError: the federation has no ``[split]`` settings, or the cut is not inside the model.
    """
    split = context.split
    if split is None or not 1 <= split.cut_layer < len(ids):
        raise BudgetError(f"split mode needs a [split] cut_layer in [1, {len(ids)}), got {split}")
    return ids[: split.cut_layer], replace(config, split=split, eval_fraction=0.0, zo_seeds=0)


def expert_scores(
    calibration: RoutingStats, reported: RoutingStats | None, *, lam: float, beta: float
) -> list[np.ndarray]:
    """I(e) per MoE layer over the global experts, each ``(num_experts,)`` (see the module docstring)."""
    scores = [layer.information_score(lam, beta) for layer in calibration.layers]
    if reported is None or reported.expert_ids is None or reported.num_tokens == 0:
        return scores
    for layer, layer_ids, local in zip(scores, reported.expert_ids, reported.layers):
        ids = np.asarray(layer_ids, dtype=np.int64)
        device = local.information_score(lam, beta)
        mass, own = np.abs(layer[ids]).sum(), np.abs(device).sum()
        layer[ids] = device * (mass / own) if own > 0 else layer[ids]
    return scores
