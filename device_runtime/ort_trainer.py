"""Local training with ONNX Runtime training: the :class:`~device_runtime.trainer.Trainer` of a bundle.

Built from a verified bundle (``device_runtime.bundle.load_bundle``): ``CheckpointState.load_checkpoint``,
``Module(training_model, state, eval_model)``, ``Optimizer(optimizer_model, module)``, then
``weights.safetensors`` is written into the state by name. Order matters (``docs/stack.md``): assigning
``state.parameters[name]`` before a ``Module`` was built on that state segfaults.

Graph inputs are fed in ``manifest.inputs`` order and outputs read by name (``device_runtime.graph_io``).
The AdamW moments live in the trainer and persist across ``fit`` calls; build a new
trainer for a round that must start with fresh moments.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from device_runtime.bundle import Bundle, load_bundle
from device_runtime.errors import BundleError, ConfigError
from device_runtime.graph_io import DTYPES, LOSS, NUM_TOKENS, check_tensor, read_weights, stats_names, weight_inputs
from device_runtime.modes import ORT_TRAINING_BACKEND, Order
from device_runtime.trainer import BundleTrainer


class OrtTrainer(BundleTrainer):
    """Trains a bundle's pruned expert subset with ORT training (no torch in the process).

    Args:
        bundle: a :class:`~device_runtime.bundle.Bundle` (verified) or a bundle directory (verified here).
        threads: ORT intra-op threads (None: ORT's default, one per core).
        progress: show a rich progress bar during ``fit``.

    Raises:
        BundleError / BundleIntegrityError: the bundle is malformed, corrupted, or its weights disagree with
            its manifest (checked before any training).
        ConfigError: ORT training is not installed or ``threads < 1``.
    """

    backend, order = ORT_TRAINING_BACKEND, Order.FIRST

    def __init__(self, bundle: Bundle | str, *, threads: int | None = None, progress: bool = True):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.manifest = self.bundle.manifest
        self.progress = progress
        self._specs = {spec.name: spec for spec in self.manifest.tensors}
        self._inputs: dict[str, np.ndarray] = {}  # bundle tensors the graph takes as inputs (frozen experts)
        self._state, self._module, self._optimizer = _build_session(self.bundle, threads)
        self._outputs = self._check_graph_names()
        self.set_parameters(read_weights(self.bundle))

    def _check_graph_names(self) -> tuple[str, ...]:
        """The output names in order; raise BundleError if the graph and manifest disagree."""
        inputs, outputs = tuple(self._module.input_names()), tuple(self._module.output_names())
        if inputs != self.manifest.inputs:
            raise BundleError(
                f"training graph inputs {inputs[:6]}... differ from the manifest's "
                f"{self.manifest.inputs[:6]}...; re-export the bundle"
            )
        missing = [n for n in (LOSS, NUM_TOKENS, *stats_names(self.manifest)) if n not in outputs]
        fed = weight_inputs(self.manifest)
        unknown = [n for n in self._specs if n not in fed and n not in self._state.parameters]
        if missing or unknown:
            raise BundleError(f"bundle graph lacks outputs {missing} or parameters {unknown[:5]}")
        return outputs

    # -- parameters -------------------------------------------------------------------------------------

    def get_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the manifest's tensors, by name, each of its manifest shape and dtype."""
        return {
            name: np.array(
                self._inputs[name] if name in self._inputs else self._state.parameters[name].data,
                dtype=DTYPES[spec.dtype],
            )
            for name, spec in self._specs.items()
        }

    def weight_feeds(self) -> dict[str, np.ndarray]:
        return self._inputs

    def set_parameters(self, parameters: dict[str, np.ndarray]) -> None:
        """Write tensors into the ORT state (cast to the graph's dtype).

        Raises:
            BundleError: an unknown name, a shape differing from the manifest, or a non-finite value.
        """
        for name, value in parameters.items():
            spec = self._specs.get(name)
            if spec is None:
                raise BundleError(f"tensor {name!r} is not in the bundle manifest")
            value = np.asarray(value)
            check_tensor(spec.shape, name, value)
            if name in self.manifest.inputs:
                self._inputs[name] = np.ascontiguousarray(value, dtype=DTYPES[spec.dtype])
                continue
            current = self._state.parameters[name].data
            self._state.parameters[name] = np.ascontiguousarray(value, dtype=current.dtype)

    # -- training ---------------------------------------------------------------------------------------

    def _begin_fit(self, *, learning_rate: float, steps: int) -> None:
        self._optimizer.set_learning_rate(float(learning_rate))
        self._module.train()

    def _step(self, feeds: dict[str, np.ndarray], *, learning_rate: float, step: int) -> dict[str, np.ndarray]:
        """Forward + backward (ORT ``Module`` in train mode), then one AdamW step."""
        outputs = self._module(*feeds.values())
        self._optimizer.step()
        self._module.lazy_reset_grad()
        return dict(zip(self._outputs, outputs))

    def _forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._module.eval()
        try:
            return dict(zip(self._outputs, self._module(*feeds.values())))
        finally:
            self._module.train()


def _build_session(bundle: Bundle, threads: int | None) -> tuple[Any, Any, Any]:  # ORT objects: no type information
    """``(CheckpointState, Module, Optimizer)`` of a bundle, in the only safe order."""
    from device_runtime.ort_api import load_api

    api = load_api()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_cpu_mem_arena = False  # the arena reserves far beyond use: RLIMIT_DATA budgets then fail
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    try:
        state = api.CheckpointState.load_checkpoint(str(bundle.path("checkpoint")))
        module = api.Module(
            str(bundle.path("training_model.onnx")),
            state,
            str(bundle.path("eval_model.onnx")),
            device="cpu",
            session_options=options,
        )
        optimizer = api.Optimizer(str(bundle.path("optimizer_model.onnx")), module)
    except Exception as exc:  # ORT raises its own Fail / InvalidGraph types
        raise BundleError(f"ONNX Runtime cannot load bundle {bundle.root}: {exc}") from exc
    return state, module, optimizer
