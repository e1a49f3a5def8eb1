"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, eq. 2).

Each client minimises h_k(w; w_t) = F_k(w) + (mu / 2) ||w - w_t||^2; the server aggregates as FedAvg.
``configure_fit`` sends ``prox_mu`` (mu); the device's graph takes the anchor w_t as extra inputs
(``ShapeKey.prox``).
"""

from __future__ import annotations

import dataclasses

from coordinator.strategy.fedavg import FedAvg
from coordinator.strategy.types import StrategyState
from device_runtime.errors import ConfigError
from device_runtime.wire import FitConfig


class FedProx(FedAvg):
    """FedAvg aggregation plus the proximal coefficient ``prox_mu`` sent to every client."""

    name = "fedprox"
    secure_weighting = None  # coordinator.secagg.NOT_SECURE says why

    def __init__(self, prox_mu: float = 0.01):
        """Args:
            prox_mu: mu of the proximal term, >= 0 (Li et al. try 0.001-1).
        Raises:
            ConfigError: ``prox_mu`` is negative.
        """
        if not prox_mu >= 0:
            raise ConfigError(f"prox_mu must be >= 0, got {prox_mu}")
        self.prox_mu = float(prox_mu)

    def fit_config(self, server_round: int, state: StrategyState | None = None) -> FitConfig:
        return dataclasses.replace(super().fit_config(server_round, state), prox_mu=self.prox_mu)
