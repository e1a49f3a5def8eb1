"""Write a device bundle (format: ``device_runtime/bundle.py``) for one expert subset of a MoE checkpoint.

The ORT graph files depend only on the shape key, so they are exported once per (base model, shape key)
into a graph cache and hard-linked (or copied) into every bundle of that shape; only
``weights.safetensors`` differs between devices and rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from device_runtime.bundle import (
    BOTTOM_MODEL,
    FROZEN,
    HELD,
    TOKENIZER_FILE,
    TRAINED,
    WEIGHTS_FILE,
    Manifest,
    ShapeKey,
    TensorRole,
    TensorSpec,
    graph_files,
    tensor_role,
    write_manifest,
)
from device_runtime.errors import BundleError
from device_runtime.graph_io import FROZEN_INPUTS
from device_runtime.wire import FitConfig
from export.families import describe
from export.loading import cache_dir, checkpoint_sha256

GRAPH_INFO = "graph.json"
# Bump whenever export.training_graph or export.artifacts changes the exported graph: the cache is keyed by
# (base model, shape key, GRAPH_VERSION), so an old graph is never reused. 2: lm_head on target positions only.
# 3: the answer_ids / answer_bias inputs (logit adjustment). 4: routing_kl_coef renamed routing_reg_coef.
GRAPH_VERSION = 4


@dataclass(frozen=True)
class BundleRequest:
    """What to cut from a checkpoint.

    Attributes:
        keep: per MoE layer, the global expert ids the device keeps.
        trainable_mode: ``"experts"`` or ``"lora"``. lora_rank / lora_alpha: LoRA hyper-parameters.
        prox: add the FedProx anchor inputs to the graph.
        training: local training defaults written to the manifest.
        seed: seed of the LoRA initialisation (the same seed gives the same global adapters).
        frozen_dtype: hold every other expert frozen in this dtype (``export.prune``); None: pruned.
        merged: hold them as one stand-in per layer (``export.prune``).
        cut_layer: 0, or K > 0 for a split device's bottom (``export.split_graph``): ``keep`` then lists the MoE
            layers below the cut only.
    """

    keep: tuple[tuple[int, ...], ...]
    trainable_mode: str = "experts"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    prox: bool = False
    training: FitConfig = FitConfig()
    seed: int = 0
    frozen_dtype: str | None = None
    merged: bool = False
    cut_layer: int = 0

    @property
    def shape_key(self) -> ShapeKey:
        return ShapeKey(
            tuple(len(ids) for ids in self.keep),
            self.trainable_mode,
            self.lora_rank,
            self.prox,
            self.frozen_dtype,
            self.merged,
            self.cut_layer,
        )


def prepare_model(checkpoint: Path, request: BundleRequest):
    """Load the global model, add LoRA adapters if asked (seeded), and prune it to ``request.keep``.

    Returns ``(pruned_model, description_of_the_global_model)``.
    """
    from export.global_state import load_trainable_model
    from export.prune import prune

    model = load_trainable_model(
        checkpoint,
        trainable_mode=request.trainable_mode,
        lora_rank=request.lora_rank,
        lora_alpha=request.lora_alpha,
        seed=request.seed,
    )
    description = describe(model)
    rest = tuple(tuple(range(layer.num_experts)) for layer in description.layers[len(request.keep) :])
    keep = request.keep + rest if request.cut_layer else request.keep  # a bottom's top is cut off afterwards
    pruned, _ = prune(model, keep, request.frozen_dtype, request.merged)
    return pruned, description


def _example_batch(wrapper, vocab: int, seq_len: int) -> dict:
    """Every graph input for tracing: 2 sequences, the second padded (batch and seq_len stay dynamic)."""
    import torch

    ids = torch.randint(0, vocab, (2, min(seq_len, 16)), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return wrapper.make_inputs(ids, mask, ids.clone())


def graph_dir(base_sha: str, shape_key: ShapeKey) -> Path:
    """Where the graph of ``shape_key`` for base model ``base_sha`` is cached (per ``GRAPH_VERSION``)."""
    return cache_dir() / "graphs" / f"v{GRAPH_VERSION}" / base_sha[:16] / shape_key.id


def _export(wrapper, out: Path, trainable: list[str], vocab: int, seq_len: int) -> dict[str, list[str]]:
    """Export ``wrapper``'s graph files into ``out``: a split bottom's one graph, or the ORT training artifacts."""
    from export.artifacts import export_training_artifacts
    from export.split_graph import BottomWrapper, export_bottom

    if isinstance(wrapper, BottomWrapper):
        out.mkdir(parents=True)
        export_bottom(wrapper, out / BOTTOM_MODEL, vocab=vocab)
        return {"inputs": list(wrapper.input_names[:2]), "outputs": list(wrapper.output_names)}
    info = export_training_artifacts(
        wrapper, out, trainable=trainable, example_batch=_example_batch(wrapper, vocab, seq_len)
    )
    return {"inputs": list(info.inputs), "outputs": list(info.outputs)}


def ensure_graph(wrapper, base_sha: str, shape_key: ShapeKey, trainable: list[str], vocab: int, seq_len: int):
    """Export the graph files of ``shape_key`` (``device_runtime.bundle.graph_files``) unless cached.

    Returns ``(graph directory, {"inputs": [...], "outputs": [...]})``; the names are kept in ``graph.json``.
    """
    target = graph_dir(base_sha, shape_key)
    if not all((target / f).is_file() for f in (*graph_files(shape_key), GRAPH_INFO)):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            names = _export(wrapper, Path(tmp) / "g", trainable, vocab, seq_len)
            (Path(tmp) / "g" / GRAPH_INFO).write_text(json.dumps(names))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(Path(tmp) / "g", target)
    return target, json.loads((target / GRAPH_INFO).read_text())


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _frozen_specs(wrapper, description, frozen: dict) -> tuple[TensorSpec, ...]:
    """TensorSpecs of the frozen-expert inputs: rows of the held-frozen experts of their ``source`` tensor."""
    specs = []
    for l in wrapper.frozen_layers:
        sources = description.layers[l].experts
        for name, source in zip(FROZEN_INPUTS, sources):  # (gate_up, down) both
            value = frozen[name.format(l)]
            specs.append(
                TensorSpec(
                    name=name.format(l),
                    shape=tuple(value.shape),
                    dtype=str(value.dtype).split(".")[-1],
                    layer=l,
                    expert_axis=0,
                    trainable=False,
                    rows=FROZEN,
                    source=source,
                    transposed=True,
                    role=TensorRole.EXPERT,
                )
            )
    return tuple(specs)


def write_bundle(checkpoint: str | Path, out: str | Path, request: BundleRequest) -> Manifest:
    """Cut ``request.keep`` out of the MoE ``checkpoint`` directory and write a bundle to ``out``.

    Raises:
        BundleError: ``out`` exists and is not empty, or the checkpoint has no tokenizer.json.
        ConfigError / ModelError / ExportError: from pruning, loading or export.
    """
    from safetensors.torch import save_file

    from export.split_graph import BottomWrapper
    from export.training_graph import TrainingWrapper

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty: choose another --out or remove it")
    if not (checkpoint / TOKENIZER_FILE).is_file():
        raise BundleError(f"{checkpoint} has no {TOKENIZER_FILE}: the device needs it to tokenise its data")
    base_sha = checkpoint_sha256(checkpoint)
    pruned, description = prepare_model(checkpoint, request)
    state = pruned.state_dict()
    federated = description.trainable_tensors(list(state), request.trainable_mode)
    if request.cut_layer:
        below = [layer for layer in description.layers if layer.index < request.cut_layer]
        if len(below) != len(request.keep):
            raise BundleError(f"keep lists {len(request.keep)} layers; {len(below)} MoE layers are below the cut")
        federated = [(n, l) for n, l in federated if l < len(below)]
    trainable = [n for n, _ in federated]
    wrapper = (
        BottomWrapper(pruned, request.cut_layer, trainable)
        if request.cut_layer
        else TrainingWrapper(pruned, prox=request.prox, trainable=trainable)
    )
    graph, info = ensure_graph(
        wrapper, base_sha, request.shape_key, trainable, description.vocab_size, request.training.seq_len
    )
    out.mkdir(parents=True, exist_ok=True)
    for name in graph_files(request.shape_key):
        _link(graph / name, out / name)
    shutil.copy2(checkpoint / TOKENIZER_FILE, out / TOKENIZER_FILE)
    frozen = {} if request.cut_layer else {n: v.contiguous() for n, v in wrapper.frozen_inputs().items()}
    save_file({**{n: state[n].contiguous() for n in trainable}, **frozen}, str(out / WEIGHTS_FILE))
    specs = tuple(
        TensorSpec(
            name=n,
            shape=tuple(state[n].shape),
            layer=l,
            expert_axis=0,
            trainable=True,
            rows=HELD if tensor_role(n) is TensorRole.ROUTER else TRAINED,
            role=tensor_role(n),
        )
        for n, l in federated
    ) + (_frozen_specs(wrapper, description, frozen) if frozen else ())
    manifest = Manifest(
        base_model={"id": checkpoint.name, "sha256": base_sha},
        family=description.family,
        shape_key=request.shape_key,
        moe_layers=tuple(layer.index for layer in description.layers[: len(request.keep)]),
        num_experts=description.num_experts,
        experts_per_token=tuple(
            min(layer.experts_per_token, len(ids)) for layer, ids in zip(description.layers, request.keep)
        ),
        expert_ids=tuple(tuple(ids) for ids in request.keep),
        tensors=specs,
        inputs=tuple(info["inputs"]),
        outputs=tuple(info["outputs"]),
        training=request.training,
    )
    return write_manifest(out, manifest)
