"""The ShapeKey: what a bundle's training graph depends on (the bundle format and the wire protocol name it)."""

from __future__ import annotations

from dataclasses import dataclass

from device_runtime.errors import BundleError

TRAINABLE_MODES = ("experts", "lora")


@dataclass(frozen=True)
class ShapeKey:
    """What a training graph depends on: experts kept per MoE layer and the trainable mode.

    Attributes:
        experts_per_layer: number of experts kept in each MoE layer, in layer order.
        trainable_mode: ``"experts"`` (full expert weights + router) or ``"lora"`` (rank-r adapters on
            each kept expert's projections + router).
        lora_rank: LoRA rank r (0 when ``trainable_mode == "experts"``).
        prox: whether the graph takes FedProx anchor inputs (``<name>.anchor`` and ``prox_mu``).
    """

    experts_per_layer: tuple[int, ...]
    trainable_mode: str = "experts"
    lora_rank: int = 0
    prox: bool = False

    def __post_init__(self):
        if not self.experts_per_layer or any(int(c) < 1 for c in self.experts_per_layer):
            raise BundleError(f"experts_per_layer must be non-empty and >= 1, got {self.experts_per_layer}")
        if self.trainable_mode not in TRAINABLE_MODES:
            raise BundleError(f"trainable_mode must be one of {TRAINABLE_MODES}, got {self.trainable_mode!r}")
        if (self.trainable_mode == "lora") != (self.lora_rank > 0):
            raise BundleError("lora_rank must be > 0 exactly when trainable_mode is 'lora'")

    @property
    def id(self) -> str:
        """A stable, filesystem-safe identifier, e.g. ``experts-2.2.1.1`` or ``lora8-prox-2.2``."""
        mode = self.trainable_mode if self.trainable_mode == "experts" else f"lora{self.lora_rank}"
        prox = "-prox" if self.prox else ""
        return f"{mode}{prox}-" + ".".join(str(c) for c in self.experts_per_layer)

    @classmethod
    def from_dict(cls, data: dict) -> "ShapeKey":
        return cls(
            experts_per_layer=tuple(int(c) for c in data["experts_per_layer"]),
            trainable_mode=str(data.get("trainable_mode", "experts")),
            lora_rank=int(data.get("lora_rank", 0)),
            prox=bool(data.get("prox", False)),
        )
