"""Dense FedAvg, the baseline a Flower user gets (McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017, Algorithm 1): w_{t+1} = sum_k (n_k / n) w^k_{t+1}.

Every client trains the whole model: all experts of every MoE layer and every router. A device whose budget
cannot hold all of them sits the round out (with plain FedAvg it would run out of memory). ``fedavg`` is the
sparse variant: each client trains its budgeted subset and each expert row is averaged over its holders.
"""

from __future__ import annotations

from coordinator.strategy.fedavg import FedAvg
from coordinator.strategy.selection import affordable_experts
from coordinator.strategy.types import ClientInfo, FitIns
from device_runtime.wire import FitConfig


class DenseFedAvg(FedAvg):
    """FedAvg over the clients that can hold every expert; the others sit out."""

    name = "dense-fedavg"

    def fit_ins(self, server_round: int, client: ClientInfo, config: FitConfig) -> FitIns | None:
        """All experts of every layer, or None (sit out) if the budget affords fewer.

        Raises:
            ConfigError: the profile has no usable budget. BudgetError: one expert per layer does not fit.
        """
        context = self._bound()
        total = context.model.num_experts
        if affordable_experts(context, config, client.profile) < total:
            return None
        every = tuple(tuple(range(total)) for _ in range(context.model.moe_layers))
        return FitIns(every, config, context.trainable_mode, context.lora_rank)
