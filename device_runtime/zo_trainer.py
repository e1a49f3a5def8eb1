"""Zeroth-order local training on plain onnxruntime: MeZO (Malladi et al., NeurIPS 2023) on a bundle's
``eval_model.onnx``, no gradients, no optimizer state, no stored activations.

One step on a batch B with step seed s (MeZO Algorithm 1; SPSA, Spall 1992; eq. 1 of the paper)::

    theta <- theta + eps z(s);      L+ = L(theta; B)
    theta <- theta - 2 eps z(s);    L- = L(theta; B)
    g = (L+ - L-) / (2 eps)                              projected gradient (a scalar)
    theta <- theta + (eps - lr g) z(s)                   restore and SGD step in one regeneration

with ``z(s)`` regenerated from the seed in each line, never stored (``device_runtime.zo_directions``), and
``theta`` only the bundle's trainable tensors (kept experts + router, or their LoRA adapters). Memory is an
inference session plus the weights (frozen ones are read-only views of the checkpoint file's bytes) plus one
direction chunk. The weights are graph inputs of ``eval_model.onnx``: they are bound once to the session
through IO binding over the same numpy buffers, so a perturbation in place is what the next forward sees
and nothing is copied or rebuilt per step.

``loss`` reported per step is (L+ + L-) / 2; routing statistics come from the L+ forward (at a point
``eps`` away from theta). Every trainable tensor is perturbed and updated, including experts no token
reached in a batch: their projected-gradient steps are noise, and ``trained_experts`` (experts that got
routed tokens) tells the coordinator which to aggregate.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from device_runtime.bundle import Bundle, load_bundle
from device_runtime.data import Batch
from device_runtime.errors import BundleError, ConfigError
from device_runtime.graph_io import DTYPES, LOSS, NUM_TOKENS, checked_parameters, read_weights, stats_names
from device_runtime.modes import ZO_BACKEND, Order
from device_runtime.ort_api import import_onnxruntime
from device_runtime.ort_checkpoint import read_checkpoint
from device_runtime.trainer import BundleTrainer, FitResult
from device_runtime.zo_directions import DISTRIBUTIONS, Distribution, perturb

EVAL_MODEL = "eval_model.onnx"


class ZoTrainer(BundleTrainer):
    """Trains a bundle's trainable tensors with two forwards per step (MeZO / SPSA), on any onnxruntime.

    Args:
        bundle: a verified :class:`~device_runtime.bundle.Bundle` or a bundle directory (verified here).
        threads: ORT intra-op threads (None: one per core). progress: rich progress bar during ``fit``.
        eps: perturbation scale epsilon (MeZO's default 1e-3). seed: seed of the step seeds.
        distribution: of the directions, ``"rademacher"`` or ``"gaussian"`` (``zo_directions``).
        candidates: FedKSeed's candidate seeds (each step draws one uniformly); empty: any 63-bit seed.

    Raises:
        BundleError: the bundle is malformed, or its graph / checkpoint / weights disagree with the manifest.
        ConfigError: no onnxruntime, ``threads < 1``, ``eps`` not finite and > 0, or an unknown distribution.
    """

    backend, order = ZO_BACKEND, Order.ZEROTH

    def __init__(
        self,
        bundle: Bundle | str,
        *,
        threads: int | None = None,
        progress: bool = True,
        eps: float = 1e-3,
        seed: int | tuple[int, ...] = 0,
        distribution: str = "rademacher",
        candidates: Sequence[int] = (),
    ):
        if not (math.isfinite(eps) and eps > 0) or distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"need a finite eps > 0 and a distribution in {DISTRIBUTIONS}, got {eps}, {distribution!r}"
            )
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.manifest, self.progress = self.bundle.manifest, progress
        if self.manifest.shape_key.frozen_dtype is not None:
            raise BundleError(
                f"bundle {self.manifest.shape_key.id} holds frozen experts, which the zeroth-order "
                "backend does not feed; train it with the ort-training backend"
            )
        self.eps = float(eps)
        self.distribution: Distribution = "gaussian" if distribution == "gaussian" else "rademacher"  # checked above
        self.start_round({"seed": seed, "candidates": candidates})
        self._coefficients: dict[int, float] = {}
        self._specs = {spec.name: spec for spec in self.manifest.tensors}
        self._weights = read_checkpoint(self.bundle.path("checkpoint"))
        self._weights.update(read_weights(self.bundle))
        self._trainable = list(self.manifest.trainable_names)
        for name in self._trainable:  # writable float32 buffers, perturbed in place
            self._weights[name] = np.array(self._weights[name], dtype=np.float32, order="C")
        self._ort = import_onnxruntime()
        self._session = inference_session(self._ort, self.bundle, threads)
        self._outputs = self._check_graph()
        self._binding = self._bind_weights()

    def _check_graph(self) -> tuple[str, ...]:
        """The output names; raise BundleError if the eval graph, checkpoint and manifest disagree."""
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = tuple(o.name for o in self._session.get_outputs())
        data_inputs = tuple(n for n in inputs if n not in self._weights)
        missing = [n for n in (LOSS, NUM_TOKENS, *stats_names(self.manifest)) if n not in outputs]
        unknown = [n for n in self._specs if n not in inputs]
        if data_inputs != self.manifest.inputs or missing or unknown:
            raise BundleError(
                f"{EVAL_MODEL} takes {data_inputs[:6]} besides weights (manifest "
                f"{self.manifest.inputs[:6]}), lacks outputs {missing} or tensors {unknown[:3]}; "
                "re-export the bundle"
            )
        return outputs

    def _bind_weights(self) -> Any:  # an onnxruntime IOBinding (onnxruntime ships no type information)
        """An IO binding holding every weight as an OrtValue over its numpy buffer (no copy)."""
        binding = self._session.io_binding()
        weight_inputs = [i.name for i in self._session.get_inputs() if i.name in self._weights]
        self._ortvalues = {n: self._ort.OrtValue.ortvalue_from_numpy(self._weights[n]) for n in weight_inputs}
        for name, value in self._ortvalues.items():
            binding.bind_ortvalue_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        return binding

    def start_round(self, zeroth_order: dict[str, Any]) -> None:
        """Draw this round's step seeds from ``zeroth_order["seed"]`` among ``zeroth_order["candidates"]``."""
        self._seeds = np.random.default_rng(zeroth_order.get("seed", 0))
        self._candidates: tuple[int, ...] = tuple(zeroth_order.get("candidates", ()))

    # -- parameters -------------------------------------------------------------------------------------

    def get_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the manifest's tensors, by name, each of its manifest shape and dtype."""
        return {name: np.array(self._weights[name], dtype=DTYPES[spec.dtype]) for name, spec in self._specs.items()}

    def set_parameters(self, parameters: dict[str, np.ndarray]) -> None:
        """Overwrite manifest tensors in place (the bound buffers).

        Raises:
            BundleError: an unknown name, a shape differing from the manifest, or a non-finite value.
        """
        for name, value in checked_parameters(self._specs, parameters):
            target = self._weights[name]
            if not target.flags.writeable:  # a frozen manifest tensor still on the checkpoint's bytes
                self._weights[name] = target = np.array(target)
                self._ortvalues[name] = self._ort.OrtValue.ortvalue_from_numpy(target)
                self._binding.bind_ortvalue_input(name, self._ortvalues[name])
            np.copyto(target, value, casting="unsafe")

    # -- training ---------------------------------------------------------------------------------------

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
        """See :meth:`Trainer.fit`; the result's ``zo_coefficients`` rebuild this fit's change from seeds (drawn from
        ``zo_distribution``)."""
        self._coefficients = {}
        result = super().fit(
            batches,
            steps=steps,
            learning_rate=learning_rate,
            aux_loss_coef=aux_loss_coef,
            routing_prior=routing_prior,
            routing_reg_coef=routing_reg_coef,
            prox_mu=prox_mu,
            answer_shift=answer_shift,
        )
        return dataclasses.replace(
            result, zo_coefficients=tuple(self._coefficients.items()), zo_distribution=self.distribution
        )

    def _next_seed(self) -> int:
        if self._candidates:
            return self._candidates[int(self._seeds.integers(len(self._candidates)))]
        return int(self._seeds.integers(2**63))

    def _step(self, feeds: dict[str, np.ndarray], *, learning_rate: float, step: int) -> dict[str, np.ndarray]:
        """One MeZO step (module docstring); outputs of the L+ forward, ``loss`` = (L+ + L-) / 2.

        Raises:
            ConfigError: a non-finite loss (theta is restored first): lower eps or the learning rate.
        """
        seed, theta = self._next_seed(), [self._weights[n] for n in self._trainable]
        perturb(theta, seed, self.eps, distribution=self.distribution)
        plus = self._forward(feeds)
        perturb(theta, seed, -2.0 * self.eps, distribution=self.distribution)
        minus = float(self._forward(feeds)[LOSS])
        loss_plus = float(plus[LOSS])
        projected = (loss_plus - minus) / (2.0 * self.eps)
        if not math.isfinite(projected):
            perturb(theta, seed, self.eps, distribution=self.distribution)
            raise ConfigError(
                f"zeroth-order step {step}: loss {loss_plus} / {minus} is not finite; lower eps "
                f"({self.eps}) or the learning rate ({learning_rate})"
            )
        perturb(theta, seed, self.eps - learning_rate * projected, distribution=self.distribution)
        self._coefficients[seed] = self._coefficients.get(seed, 0.0) - learning_rate * projected
        return {**plus, LOSS: np.asarray((loss_plus + minus) / 2.0, dtype=np.float32)}

    def _forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in feeds.items():
            self._binding.bind_cpu_input(name, value)
        self._session.run_with_iobinding(self._binding)
        return dict(zip(self._outputs, self._binding.copy_outputs_to_cpu()))


def inference_session(ort: types.ModuleType, bundle: Bundle, threads: int | None, graph: str = EVAL_MODEL) -> Any:
    """An ``InferenceSession`` (of the ``onnxruntime`` module ``ort``) on the bundle's ``graph`` (CPU, no arena).

    Raises:
        ConfigError: ``threads < 1``. BundleError: onnxruntime cannot load the graph.
    """
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False  # the arena reserves far beyond use: RLIMIT_DATA budgets then fail
    options.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(bundle.path(graph)), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail / InvalidGraph types
        raise BundleError(f"onnxruntime cannot load {bundle.path(graph)}: {exc}") from exc
