"""The local-training interface of a device: fit, evaluate, get/set parameters (Flower-style names).

:class:`device_runtime.ort_trainer.OrtTrainer` implements it with ONNX Runtime training; other backends
(e.g. forward-only zeroth-order training for inference-only devices, DESIGN.md section 2 "Later") would
implement the same interface.
"""

from __future__ import annotations

import resource
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from device_runtime.data import Batch
from device_runtime.memory import status_kib
from device_runtime.stats import RoutingStats


@dataclass(frozen=True)
class FitResult:
    """What one local ``fit`` produced.

    Attributes:
        num_examples: sequences trained on (counted once per step they were in).
        num_tokens: non-padding tokens trained on.
        losses: training loss of each optimizer step, in order.
        step_time_s: mean wall-clock seconds per step (forward + backward + optimizer).
        peak_rss_bytes: peak resident set size of this process so far (``resource.getrusage``), bytes.
        routing: routing statistics accumulated over the steps.
        trained_experts: per MoE layer, local indices of the experts that received a routed token
            (hence a gradient).
    """

    num_examples: int
    num_tokens: int
    losses: tuple[float, ...]
    step_time_s: float
    peak_rss_bytes: int
    routing: RoutingStats
    trained_experts: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class EvaluateResult:
    """Evaluation on local data.

    Attributes:
        loss: token-weighted mean loss over the batches (nats per completion token).
        num_examples: sequences evaluated. num_tokens: non-padding tokens evaluated.
    """

    loss: float
    num_examples: int
    num_tokens: int


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``: exec keeps the high-water mark of the
    forked pre-exec image, so a process started by a 2 GiB parent reports >= 2 GiB (measured: 2066 MiB
    ``ru_maxrss`` for a 13 MiB ``VmHWM``). Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Trainer(ABC):
    """Trains a device's pruned expert subset on local batches."""

    @abstractmethod
    def fit(self, batches: Iterable[Batch], *, steps: int, learning_rate: float, aux_loss_coef: float = 0.01,
            routing_prior: list[np.ndarray] | None = None, routing_kl_coef: float = 0.0,
            prox_mu: float = 0.0) -> FitResult:
        """Run ``steps`` optimizer steps, one per batch taken from ``batches``.

        Args:
            batches: an iterable of :class:`Batch` (e.g. ``LocalDataset.train_batches``); must yield at
                least ``steps`` batches.
            steps: optimizer steps (>= 1).
            learning_rate: AdamW learning rate.
            aux_loss_coef: load-balancing loss coefficient.
            routing_prior: FedAlign-MoE global routing distribution per MoE layer, each ``(E_l,)``
                (uniform when None).
            routing_kl_coef: lambda_r of the FedAlign-MoE term ``lambda_r * KL(p_local || p_global)``.
            prox_mu: FedProx mu (only for bundles whose shape key has ``prox``); the anchor is the
                parameters at the start of ``fit``.

        Raises:
            ConfigError: invalid argument. DataError: fewer batches than ``steps``.
        """

    @abstractmethod
    def evaluate(self, batches: Iterable[Batch]) -> EvaluateResult:
        """Loss of the current parameters on ``batches`` (no update)."""

    @abstractmethod
    def get_parameters(self) -> dict[str, np.ndarray]:
        """Current values of the bundle's tensors (``Manifest.tensors``), by name."""

    @abstractmethod
    def set_parameters(self, parameters: dict[str, np.ndarray]) -> None:
        """Overwrite some or all of the bundle's tensors.

        Raises:
            BundleError: an unknown name, or a shape / dtype that differs from the manifest.
        """
