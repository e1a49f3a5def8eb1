"""What a device trains and how it gets its gradients: the two enumerations every part of fedmoe shares.

Both are ``StrEnum``: a member equals its string (``TrainableMode.LORA == "lora"``), so config files, bundle
manifests, profiles and wire messages carry the plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class TrainableMode(StrEnum):
    """What a device trains, besides the routers."""

    EXPERTS = "experts"  # the full weights of the experts it holds
    LORA = "lora"  # per-expert LoRA adapters (Hu et al. 2021) on frozen experts


class Order(StrEnum):
    """How a device's trainer gets its update."""

    FIRST = "first-order"  # backpropagation + AdamW (ONNX Runtime training)
    ZEROTH = "zeroth-order"  # forward passes only (MeZO-style SPSA, Malladi et al. 2023)
    HYBRID = "hybrid-order"  # split: zeroth-order bottom on the device, backprop top on the coordinator (HO-SFL)


def lora_rank_mismatch(trainable_mode: str, lora_rank: int) -> str | None:
    """Why ``(trainable_mode, lora_rank)`` is inconsistent, or None: ``lora_rank > 0`` exactly in LoRA mode."""
    if (trainable_mode == TrainableMode.LORA) != (lora_rank > 0):
        return f"lora_rank must be > 0 exactly when trainable_mode is 'lora' (got {trainable_mode!r}, {lora_rank})"
    return None


ORT_TRAINING_BACKEND = "ort-training"  # Order.FIRST on onnxruntime-training (device_runtime.ort_trainer)
ZO_BACKEND = "zo"  # Order.ZEROTH on plain onnxruntime (device_runtime.zo_trainer)
SPLIT_BACKEND = "split"  # Order.HYBRID: a split bottom on plain onnxruntime (device_runtime.split_trainer)
