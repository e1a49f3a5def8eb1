"""Sparsity-aware aggregation strategies (FedAvg, FedProx, FedMoE, HFedMoE, FedAlign-MoE), pure numpy.

One module per algorithm; the math in ``aggregate.py``; how experts are picked in ``selection.py``; messages
(ClientUpdate, FitIns ...) in ``types.py``; names -> classes in ``registry.py``.
"""

from coordinator.strategy.aggregate import (
    RowAccumulator,
    cosine_similarity,
    hfedmoe_alpha,
    kl_divergence,
    weighted_loss_avg,
    weighted_metrics_avg,
)
from coordinator.strategy.base import SinglePassStrategy, Strategy, StreamingAggregation
from coordinator.strategy.fedalign import FedAlign
from coordinator.strategy.fedavg import FedAvg
from coordinator.strategy.fedmoe import FedMoE
from coordinator.strategy.fedprox import FedProx
from coordinator.strategy.hfedmoe import HFedMoE
from coordinator.strategy.registry import STRATEGIES, from_name
from coordinator.strategy.types import (
    ClientEvaluation,
    ClientInfo,
    ClientUpdate,
    Failure,
    FitContext,
    FitIns,
    LayerRouting,
    MetricsAggregationFn,
    Params,
    Results,
    TensorMeta,
    TensorRole,
)
from coordinator.strategy.validate import validate_update

__all__ = [
    "STRATEGIES",
    "ClientEvaluation",
    "ClientInfo",
    "ClientUpdate",
    "Failure",
    "FedAlign",
    "FedAvg",
    "FedMoE",
    "FedProx",
    "FitContext",
    "FitIns",
    "HFedMoE",
    "LayerRouting",
    "MetricsAggregationFn",
    "Params",
    "Results",
    "RowAccumulator",
    "SinglePassStrategy",
    "Strategy",
    "StreamingAggregation",
    "TensorMeta",
    "TensorRole",
    "cosine_similarity",
    "from_name",
    "hfedmoe_alpha",
    "kl_divergence",
    "validate_update",
    "weighted_loss_avg",
    "weighted_metrics_avg",
]
