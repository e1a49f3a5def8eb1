"""HFedMoE's aggregation weights of one device's rows (Fang et al., "HFedMoE", arXiv 2601.00583; the rule and its
fixes are in ``coordinator.strategy.hfedmoe``), in one place for the coordinator, which computes them from an
update in clear, and the device, which pre-scales its rows by them under secure aggregation
(``device_runtime.secagg``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from device_runtime.stats import LayerRouting


def hfedmoe_alpha(usage: np.ndarray, scores: np.ndarray, num_global_experts: int) -> float:
    """HFedMoE gate weight of a client for one layer (arXiv 2601.00583, gate aggregation).

    alpha(c) = sum_{e in S_c} p_c(e) / |S_global| with p_c(e) = u_c(e) * s_c(e).
    The paper leaves alpha unnormalised; the strategy normalises it per router row over the holders.

    Args:
        usage: u_c(e), ``(E_local,)``. scores: s_c(e), ``(E_local,)``. num_global_experts: |S_global|.
    """
    return float(np.sum(np.asarray(usage) * np.asarray(scores)) / num_global_experts)


def router_weight(stats: LayerRouting, num_held: int, num_global_experts: int, lam: float) -> float:
    """The weight of every router row of one layer a client held ``num_held`` experts of: alpha over its
    importance ``s_b = lam s_cum + (1 - lam) s_spec``, or 0 when it held one expert (a one-logit router gets no
    gradient, see ``coordinator.strategy.hfedmoe``)."""
    if num_held < 2:
        return 0.0
    return hfedmoe_alpha(stats.usage, stats.importance(lam), num_global_experts)


def expert_weights(
    stats: LayerRouting, ids: Sequence[int], trained: Collection[int], num_examples: float, tau: float
) -> np.ndarray:
    """The weights of a client's expert rows ``ids`` (global ids, the first of its held experts, as its routing
    statistics list them): ``num_examples`` where the expert's usage u_c(e) >= ``tau`` and the client trained it
    (it is in ``trained``), else 0; shape ``(len(ids),)``."""
    keep = (np.asarray(stats.usage)[: len(ids)] >= tau) & np.array([g in trained for g in ids], bool)
    return np.where(keep, float(num_examples), 0.0)
