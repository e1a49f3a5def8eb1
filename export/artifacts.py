"""Export a :class:`~export.training_graph.TrainingWrapper` to ONNX Runtime training artifacts.

Recipe (``docs/stack.md``, the one that gives correct gradients in ORT 1.19): TorchScript exporter
(``dynamo=False``), opset 17, no constant folding, ``TrainingMode.TRAINING``, dynamic batch and seq_len
axes; ONNX initializer names must equal the torch ``state_dict`` names (checked). Then
``onnxruntime.training.artifacts.generate_artifacts`` with ``loss=None``: its ``PassThrough`` block keeps
every graph output and backpropagates from the first one, which the wrapper makes the total ``loss``.
Optimizer: ``onnxblock.optim.AdamW(eps=1e-8, weight_decay=0.01)``, then its ``AdamWOptimizer`` node is
switched from ``adam_mode=1`` (what onnxblock hard-codes: HF-style, eps added to the *uncorrected*
sqrt(v), i.e. an effective eps of 1e-8 / sqrt(1 - beta2^t), ~3e-7 at step 1) to ``adam_mode=0``
(``torch.optim.AdamW`` exactly); measured: with mode 1, a third of the elements with |grad| < ~1e-5 took
steps up to 10% smaller than torch's.

Files written to ``out_dir``: ``device_runtime.bundle.GRAPH_FILES`` (training_model.onnx,
eval_model.onnx, optimizer_model.onnx, checkpoint); the intermediate forward-only model is removed.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from device_runtime.bundle import GRAPH_FILES
from device_runtime.errors import ExportError
from export.training_graph import ANSWER_INPUTS, DYNAMIC_INPUTS, TrainingWrapper

OPSET = 17
ADAMW_EPS = 1e-8
ADAMW_WEIGHT_DECAY = 0.01
UNSAFE_OPS = ("ScatterND", "ScatterElements", "Einsum")


@dataclass(frozen=True)
class TrainingArtifacts:
    """What :func:`export_training_artifacts` wrote.

    Attributes:
        directory: where the ``GRAPH_FILES`` are.
        inputs: graph input names in feed order (the wrapper's ``input_names``).
        outputs: graph output names, ``loss`` first.
        trainable: names of the trainable tensors (ORT checkpoint order may differ: see
            ``get_contiguous_parameters``).
        frozen: every other parameter of the graph.
        export_seconds: wall time of the whole export (seconds).
    """

    directory: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    export_seconds: float


def _onnx_export(wrapper: TrainingWrapper, path: Path, example_batch: dict[str, torch.Tensor]) -> None:
    """TorchScript export of ``wrapper`` to ``path`` with the recipe above."""
    args = tuple(example_batch[name] for name in wrapper.input_names)
    dynamic = {name: {0: "batch", 1: "seq_len"} for name in DYNAMIC_INPUTS}
    dynamic.update({name: {0: "num_answers"} for name in ANSWER_INPUTS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=list(wrapper.input_names),
            output_names=list(wrapper.output_names),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.TRAINING,
            dynamo=False,
        )


def _check_names(model: onnx.ModelProto, wrapper: TrainingWrapper, trainable: list[str]) -> list[str]:
    """Check initializer names against ``state_dict`` names; return the frozen parameter names.

    Raises:
        ExportError: a trainable tensor is not an initializer, or an initializer is not a state_dict name.
    """
    initializers = {init.name for init in model.graph.initializer}
    missing = [n for n in trainable if n not in initializers]
    if missing:
        raise ExportError(
            f"trainable tensors {missing[:5]} are not ONNX initializers (renamed by the exporter, or unused by "
            "the forward pass); export with dynamo=False and check the names against model.state_dict()"
        )
    renamed = sorted(initializers - set(wrapper.state_dict()))
    if renamed:
        raise ExportError(f"ONNX initializers {renamed[:5]} are not state_dict names: the exporter renamed them")
    params = {name for name, _ in wrapper.named_parameters()}
    return sorted((initializers & params) - set(trainable))


def _check_ops(model: onnx.ModelProto) -> None:
    """Refuse ops whose ORT gradients are silently wrong or missing (``docs/stack.md``).

    Raises:
        ExportError: naming the op types found.
    """
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in UNSAFE_OPS or "Sequence" in n.op_type})
    if bad:
        raise ExportError(
            f"the forward graph contains {bad}, which ORT training differentiates wrongly or not at all; "
            "use the dense-masked experts implementation (export.moe_block.use_dense_masked)"
        )


def _generate(model_path: Path, out_dir: Path, trainable: list[str], frozen: list[str]) -> None:
    import onnxruntime
    from onnxruntime.training import artifacts
    from onnxruntime.training.onnxblock import optim

    onnxruntime.set_default_logger_severity(3)  # generate_artifacts logs every graph transformer at INFO

    # A ModelProto, not a path: with a path, ORT's blocks share one temp.onnx(.data) in the cwd and one block's
    # clean-up deletes the external data another still reads (fails for real-size models). Limit: 2 GB.
    artifacts.generate_artifacts(
        onnx.load(str(model_path)),
        requires_grad=list(trainable),
        frozen_params=list(frozen),
        loss=None,
        optimizer=optim.AdamW(eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY),
        artifact_directory=str(out_dir),
    )


def _use_torch_adamw(optimizer_path: Path) -> None:
    """Set ``adam_mode=0`` (PyTorch AdamW semantics) on the optimizer graph's AdamWOptimizer node.

    Raises:
        ExportError: the optimizer graph has no AdamWOptimizer node with an ``adam_mode`` attribute.
    """
    model = onnx.load(str(optimizer_path))
    modes = [a for n in model.graph.node if n.op_type == "AdamWOptimizer" for a in n.attribute if a.name == "adam_mode"]
    if len(modes) != 1:
        raise ExportError(f"{optimizer_path.name}: expected one AdamWOptimizer adam_mode attribute, found {len(modes)}")
    modes[0].i = 0
    onnx.save(model, str(optimizer_path))


def export_training_artifacts(
    wrapper: TrainingWrapper, out_dir: str | Path, *, trainable: list[str], example_batch: dict[str, torch.Tensor]
) -> TrainingArtifacts:
    """Export ``wrapper`` and build the ORT training, eval and optimizer graphs and the checkpoint.

    Args:
        wrapper: the training module (its ``trainable`` must equal ``trainable`` when it has FedProx inputs).
        out_dir: output directory (created).
        trainable: ``state_dict`` names of the tensors the device trains; every other parameter is frozen.
        example_batch: every graph input by name (``wrapper.make_inputs(...)``); batch and seq_len are
            exported as dynamic axes, so any size >= 2 tokens works.

    Returns:
        :class:`TrainingArtifacts`.

    Raises:
        ExportError: empty ``trainable``, a missing example input, a renamed parameter, an op with broken ORT
            gradients (Scatter*, Einsum, Sequence*) in the forward graph, or a failure of
            ``torch.onnx.export`` / ``generate_artifacts`` (the original exception is chained).
    """
    start = time.perf_counter()
    trainable = list(trainable)
    if not trainable:
        raise ExportError("nothing to train: pass the trainable tensor names (e.g. experts and router weights)")
    if wrapper.prox and tuple(trainable) != wrapper.trainable:
        raise ExportError("the wrapper's FedProx anchors must cover exactly `trainable`, in the same order")
    missing = [n for n in wrapper.input_names if n not in example_batch]
    if missing:
        raise ExportError(f"example_batch lacks graph inputs {missing[:5]}; build it with wrapper.make_inputs()")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        model_path = Path(tmp) / "forward.onnx"
        try:
            _onnx_export(wrapper, model_path, example_batch)
        except Exception as exc:  # noqa: BLE001 - every exporter failure becomes an ExportError
            raise ExportError(f"torch.onnx.export failed for {type(wrapper.model).__name__}: {exc}") from exc
        forward = onnx.load(str(model_path))
        _check_ops(forward)
        frozen = _check_names(forward, wrapper, trainable)
        del forward
        try:
            _generate(model_path, out_dir, trainable, frozen)
            _use_torch_adamw(out_dir / "optimizer_model.onnx")
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"onnxruntime generate_artifacts failed: {exc}") from exc
    absent = [f for f in GRAPH_FILES if not (out_dir / f).exists()]
    if absent:
        raise ExportError(f"generate_artifacts did not write {absent} in {out_dir}")
    return TrainingArtifacts(
        directory=out_dir,
        inputs=wrapper.input_names,
        outputs=wrapper.output_names,
        trainable=tuple(trainable),
        frozen=tuple(frozen),
        export_seconds=time.perf_counter() - start,
    )
