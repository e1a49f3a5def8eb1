"""The local-training interface of a device: fit, evaluate, get/set parameters (Flower-style names).

:class:`Trainer` is the interface; :class:`BundleTrainer` implements ``fit`` / ``evaluate`` over a bundle's
graph for a backend that supplies one optimizer step and one forward. The backends
(``device_runtime.backends``): :class:`~device_runtime.ort_trainer.OrtTrainer` (first-order, ONNX Runtime
training) and :class:`~device_runtime.zo_trainer.ZoTrainer` (zeroth-order, plain onnxruntime inference).
"""

from __future__ import annotations

import itertools
import math
import resource
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal

import numpy as np

from device_runtime.bundle import Bundle, Manifest
from device_runtime.data import Batch
from device_runtime.errors import ConfigError, DataError
from device_runtime.graph_io import CE_LOSS, LOSS, NUM_TOKENS, batch_feeds, constant_inputs, stats_names, target_tokens
from device_runtime.memory import status_kib
from device_runtime.stats import RoutingStats
from device_runtime.zo_directions import Distribution


@dataclass(frozen=True)
class FitResult:
    """What one local ``fit`` produced.

    Attributes:
        num_examples: sequences trained on (counted once per step they were in).
        num_tokens: non-padding tokens trained on.
        losses: training loss of each optimizer step, in order.
        step_time_s: mean wall-clock seconds per step (forward + backward + optimizer).
        peak_rss_bytes: peak resident set size of this process so far (``resource.getrusage``), bytes.
        routing: routing statistics accumulated over the steps, over every expert the bundle holds
            (``Manifest.held_ids``).
        trained_experts: per MoE layer, local indices of the trained experts that received a routed token
            (hence a gradient); experts held frozen never count.
        zo_coefficients: zeroth-order backends only: ``(seed, c)`` pairs, one per distinct step seed, with
            ``theta_after = theta_before + sum c * z(seed)`` over the trainable tensors (``zo_directions``).
        zo_distribution: the distribution of those directions ``z`` (``"rademacher"`` or ``"gaussian"``).
    """

    num_examples: int
    num_tokens: int
    losses: tuple[float, ...]
    step_time_s: float
    peak_rss_bytes: int
    routing: RoutingStats
    trained_experts: tuple[tuple[int, ...], ...]
    zo_coefficients: tuple[tuple[int, float], ...] = ()
    zo_distribution: Distribution = "rademacher"


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
    """Trains a device's pruned expert subset on local batches.

    Attributes:
        backend: the registry name (``"ort-training"``, ``"zo"``). order: ``"first-order"`` or
            ``"zeroth-order"``.
    """

    backend: ClassVar[str]
    order: ClassVar[str]

    @abstractmethod
    def __init__(self, bundle: Bundle | str, *, threads: int | None = None, progress: bool = True) -> None:
        """Load ``bundle`` (a :class:`Bundle` or its directory) with at most ``threads`` compute threads; ``progress``
        shows a progress bar while fitting. ``backends.create_trainer`` builds every backend this way (a
        zeroth-order backend takes more keyword options)."""

    @abstractmethod
    def fit(
        self,
        batches: Iterable[Batch],
        *,
        steps: int,
        learning_rate: float,
        aux_loss_coef: float = 0.01,
        routing_prior: list[np.ndarray] | None = None,
        routing_reg_coef: float = 0.0,
        prox_mu: float = 0.0,
        answer_shift: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> FitResult:
        """Run ``steps`` optimizer steps, one per batch taken from ``batches``.

        Args:
            batches: an iterable of :class:`Batch` (e.g. ``LocalDataset.train_batches``); must yield at
                least ``steps`` batches.
            steps: optimizer steps (>= 1).
            learning_rate: the backend's step size (AdamW for first-order, SGD for zeroth-order).
            aux_loss_coef: load-balancing loss coefficient.
            routing_prior: FedAlign-MoE global routing distribution per MoE layer, each ``(E_l,)``
                (uniform when None).
            routing_reg_coef: lambda_r of the FedAlign-MoE term ``lambda_r * KL(p_local || p_global)``.
            prox_mu: FedProx mu (only for bundles whose shape key has ``prox``); the anchor is the
                parameters at the start of ``fit``.
            answer_shift: the logit adjustment ``(answer_ids (A,), answer_bias (A,))`` of the first answer token
                (``device_runtime.answer_prior``); None: none.

        Raises:
            ConfigError: invalid argument. DataError: fewer batches than ``steps``.
        """

    def start_round(self, zeroth_order: dict[str, Any]) -> None:  # noqa: B027 (a no-op default; ZoTrainer overrides it)
        """Prepare a kept trainer for another round (``device_runtime.trainer_cache``); the round's tensors are
        loaded next with :meth:`set_parameters`. First-order: nothing to do, AdamW's moments carry over.

        Args:
            zeroth_order: the round's zeroth-order settings (``seed``, ``candidates``), as at construction.
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


class BundleTrainer(Trainer):
    """``fit`` and ``evaluate`` over a bundle's graph; a backend supplies :meth:`_step` and :meth:`_forward`.

    Feeds and outputs are dicts by graph name (``device_runtime.graph_io``); weights are the backend's
    business (held in ORT state, or fed as graph inputs).
    """

    manifest: Manifest
    progress: bool = False

    @abstractmethod
    def _step(self, feeds: dict[str, np.ndarray], *, learning_rate: float, step: int) -> dict[str, np.ndarray]:
        """One optimizer step on one batch; the outputs (``loss``, ``num_tokens``, ``routing_stats_{l}``) of
        the forward at the parameters before the step."""

    @abstractmethod
    def _forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The eval graph's outputs by name at the current parameters (no update)."""

    def _begin_fit(self, *, learning_rate: float, steps: int) -> None:
        """Called before the first step of ``fit``."""

    def weight_feeds(self) -> dict[str, np.ndarray]:
        """Bundle tensors fed as graph inputs (``graph_io.weight_inputs``: frozen experts), by name; none by
        default (a backend that binds them itself)."""
        return {}

    def fit(
        self,
        batches: Iterable[Batch],
        *,
        steps: int,
        learning_rate: float,
        aux_loss_coef: float = 0.01,
        routing_prior: list[np.ndarray] | None = None,
        routing_reg_coef: float = 0.0,
        prox_mu: float = 0.0,
        answer_shift: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> FitResult:
        """See :meth:`Trainer.fit`. Shapes: ``routing_prior[l]`` is ``(E_l,)``.

        Raises:
            ConfigError: ``steps < 1``, a non-positive or non-finite learning rate, a bad prior or
                ``prox_mu > 0`` without a FedProx graph.
            DataError: ``batches`` ran out before ``steps`` batches.
        """
        if steps < 1 or not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ConfigError(f"need steps >= 1 and a finite learning rate > 0, got {steps}, {learning_rate}")
        constants = constant_inputs(
            self.manifest,
            aux_loss_coef=aux_loss_coef,
            routing_prior=routing_prior,
            routing_reg_coef=routing_reg_coef,
            prox_mu=prox_mu,
            anchors=self.get_parameters,
            answer_shift=answer_shift,
        )
        self._begin_fit(learning_rate=learning_rate, steps=steps)
        constants.update(self.weight_feeds())
        held = self.manifest.held_ids()
        routing = RoutingStats(tuple(map(len, held)), held)
        losses, examples, tokens, elapsed = [], 0, 0, 0.0
        with ProgressBar(self.progress, steps) as advance:
            for step, batch in enumerate(itertools.islice(batches, steps)):
                start = time.perf_counter()
                outputs = self._step(
                    batch_feeds(self.manifest, batch, constants), learning_rate=learning_rate, step=step
                )
                elapsed += time.perf_counter() - start
                losses.append(float(outputs[LOSS]))
                routing.update([outputs[n] for n in stats_names(self.manifest)], int(outputs[NUM_TOKENS]))
                examples, tokens = examples + batch.num_examples, tokens + batch.num_tokens
                advance(losses[-1])
        if len(losses) < steps:
            raise DataError(f"local data gave only {len(losses)} batches for {steps} steps")
        return FitResult(
            num_examples=examples,
            num_tokens=tokens,
            losses=tuple(losses),
            step_time_s=elapsed / steps,
            peak_rss_bytes=peak_rss_bytes(),
            routing=routing,
            trained_experts=tuple(
                tuple(i for i in local if i < count)
                for local, count in zip(routing.trained_experts(), self.manifest.shape_key.experts_per_layer)
            ),
        )

    def evaluate(self, batches: Iterable[Batch]) -> EvaluateResult:
        """Mean cross-entropy (``ce_loss``, else ``loss``) weighted by each batch's target tokens.

        Raises:
            DataError: ``batches`` is empty or holds no target token.
        """
        constants = constant_inputs(
            self.manifest,
            aux_loss_coef=0.0,
            routing_prior=None,
            routing_reg_coef=0.0,
            prox_mu=0.0,
            anchors=self.get_parameters,
        )
        constants.update(self.weight_feeds())
        key = CE_LOSS if CE_LOSS in self.manifest.outputs else LOSS
        total, targets, examples, tokens = 0.0, 0, 0, 0
        for batch in batches:
            count = target_tokens(batch)
            if count:
                total += float(self._forward(batch_feeds(self.manifest, batch, constants))[key]) * count
            targets, examples, tokens = targets + count, examples + batch.num_examples, tokens + batch.num_tokens
        if targets == 0:
            raise DataError("no evaluation batch holds a target (completion) token")
        return EvaluateResult(loss=total / targets, num_examples=examples, num_tokens=tokens)


class ProgressBar:
    """A rich progress bar over ``steps`` showing the last loss; a no-op when disabled."""

    def __init__(self, enabled: bool, steps: int):
        self.enabled, self.steps = enabled, steps

    def __enter__(self) -> Callable[[float], object]:
        if not self.enabled:
            return lambda loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("local training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            transient=True,
        )
        self._progress.__enter__()
        task = self._progress.add_task("fit", total=self.steps, loss="-")
        return lambda loss: self._progress.update(task, advance=1, loss=f"{loss:.4f}")

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> Literal[False]:
        if self.enabled:
            self._progress.__exit__(kind, value, traceback)
        return False
