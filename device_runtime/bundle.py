"""The bundle format: what a device receives to train its pruned expert subset.

A bundle is a directory::

    manifest.json            this module's ``Manifest`` (format version, shape key, expert ids, sha256s)
    training_model.onnx      ORT training graph (loss + gradients), from ``onnxruntime.training.artifacts``
    eval_model.onnx          ORT eval graph (same inputs, no gradients)
    (a split bottom, ``ShapeKey.cut_layer`` K > 0, has instead of these four one ``bottom_model.onnx``: the
    forward of the embeddings and decoder layers 0..K-1, weights as inputs, the smashed data as output)
    optimizer_model.onnx     AdamW graph (eps 1e-8, weight decay 0.01: matches torch.optim.AdamW)
    checkpoint               ORT checkpoint: initial values of every parameter, frozen and trainable
    weights.safetensors      every tensor that depends on *which* experts are kept (expert weights,
                             router rows, LoRA adapters), by ONNX initializer name == torch state_dict name
    tokenizer.json           the base model's tokenizer (``tokenizers`` library)

The graph files depend only on the :class:`ShapeKey` (experts kept per MoE layer + trainable mode), never
on which experts were kept, so a device caches them by ``ShapeKey.id`` and each round receives only
new weights. Every file's sha256 is in the manifest; :func:`load_bundle` verifies all of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from device_runtime.errors import BundleError, BundleIntegrityError
from device_runtime.shape_key import TRAINABLE_MODES as TRAINABLE_MODES  # re-exported
from device_runtime.shape_key import ShapeKey as ShapeKey  # re-exported
from device_runtime.shape_key import held_experts
from device_runtime.wire import FitConfig
from device_runtime.wire.fields import NAME

# 2: every tensor has a role (TensorSpec.role); the graph input routing_kl_coef is routing_reg_coef
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ROUTER_WEIGHT = "mlp.gate.weight"  # the name suffix of a MoE layer's router (num_experts, hidden)
GRAPH_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
BOTTOM_MODEL = "bottom_model.onnx"  # a split bottom's forward-only graph (ShapeKey.cut_layer > 0), alone
WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_FILE = "tokenizer.json"
DTYPES = ("float32", "float16")
TRAINED, FROZEN, HELD = "trained", "frozen", "held"  # TensorSpec.rows: which experts an expert-indexed tensor covers
# The FitConfig fields a manifest records: a device runtime that reads the manifest's format version reads them.
MANIFEST_TRAINING_FIELDS = ("batch_size", "seq_len", "learning_rate", "aux_loss_coef", "local_steps")


class TensorRole(StrEnum):
    """What a tensor is to a federation: how its rows map onto the global model and how they are aggregated."""

    ROUTER = "router"  # a MoE layer's gate rows (E, H): indexed by expert over every held expert (rows HELD)
    EXPERT = "expert"  # expert weights, e.g. gate_up_proj (E, 2I, H): indexed by expert
    LORA = "lora"  # per-expert LoRA adapters, e.g. gate_up_lora_A (E, r, H): indexed like EXPERT
    SHARED = "shared"  # not indexed by expert (attention, norms, a shared expert): averaged whole


EXPERT_ROLES = frozenset({TensorRole.EXPERT, TensorRole.LORA})  # the roles whose rows are per trained expert


def tensor_role(name: str) -> TensorRole:
    """The role of a MoE tensor by its torch ``state_dict`` name (routers end in :data:`ROUTER_WEIGHT`)."""
    if name.endswith(ROUTER_WEIGHT):
        return TensorRole.ROUTER
    return TensorRole.LORA if "_lora_" in name else TensorRole.EXPERT


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a bundle: the one tensor description from the manifest to the aggregation (a
    ``ClientUpdate`` maps each of its tensors to the spec it was trained under).

    Attributes:
        name: ONNX initializer name, equal to the torch ``state_dict`` key.
        shape: its shape in the pruned model.
        dtype: ``"float32"`` or ``"float16"``.
        layer: the MoE layer index (into ``Manifest.moe_layers``) it belongs to, or None.
        expert_axis: the axis that indexes the layer's experts, or None for tensors not indexed by expert.
        trainable: whether the device's optimizer updates it.
        rows: the experts on ``expert_axis`` (``Manifest.rows``): ``"trained"``, the layer's trained experts
            (``Manifest.expert_ids[layer]``); ``"frozen"``, those it holds frozen; ``"held"``, both, in that order
            (a resident bundle's router).
        source: the global model's tensor the rows are cut from, when it is not ``name`` (frozen experts).
        transposed: axes 1 and 2 are swapped against ``source`` (frozen experts: the layout the graph reads).
        role: what the tensor is (:class:`TensorRole`); ROUTER, EXPERT and LORA tensors have a ``layer`` and an
            ``expert_axis``, SHARED ones no ``expert_axis``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layer: int | None = None
    expert_axis: int | None = None
    trainable: bool = True
    rows: str = TRAINED
    source: str | None = None
    transposed: bool = False
    role: TensorRole = TensorRole.SHARED

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name) or (self.source is not None and not NAME.fullmatch(self.source)):
            raise BundleError(f"invalid tensor name {self.name!r} or source {self.source!r}")
        if self.rows not in (TRAINED, FROZEN, HELD):
            raise BundleError(
                f"tensor {self.name}: rows must be {TRAINED!r}, {FROZEN!r} or {HELD!r}, got {self.rows!r}"
            )
        if self.dtype not in DTYPES or any(int(d) < 0 for d in self.shape):
            raise BundleError(f"tensor {self.name}: invalid dtype {self.dtype!r} or shape {self.shape}")
        object.__setattr__(self, "role", TensorRole(self.role))
        if self.indexed != (self.layer is not None and self.expert_axis is not None) or (
            not self.indexed and self.expert_axis is not None
        ):
            raise BundleError(
                f"tensor {self.name}: a {self.role} tensor needs a layer and an expert_axis exactly when it is "
                f"indexed by expert (router, expert, lora), got layer {self.layer}, expert_axis {self.expert_axis}"
            )

    @property
    def indexed(self) -> bool:
        """Whether the tensor is indexed by expert (every role but SHARED)."""
        return self.role is not TensorRole.SHARED

    @property
    def moe_layer(self) -> int:
        """``layer``, for a tensor that has one (every indexed tensor: router, expert, lora).

        Raises:
            BundleError: the tensor belongs to no MoE layer (a SHARED tensor without ``layer``).
        """
        if self.layer is None:
            raise BundleError(f"tensor {self.name}: a {self.role} tensor of no MoE layer has no layer index")
        return self.layer

    @property
    def moe_axis(self) -> int:
        """``expert_axis``, for a tensor indexed by expert (router, expert, lora), which always has one.

        Raises:
            BundleError: the tensor is not indexed by expert (SHARED).
        """
        if self.expert_axis is None:
            raise BundleError(f"tensor {self.name}: a {self.role} tensor is not indexed by expert")
        return self.expert_axis

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(
            name=str(data["name"]),
            shape=tuple(int(d) for d in data["shape"]),
            dtype=str(data.get("dtype", "float32")),
            layer=None if data.get("layer") is None else int(data["layer"]),
            expert_axis=None if data.get("expert_axis") is None else int(data["expert_axis"]),
            trainable=bool(data.get("trainable", True)),
            rows=str(data.get("rows", TRAINED)),
            source=None if data.get("source") is None else str(data["source"]),
            transposed=bool(data.get("transposed", False)),
            role=TensorRole(data["role"]),
        )


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a bundle.

    Attributes:
        base_model: ``{"id": str, "sha256": str}``: the global model this bundle was cut from.
        family: MoE family name (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``).
        shape_key: what the graph depends on.
        moe_layers: decoder-layer indices of the MoE layers, in order.
        num_experts: experts per MoE layer in the global model.
        experts_per_token: top-k per MoE layer in the pruned model (``min(k, kept)``).
        expert_ids: per MoE layer, local expert index -> global expert id.
        tensors: every tensor in ``weights.safetensors``.
        inputs: graph input names in feed order. outputs: graph output names (``loss`` first).
        training: local training defaults (``fedmoe-device train-local``; a round's Assignment brings its own);
            the manifest records its ``MANIFEST_TRAINING_FIELDS``.
        files: relative path -> sha256 of every other file in the bundle.
    """

    base_model: dict[str, str]
    family: str
    shape_key: ShapeKey
    moe_layers: tuple[int, ...]
    num_experts: int
    experts_per_token: tuple[int, ...]
    expert_ids: tuple[tuple[int, ...], ...]
    tensors: tuple[TensorSpec, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    training: FitConfig = field(default_factory=FitConfig)
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        counts = tuple(len(ids) for ids in self.expert_ids)
        if counts != self.shape_key.experts_per_layer or len(self.moe_layers) != len(counts):
            raise BundleError(
                f"expert_ids {counts} / moe_layers {len(self.moe_layers)} disagree with "
                f"shape key {self.shape_key.experts_per_layer}"
            )
        for ids in self.expert_ids:
            if len(set(ids)) != len(ids) or any(not 0 <= g < self.num_experts for g in ids):
                raise BundleError(f"expert ids {ids} must be distinct and in [0, {self.num_experts})")

    @property
    def trainable_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors if t.trainable)

    def held_ids(self, expert_ids: tuple[tuple[int, ...], ...] | None = None) -> tuple[tuple[int, ...], ...]:
        """Per MoE layer, every expert the graph holds in local order (``shape_key.held_experts``) for the trained
        ``expert_ids`` (default: the manifest's own): the experts its router and routing statistics cover."""
        return held_experts(
            self.expert_ids if expert_ids is None else expert_ids,
            self.num_experts,
            self.shape_key.frozen_dtype is not None,
        )

    def rows(self, spec: TensorSpec, expert_ids: tuple[tuple[int, ...], ...] | None = None) -> tuple[int, ...]:
        """The global expert ids on ``spec``'s expert axis, for the trained ``expert_ids`` (default: the manifest's)."""
        trained = self.expert_ids if expert_ids is None else expert_ids
        held = self.held_ids(trained)[spec.moe_layer]
        count = len(trained[spec.moe_layer])
        return {TRAINED: held[:count], FROZEN: held[count:], HELD: held}[spec.rows]

    def to_json(self) -> str:
        """The manifest as JSON; ``training`` holds the ``MANIFEST_TRAINING_FIELDS`` of the FitConfig only."""
        data = asdict(self)
        data["training"] = {name: data["training"][name] for name in MANIFEST_TRAINING_FIELDS}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate a manifest. Raises BundleError on any malformed or unknown field."""
        try:
            data = json.loads(text)
            version = int(data["format_version"])
            if version != FORMAT_VERSION:
                raise BundleError(
                    f"bundle format {version} is not supported (this runtime reads {FORMAT_VERSION}); "
                    "upgrade fedmoe on the device or re-export the bundle"
                )
            return cls(
                base_model=dict(data["base_model"]),
                family=str(data["family"]),
                shape_key=ShapeKey.from_dict(data["shape_key"]),
                moe_layers=tuple(int(i) for i in data["moe_layers"]),
                num_experts=int(data["num_experts"]),
                experts_per_token=tuple(int(k) for k in data["experts_per_token"]),
                expert_ids=tuple(tuple(int(g) for g in ids) for ids in data["expert_ids"]),
                tensors=tuple(TensorSpec.from_dict(t) for t in data["tensors"]),
                inputs=tuple(str(n) for n in data["inputs"]),
                outputs=tuple(str(n) for n in data["outputs"]),
                training=FitConfig.from_dict(data.get("training", {})),
                files={str(k): str(v) for k, v in data.get("files", {}).items()},
                format_version=version,
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"malformed manifest: {exc!r}") from exc


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.root / name


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Hash every file under ``root`` (except the manifest) into ``manifest.files`` and write it.

    Returns the manifest as written.
    """
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    final = Manifest(**{**{f: getattr(manifest, f) for f in manifest.__dataclass_fields__}, "files": files})
    (root / MANIFEST).write_text(final.to_json())
    return final


