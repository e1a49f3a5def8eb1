"""Strategy names -> classes, for configs and the command line (``--strategy hfedmoe``)."""

from __future__ import annotations

from typing import Any

from coordinator.strategy.base import Strategy
from coordinator.strategy.dense_fedavg import DenseFedAvg
from coordinator.strategy.dp_fedavg import DPFedAvg
from coordinator.strategy.fedalign import FedAlign
from coordinator.strategy.fedavg import FedAvg
from coordinator.strategy.fedmoe import FedMoE
from coordinator.strategy.fedopt import FedAdam, FedYogi
from coordinator.strategy.fedprox import FedProx
from coordinator.strategy.hfedmoe import HFedMoE
from device_runtime.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, DenseFedAvg, FedAdam, FedYogi, FedProx, FedMoE, HFedMoE, FedAlign, DPFedAvg)
}


def from_name(name: str, **kwargs: Any) -> Strategy:
    """Build the strategy registered as ``name`` with keyword arguments ``kwargs``.

    Raises:
        ConfigError: unknown name, or arguments the strategy does not take.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from exc
