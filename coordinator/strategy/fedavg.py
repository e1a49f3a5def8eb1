"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, Algorithm 1): w_{t+1} = sum_k (n_k / n) w^k_{t+1}, weights n_k = num_examples.

For sparse (pruned) updates each expert row is averaged over the clients that hold it:
E_e(t+1) = sum_{c holds e} n_c E_e(c) / sum_{c holds e} n_c; rows nobody holds keep their value.
When every client holds every expert this is the dense FedAvg baseline.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from coordinator.strategy.base import SinglePassStrategy
from coordinator.strategy.types import ClientUpdate
from device_runtime.bundle import TensorSpec


class FedAvg(SinglePassStrategy):
    """Example-weighted averaging of every tensor, per expert row over its holders."""

    name = "fedavg"
    secure_weighting: ClassVar[str | None] = "examples"

    def row_weights(
        self, update: ClientUpdate, name: str, meta: TensorSpec, num_experts: tuple[int, ...]
    ) -> np.ndarray | float:
        if not meta.indexed:
            return float(update.num_examples)
        return np.full(len(update.rows(meta)), float(update.num_examples))
