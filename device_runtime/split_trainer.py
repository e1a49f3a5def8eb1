"""Split mode on a device (HO-SFL, Chen et al., arXiv 2603.14773): the bottom of the model, forward-only, on plain
onnxruntime; the coordinator runs the top with backprop.

One step on a batch (``device_runtime.hosfl`` has the math; messages in ``device_runtime.wire``)::

    z = f_c(x; theta)                          one forward of bottom_model.onnx
    -> SmashedData(z in float16, ACP-SL's kept channels only; mask, labels)
    <- CutGradient(lambda = dL/dz, the top's loss)
    v_p = <lambda, f_c(x; theta + mu u_p) - z> / mu      P perturbed forwards, u_p from the step's seeds
    -> SplitScalars(v_1..v_P)
    <- SplitStep(vbar)                          the mean over the step's split devices
    theta <- theta - lr (1/P) sum_p vbar_p u_p  regenerated in place (zo_directions.perturb_rows)

Memory is the zeroth-order backend's: an inference session, the weights bound once as graph inputs over numpy
buffers perturbed in place, one direction chunk; plus one batch's smashed data and one copy of the trainable
tensors (restoring from it is exact, where subtracting the perturbation again would drift by rounding). The
device uploads P scalars and its smashed data per step, never weights: the coordinator replays the same updates
on its copy of the bottom, which stays bit-identical to the device's.

A device that fell behind (it reconnected while the others went on) gets the steps it missed in one SplitStep,
applies them and smashes its batch again at the group's current step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from device_runtime import acp
from device_runtime.bundle import BOTTOM_MODEL, Bundle, load_bundle
from device_runtime.data import IGNORE_INDEX, Batch
from device_runtime.errors import BundleError, ConfigError, DataError, ProtocolError
from device_runtime.graph_io import ATTENTION_MASK, INPUT_IDS, LOSS, SMASHED, checked_parameters, read_weights
from device_runtime.hosfl import apply_step, projected_scalar, step_seeds
from device_runtime.modes import SPLIT_BACKEND, Order
from device_runtime.ort_api import import_onnxruntime
from device_runtime.trainer import BundleTrainer, EvaluateResult, FitResult
from device_runtime.wire import CutGradient, Message, SmashedData, SplitConfig, SplitScalars, SplitStep
from device_runtime.zo_directions import perturb_rows
from device_runtime.zo_trainer import inference_session


class SplitLink(Protocol):
    """The device's side of the step conversation: send one message, block until the coordinator's answer."""

    def exchange(self, msg: Message) -> Message: ...


class SplitTrainer(BundleTrainer):
    """Trains a split bundle's bottom with the coordinator (module docstring), on any onnxruntime.

    Before ``fit``, :meth:`join` gives it the round (its link to the coordinator, the assignment's ids, seed and
    :class:`~device_runtime.wire.SplitConfig`); ``learning_rate`` of ``fit`` is the bottom's SGD step size.

    Raises:
        BundleError: the bundle is not a split bottom, or its graph and manifest disagree.
        ConfigError: no onnxruntime, or ``threads < 1``.
    """

    backend, order = SPLIT_BACKEND, Order.HYBRID

    def __init__(self, bundle: Bundle | str, *, threads: int | None = None, progress: bool = True, **_: Any):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.manifest, self.progress = self.bundle.manifest, progress
        if not self.manifest.shape_key.cut_layer:
            raise BundleError(f"bundle {self.manifest.shape_key.id} is not a split bottom (no cut layer)")
        self._specs = {spec.name: spec for spec in self.manifest.tensors}
        self._weights = {n: np.array(v, dtype=np.float32, order="C") for n, v in read_weights(self.bundle).items()}
        self._ort = import_onnxruntime()
        self._session = inference_session(self._ort, self.bundle, threads, BOTTOM_MODEL)
        self._outputs = tuple(o.name for o in self._session.get_outputs())
        inputs = [i.name for i in self._session.get_inputs()]
        if (
            inputs[:2] != [INPUT_IDS, ATTENTION_MASK]
            or set(inputs[2:]) != set(self._weights)
            or SMASHED not in self._outputs
        ):
            raise BundleError(f"{BOTTOM_MODEL} takes {inputs[:4]}..., gives {self._outputs[:3]}; re-export the bundle")
        self._binding = self._session.io_binding()
        for name, value in self._weights.items():
            self._binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(value))
        self._link: SplitLink | None = None
        self._batch: Batch | None = None

    # -- the round ---------------------------------------------------------------------------------------

    def join(
        self,
        link: SplitLink,
        *,
        update_id: str,
        round_id: int,
        seed: int,
        config: SplitConfig,
        expert_ids: tuple[tuple[int, ...], ...],
    ) -> None:
        """Take part in round ``round_id``'s split steps through ``link``; ``expert_ids`` (global, per MoE layer
        below the cut) says which global rows the bound tensors hold."""
        if config.cut_layer != self.manifest.shape_key.cut_layer:
            raise ConfigError(
                f"the round cuts at layer {config.cut_layer}, the bundle at {self.manifest.shape_key.cut_layer}"
            )
        self._link, self._ids, self._config = link, (update_id, round_id, seed), config
        self._rows = [
            (spec.source or name, self._weights[name], self.manifest.rows(spec, expert_ids))
            for name, spec in self._specs.items()
            if spec.trainable
        ]
        self._step_index = 0
        self._means: acp.ChannelMeans | None = None
        self._scale: np.ndarray | None = None

    def fit(self, batches: Iterable[Batch], **kwargs: Any) -> FitResult:
        """See :meth:`Trainer.fit`; needs :meth:`join` first. Each step is one HO-SFL exchange."""
        if self._link is None:
            raise ConfigError("a split trainer trains with the coordinator: join a round first")

        def tapped() -> Iterator[Batch]:
            for batch in batches:
                self._batch = batch
                yield batch

        return super().fit(tapped(), **kwargs)

    # -- one step ----------------------------------------------------------------------------------------

    def _step(self, feeds: dict[str, np.ndarray], *, learning_rate: float, step: int) -> dict[str, np.ndarray]:
        assert self._link is not None and self._batch is not None
        outputs = self._forward(feeds)
        reply = self._link.exchange(self._smashed(outputs[SMASHED], self._batch))
        while isinstance(reply, SplitStep):  # we fell behind: catch up, smash again at the group's step
            self._replay(reply, learning_rate)
            outputs = self._forward(feeds)
            reply = self._link.exchange(self._smashed(outputs[SMASHED], self._batch))
        cut: CutGradient = self._expect(reply, CutGradient)
        gradient = cut.tensors.get("gradient")
        smashed = outputs[SMASHED]
        if gradient is None or gradient.shape != smashed.shape:
            raise ProtocolError(
                "bad_tensor", f"cut gradient of shape {getattr(gradient, 'shape', None)}, smashed {smashed.shape}"
            )
        gradient = gradient.astype(np.float32)
        self._scale = acp.update_gradient_scale(self._scale, gradient, feeds[ATTENTION_MASK])
        scalars = self._scalars(feeds, smashed, gradient)
        update_id, round_id, _ = self._ids
        done = self._link.exchange(
            SplitScalars(update_id=update_id, round_id=round_id, step=self._step_index, scalars=scalars)
        )
        self._replay(self._expect(done, SplitStep), learning_rate)
        return {**outputs, LOSS: np.asarray(cut.loss, dtype=np.float32)}

    def _smashed(self, smashed: np.ndarray, batch: Batch) -> SmashedData:
        """This step's SmashedData: ACP-SL's kept channels of ``smashed`` in float16, the mask and the labels."""
        update_id, round_id, _ = self._ids
        mask = batch.attention_mask
        means = self._means = self._means or acp.ChannelMeans(smashed.shape[-1])
        scale = np.ones(smashed.shape[-1], np.float32) if self._scale is None else self._scale
        channels = acp.select_channels(smashed, mask, means, scale, self._config.keep_ratio)
        values = smashed[:, :, channels].astype(np.float16)
        means.update(values, channels, mask)
        labels = np.where(mask == 0, IGNORE_INDEX, batch.labels).astype(np.int32)
        return SmashedData(
            update_id=update_id,
            round_id=round_id,
            step=self._step_index,
            channels=None if len(channels) == smashed.shape[-1] else tuple(int(c) for c in channels),
            tensors={"smashed": values, "attention_mask": mask.astype(np.int32), "labels": labels},
        )

    def _scalars(self, feeds: dict[str, np.ndarray], smashed: np.ndarray, gradient: np.ndarray) -> tuple[float, ...]:
        """``v_p`` for the step's P seeds: perturb in place, forward, restore from a copy (bit-exact, so the device's
        weights stay equal to the coordinator's copy, which never perturbs)."""
        _, round_id, seed = self._ids
        mu, out = self._config.mu, []
        saved = [array.copy() for _, array, _ in self._rows]
        for p_seed in step_seeds(seed, round_id, self._step_index, self._config.perturbations):
            perturb_rows(self._rows, p_seed, mu)
            perturbed = self._forward(feeds)[SMASHED]
            for (_, array, _), copy in zip(self._rows, saved):
                np.copyto(array, copy)
            out.append(projected_scalar(gradient, perturbed, smashed, mu))
        if not all(math.isfinite(v) for v in out):
            raise ConfigError(f"split step {self._step_index}: a projected scalar is not finite; lower mu ({mu})")
        return tuple(out)

    def _replay(self, msg: SplitStep, learning_rate: float) -> None:
        """Apply the averaged scalars of steps ``msg.first_step ..`` with their seeds; advance the step index.

        Raises:
            ProtocolError("unexpected"): the history does not start at this device's step or has P wrong.
        """
        _, round_id, seed = self._ids
        if msg.first_step != self._step_index or any(len(v) != self._config.perturbations for v in msg.scalars):
            raise ProtocolError(
                "unexpected", f"split step history from {msg.first_step}, this device is at {self._step_index}"
            )
        for offset, vbar in enumerate(msg.scalars):
            seeds = step_seeds(seed, round_id, msg.first_step + offset, self._config.perturbations)
            apply_step(self._rows, seeds, vbar, learning_rate)
        self._step_index += len(msg.scalars)

    @staticmethod
    def _expect(msg: Message, kind: type) -> Any:
        if not isinstance(msg, kind):
            raise ProtocolError("unexpected", f"expected {kind.__name__} in a split step, got {type(msg).__name__}")
        return msg

    # -- forward / parameters ----------------------------------------------------------------------------

    def _forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in (INPUT_IDS, ATTENTION_MASK):
            self._binding.bind_cpu_input(name, feeds[name])
        self._binding.clear_binding_outputs()  # the smashed data's shape follows the batch: allocate afresh
        for name in self._outputs:
            self._binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(self._binding)
        return dict(zip(self._outputs, self._binding.copy_outputs_to_cpu()))

    def evaluate(self, batches: Iterable[Batch]) -> EvaluateResult:
        """Raises DataError: a bottom has no loss of its own (the top is the coordinator's)."""
        raise DataError("a split device's bottom has no loss of its own: the coordinator's top scores it")

    def get_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the bottom's tensors, by manifest name."""
        return {name: value.copy() for name, value in self._weights.items()}

    def set_parameters(self, parameters: dict[str, np.ndarray]) -> None:
        """Overwrite bottom tensors in place (the bound buffers).

        Raises:
            BundleError: an unknown name, a shape differing from the manifest, or a non-finite value.
        """
        for name, value in checked_parameters(self._specs, parameters):
            np.copyto(self._weights[name], value, casting="unsafe")
