"""HFedMoE (Fang et al., "HFedMoE: Resource-aware Heterogeneous Federated Learning with Mixture-of-Experts",
arXiv 2601.00583), sparsity-aware aggregation, with the paper's flaws fixed (``docs/algorithms.md``).

Experts: E_e(t+1) = sum_{c in C_e} |D_c| E_e(c) / sum_{c in C_e} |D_c| with
C_e = {c : e held by c, u_c(e) >= tau and e in trained_experts_c}. The paper's test u_c(e) >= tau alone
does not prove that c updated e, so a held-but-frozen copy is never taken. Experts with C_e empty keep
their previous weights.

Router (gate): p_c(e) = u_c(e) * s_c(e), alpha(c) = sum_{e in S_c} p_c(e) / |S_global| per layer, with
s_c(e) = lambda s_cum(e) + (1 - lambda) s_spec(e) recomputed from the reported statistics. Router row e is
the alpha-weighted mean over the clients that HELD e only; alpha is normalised per row over those holders
(the paper leaves it unnormalised). A row whose holders all have alpha = 0 keeps its previous value.
A client that held a single expert of a layer did not train that layer's router: the softmax over one logit
is constant, so its router gradient is zero (load-balancing loss included). Its row counts with weight 0,
instead of alpha = u s / |S_global| = 1 / |S_global|, the largest any client can have, pulling the row back
to its old value.

Unindexed tensors (OTHER) are |D_c|-weighted averages over all clients. All three are single-pass:
per-row normalisation happens in ``finish`` from the weight totals.
"""

from __future__ import annotations

import numpy as np

from coordinator.strategy.base import SinglePassStrategy
from coordinator.strategy.types import ClientUpdate
from device_runtime.bundle import TensorRole, TensorSpec
from device_runtime.errors import ConfigError
from device_runtime.hfedmoe_weights import expert_weights, router_weight
from device_runtime.stats import IMPORTANCE_BETA, IMPORTANCE_LAMBDA
from device_runtime.wire import ImportanceWeighting


class HFedMoE(SinglePassStrategy):
    """Usage-thresholded expert aggregation and importance-weighted router aggregation."""

    name = "hfedmoe"
    secure_weighting = "hfedmoe"  # each device weighs its rows itself (device_runtime.hfedmoe_weights)

    def __init__(self, tau: float = 0.01, lam: float = IMPORTANCE_LAMBDA, beta: float = IMPORTANCE_BETA):
        """Args:
            tau: usage threshold on u_c(e) (a mean router probability, in [0, 1]).
            lam: lambda of s_b = lambda s_cum + (1 - lambda) s_spec, in [0, 1].
            beta: beta of I_b = s_b - beta KL (the importance that ranks the experts a client keeps), >= 0.
        Raises:
            ConfigError: a parameter is out of range.
        """
        if not 0.0 <= tau <= 1.0 or not 0.0 <= lam <= 1.0 or not beta >= 0.0:
            raise ConfigError(f"need 0 <= tau <= 1, 0 <= lam <= 1, beta >= 0; got tau={tau}, lam={lam}, beta={beta}")
        self.tau, self.lam, self.beta = float(tau), float(lam), float(beta)

    def secure_importance(self) -> ImportanceWeighting:
        """tau, lam and the global experts per MoE layer. Raises ConfigError: the strategy is not bound."""
        model = self._bound().model
        return ImportanceWeighting(self.tau, self.lam, (model.num_experts,) * model.moe_layers)

    def row_weights(
        self, update: ClientUpdate, name: str, meta: TensorSpec, num_experts: tuple[int, ...]
    ) -> np.ndarray | float:
        if meta.role is TensorRole.SHARED:
            return float(update.num_examples)
        ids = update.rows(meta)
        layer = meta.moe_layer
        stats = update.routing[layer]  # over held_ids: ids first
        if meta.role is TensorRole.ROUTER:
            return np.full(len(ids), router_weight(stats, len(ids), num_experts[layer], self.lam))
        return expert_weights(stats, ids, update.trained_experts[layer], update.num_examples, self.tau)