def graph_files(key: ShapeKey) -> tuple[str, ...]:
    """The graph files a bundle of ``key`` holds: the ORT training set, or a split bottom's one graph."""
    return (BOTTOM_MODEL,) if key.cut_layer else GRAPH_FILES


def load_bundle(root: str | Path, *, verify: bool = True) -> Bundle:
    """Read ``root/manifest.json`` and verify every file's sha256.

    Raises:
        BundleError: the directory or manifest is missing or malformed, or a required file is absent.
        BundleIntegrityError: a file differs from its recorded sha256, or an unlisted file is present.
    """
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{root} is not a bundle (no {MANIFEST}); write one with `fedmoe-export bundle`")
    manifest = Manifest.from_json((root / MANIFEST).read_text())
    missing = [n for n in (*graph_files(manifest.shape_key), WEIGHTS_FILE) if n not in manifest.files]
    if missing:
        raise BundleError(f"bundle {root} lacks {missing}")
    if verify:
        verify_files(root, manifest.files)
    return Bundle(root=root, manifest=manifest)


def verify_files(root: Path, files: Mapping[str, str]) -> None:
    """Check that each ``relpath -> sha256`` of ``files`` matches the file under ``root``.

    Raises:
        BundleIntegrityError: naming the first file that is missing, escapes ``root`` or differs.
    """
    base = root.resolve()
    for rel, expected in files.items():
        path = (root / rel).resolve()
        if base not in path.parents:
            raise BundleIntegrityError(f"bundle file {rel!r} escapes the bundle directory")
        if not path.is_file():
            raise BundleIntegrityError(f"bundle file {rel} is missing from {root}")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleIntegrityError(
                f"bundle file {rel} is corrupted or was tampered with (sha256 {actual[:12]}..., manifest says "
                f"{expected[:12]}...); fetch the bundle again"
            )
