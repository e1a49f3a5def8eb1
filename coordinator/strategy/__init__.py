"""Aggregation strategies, pure numpy: sparsity-aware (FedAvg, FedProx, FedMoE, HFedMoE, FedAlign-MoE), server
optimizers (FedAdam, FedYogi), client-level differential privacy (``dp-fedavg``) and the dense FedAvg baseline
(``dense-fedavg``): every one ``STRATEGIES`` registers.

One module per algorithm; the math in ``aggregate.py``; how experts are picked in ``selection.py``; messages
(ClientUpdate, FitIns ...) in ``types.py``; names -> classes in ``registry.py``.
"""

from coordinator.strategy.aggregate import (
    RowAccumulator,
    cosine_similarity,
    kl_divergence,
    weighted_loss_avg,
    weighted_metrics_avg,
)
from coordinator.strategy.base import SinglePassStrategy, Strategy, StreamingAggregation
from coordinator.strategy.dense_fedavg import DenseFedAvg
from coordinator.strategy.dp_fedavg import DPFedAvg
from coordinator.strategy.fedalign import FedAlign
from coordinator.strategy.fedavg import FedAvg
from coordinator.strategy.fedmoe import FedMoE
from coordinator.strategy.fedopt import FedAdam, FedYogi
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
    TensorRole,
    TensorSpec,
)
from coordinator.strategy.validate import validate_update
from device_runtime.hfedmoe_weights import hfedmoe_alpha

__all__ = [
    "STRATEGIES",
    "ClientEvaluation",
    "ClientInfo",
    "ClientUpdate",
    "DPFedAvg",
    "DenseFedAvg",
    "Failure",
    "FedAdam",
    "FedAlign",
    "FedAvg",
    "FedMoE",
    "FedProx",
    "FedYogi",
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
    "TensorSpec",
    "TensorRole",
    "cosine_similarity",
    "from_name",
    "hfedmoe_alpha",
    "kl_divergence",
    "validate_update",
    "weighted_loss_avg",
    "weighted_metrics_avg",
]
