"""FedAdam and FedYogi: a server-side optimizer over FedAvg's average (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2).

Per tensor, with Delta_t = FedAvg(updates) - x_t (each expert row averaged over its holders, as ``fedavg``):
m_t = beta_1 m_{t-1} + (1 - beta_1) Delta_t;
v_t = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2 (FedAdam), or
v_t = v_{t-1} - (1 - beta_2) Delta_t^2 sign(v_{t-1} - Delta_t^2) (FedYogi);
x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau).  m and v start at 0, as in Flower's implementation; a tensor no
client sent this round keeps its value and its moments.
The moments are the strategy's state (``m/<tensor>``, ``v/<tensor>``): taken and returned by ``aggregate_fit``,
committed with each version, restored at restart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.strategy.base import split_state
from coordinator.strategy.fedavg import FedAvg
from coordinator.strategy.types import Aggregated, Failure, Params, Results, StrategyState
from device_runtime.errors import ConfigError


class FedAdam(FedAvg):
    """FedAvg's average as a pseudo-gradient for a server Adam step of size ``eta``."""

    name = "fedadam"
    secure_weighting = None  # coordinator.secagg.NOT_SECURE says why

    def __init__(self, eta: float = 1e-3, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-9):
        if not (eta > 0 and 0 <= beta_1 < 1 and 0 <= beta_2 < 1 and tau > 0):
            raise ConfigError(f"need eta > 0, 0 <= beta_1, beta_2 < 1, tau > 0; got {eta}, {beta_1}, {beta_2}, {tau}")
        self.eta, self.beta_1, self.beta_2, self.tau = float(eta), float(beta_1), float(beta_2), float(tau)

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * delta_sq

    state_kinds = ("m", "v")  # the moments (the tensor's shape and dtype); none before a tensor's first step

    def aggregate_fit(
        self,
        server_round: int,
        results: Results,
        failures: Sequence[Failure],
        global_params: Params,
        state: StrategyState | None = None,
    ) -> Aggregated:
        averaged, metrics, _ = super().aggregate_fit(server_round, results, failures, global_params)
        moments = split_state(self.name, state or {}, self.state_kinds)
        m_all, v_all = dict(moments["m"]), dict(moments["v"])
        out = dict(averaged)
        for name, x in global_params.items():
            if averaged[name] is x:  # no client sent it: it stays (shared, like every strategy's unchanged tensors)
                continue
            delta = averaged[name].astype(np.float32) - x
            m = self.beta_1 * m_all.get(name, 0.0) + (1 - self.beta_1) * delta
            v = self.second_moment(v_all.get(name, np.zeros_like(delta)), delta * delta)
            m_all[name], v_all[name] = m, v
            out[name] = (x + self.eta * m / (np.sqrt(v) + self.tau)).astype(x.dtype)
        return Aggregated(
            out, metrics, {f"m/{n}": a for n, a in m_all.items()} | {f"v/{n}": a for n, a in v_all.items()}
        )


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment (v changes by at most (1 - beta_2) Delta^2 a round)."""

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        moment: np.ndarray = v - (1 - self.beta_2) * delta_sq * np.sign(v - delta_sq)
        return moment
