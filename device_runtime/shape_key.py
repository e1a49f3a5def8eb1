"""The ShapeKey: what a bundle's training graph depends on (the bundle format and the wire protocol name it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from device_runtime.errors import BundleError
from device_runtime.modes import TrainableMode, lora_rank_mismatch

TRAINABLE_MODES = tuple(TrainableMode)
FROZEN_DTYPES = ("float16",)  # the precision of resident frozen experts (graph inputs, cast up in the graph)


def parse_trainable_mode(value: str) -> TrainableMode:
    """``value`` (a config's, manifest's or shape key id's string) as a :class:`TrainableMode`.

    Raises:
        BundleError: ``value`` names no trainable mode (the error :class:`ShapeKey` gives).
    """
    if value not in TRAINABLE_MODES:
        raise BundleError(f"trainable_mode must be one of {TRAINABLE_MODES}, got {value!r}")
    return TrainableMode(value)


def held_experts(trained: tuple[tuple[int, ...], ...], num_experts: int, frozen: bool) -> tuple[tuple[int, ...], ...]:
    """Per MoE layer, the global ids of every expert a device holds, in its local order: the ``trained`` ones
    (in their order), then, when ``frozen``, every other expert of the ``num_experts`` ascending (held frozen)."""
    if not frozen:
        return tuple(tuple(ids) for ids in trained)
    return tuple(tuple(ids) + tuple(g for g in range(num_experts) if g not in ids) for ids in trained)


def standin_expert(rows: np.ndarray) -> np.ndarray:
    """The stand-in of a layer's frozen experts ``rows (F, ...)`` (a merged bundle, ``ShapeKey.merged``): their mean,
    ``(1, ...)``, in the dtype of ``rows`` (accumulated in float64)."""
    mean: np.ndarray = rows.mean(axis=0, keepdims=True, dtype=np.float64)
    return mean.astype(rows.dtype)


@dataclass(frozen=True)
class ShapeKey:
    """What a training graph depends on: experts kept per MoE layer and the trainable mode.

    Attributes:
        experts_per_layer: number of experts kept in each MoE layer, in layer order.
        trainable_mode: ``"experts"`` (full expert weights + router) or ``"lora"`` (rank-r adapters on
            each kept expert's projections + router).
        lora_rank: LoRA rank r (0 when ``trainable_mode == "experts"``).
        prox: whether the graph takes FedProx anchor inputs (``<name>.anchor`` and ``prox_mu``).
        frozen_dtype: None: the graph holds only the trained experts (pruned, top-k = min(k, kept)). A dtype of
            :data:`FROZEN_DTYPES`: it holds every expert of the global model, the others frozen in that dtype
            (graph inputs ``frozen_gate_up_{l}`` / ``frozen_down_{l}``), and routes over all of them with the
            global top-k (``export.prune``); experts mode only.
        merged: with ``frozen_dtype``: the frozen experts of each layer are merged into one stand-in expert (their
            mean), which every router row of a frozen expert points to (FLUX, arXiv 2508.19078; MC-SMoE).
        cut_layer: 0: the graph is the whole model (a training or eval graph). K > 0: a split device's bottom
            (HO-SFL): embeddings and decoder layers 0..K-1, forward-only, whose output is the smashed data at
            the cut; ``experts_per_layer`` then counts the MoE layers below the cut.
    """

    experts_per_layer: tuple[int, ...]
    trainable_mode: TrainableMode = TrainableMode.EXPERTS
    lora_rank: int = 0
    prox: bool = False
    frozen_dtype: str | None = None
    merged: bool = False
    cut_layer: int = 0

    def __post_init__(self) -> None:
        if not self.experts_per_layer or any(int(c) < 1 for c in self.experts_per_layer):
            raise BundleError(f"experts_per_layer must be non-empty and >= 1, got {self.experts_per_layer}")
        if self.trainable_mode not in TRAINABLE_MODES:
            raise BundleError(f"trainable_mode must be one of {TRAINABLE_MODES}, got {self.trainable_mode!r}")
        if (why := lora_rank_mismatch(self.trainable_mode, self.lora_rank)) is not None:
            raise BundleError(why)
        object.__setattr__(self, "trainable_mode", TrainableMode(self.trainable_mode))
        if self.frozen_dtype is not None and (
            self.frozen_dtype not in FROZEN_DTYPES or self.trainable_mode != TrainableMode.EXPERTS
        ):
            raise BundleError(
                f"frozen_dtype must be None or one of {FROZEN_DTYPES} (experts mode only), "
                f"got {self.frozen_dtype!r} with {self.trainable_mode!r}"
            )
        if self.merged and self.frozen_dtype is None:
            raise BundleError("merged stand-in experts need a frozen_dtype")
        if self.cut_layer < 0 or (self.cut_layer and (self.frozen_dtype is not None or self.prox)):
            raise BundleError(
                f"cut_layer must be >= 0, and a split bottom (cut_layer > 0) holds no frozen experts and no FedProx "
                f"inputs; got cut_layer {self.cut_layer} with frozen_dtype {self.frozen_dtype!r}, prox {self.prox}"
            )

    @property
    def id(self) -> str:
        """A stable, filesystem-safe identifier, e.g. ``experts-2.2.1.1``, ``lora8-prox-2.2`` or
        ``experts-float16-1.1`` (frozen experts resident in float16) or ``experts-cut2-1.1`` (a split bottom)."""
        mode = "experts" if self.trainable_mode == TrainableMode.EXPERTS else f"lora{self.lora_rank}"
        prox = "-prox" if self.prox else ""
        frozen = f"-{self.frozen_dtype}" if self.frozen_dtype else ""
        frozen += "-merged" if self.merged else ""
        frozen += f"-cut{self.cut_layer}" if self.cut_layer else ""
        return f"{mode}{prox}{frozen}-" + ".".join(str(c) for c in self.experts_per_layer)

    def held_label(self, num_experts: int) -> str:
        """What the graph holds besides its trained experts: ``"3 float16"`` (resident, the most frozen in a
        layer), ``"stand-in float16"`` (merged), ``"-"`` (pruned, or nothing left to hold)."""
        if self.frozen_dtype is None:
            return "-"
        if self.merged:
            return f"stand-in {self.frozen_dtype}"
        return f"{num_experts - min(self.experts_per_layer)} {self.frozen_dtype}"

    @classmethod
    def from_id(cls, text: str) -> ShapeKey:
        """The inverse of :attr:`id`.

        Raises:
            BundleError: ``text`` is not a shape key id.
        """
        *parts, counts = text.split("-")
        try:
            mode, rest = parts[0], parts[1:]
            lora = mode.startswith("lora")
            key = cls(
                tuple(int(c) for c in counts.split(".")),
                parse_trainable_mode("lora" if lora else mode),
                int(mode[4:]) if lora else 0,
                "prox" in rest,
                next((p for p in rest if p in FROZEN_DTYPES), None),
                "merged" in rest,
                next((int(p[3:]) for p in rest if p.startswith("cut")), 0),
            )
        except (IndexError, ValueError) as exc:
            raise BundleError(f"{text!r} is not a shape key id") from exc
        if key.id != text:
            raise BundleError(f"{text!r} is not a shape key id")
        return key

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeKey:
        return cls(
            experts_per_layer=tuple(int(c) for c in data["experts_per_layer"]),
            trainable_mode=parse_trainable_mode(str(data.get("trainable_mode", "experts"))),
            lora_rank=int(data.get("lora_rank", 0)),
            prox=bool(data.get("prox", False)),
            frozen_dtype=None if data.get("frozen_dtype") is None else str(data["frozen_dtype"]),
            merged=bool(data.get("merged", False)),
            cut_layer=int(data.get("cut_layer", 0)),
        )
