"""Pretrained Hugging Face MoE models mapped into fedmoe's block (``export.moe_block``).

transformers 5.x loads every family of :data:`export.families.MOE_FAMILIES` with its experts as fused 3-D tensors
(``mlp.experts.gate_up_proj (E, 2I, H)``, ``mlp.experts.down_proj (E, H, I)``) and its router weight at
``mlp.gate.weight (E, H)``; Qwen2-MoE adds a shared expert (``mlp.shared_expert``, a dense gated MLP) scaled by
``sigmoid(mlp.shared_expert_gate(x))``. :func:`to_fedmoe` moves those tensors (the same ``nn.Parameter`` objects'
values) into a :class:`~export.moe_block.MoeBlock` under the same names, so a converted model's ``state_dict`` and
``save_pretrained`` output equal the original's. Only public module attributes are read; no transformers function
is called.

Routing per family (transformers' router classes): softmax over all experts, top-k, renormalised to sum 1 for
Mixtral and, when ``config.norm_topk_prob``, for Qwen2-MoE, Qwen3-MoE and OLMoE. Mixtral's router jitter
(``router_jitter_noise``, a training-time multiplicative noise on the input) is not reproduced: fedmoe trains
without it.
"""

from __future__ import annotations

from torch import nn

from device_runtime.errors import ModelError
from export.families import MOE_FAMILIES
from export.moe_block import Experts, MoeBlock, Router


def _check_layout(name: str, experts: nn.Module) -> None:
    """Refuse fused experts whose layout the block does not compute (transposed, biased, ungated, clamped)."""
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
        raise ModelError(f"{name}: transposed or biased fused experts are not supported")
    if not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True):
        raise ModelError(f"{name}: only gated experts with concatenated [gate; up] weights are supported")
    clamped = [a for a in ("limit", "gate_softcap", "swiglu_alpha") if getattr(experts, a, None) is not None]
    if clamped or not callable(getattr(experts, "act_fn", None)):
        raise ModelError(
            f"{name}: only plain act(gate) * up experts are supported (this one sets {clamped or 'no act_fn'})"
        )


def block_from_hf(mlp: nn.Module, *, norm_topk_prob: bool, name: str = "mlp") -> MoeBlock:
    """A :class:`MoeBlock` holding the router, fused experts and shared expert of a transformers MoE layer.

    Args:
        mlp: a transformers sparse MoE block with ``gate`` (``weight (E, H)``, ``top_k``) and ``experts``
            (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, ``act_fn``); optional ``shared_expert`` and
            ``shared_expert_gate`` (kept as they are).
        norm_topk_prob: renormalise the top-k router weights. name: for error messages.

    Raises:
        ModelError: the experts' layout is not plain ``[gate; up]`` without bias (:func:`_check_layout`).
    """
    _check_layout(name, mlp.experts)
    return MoeBlock(
        router=Router(mlp.gate.weight, top_k=int(mlp.gate.top_k), norm_topk_prob=norm_topk_prob),
        experts=Experts(mlp.experts.gate_up_proj, mlp.experts.down_proj, act_fn=mlp.experts.act_fn),
        shared_expert=getattr(mlp, "shared_expert", None),
        shared_expert_gate=getattr(mlp, "shared_expert_gate", None),
    )


def to_fedmoe(model: nn.Module) -> nn.Module:
    """Replace, in place, every transformers MoE layer of a :data:`MOE_FAMILIES` CausalLM with a
    :class:`MoeBlock` computing the same function; returns ``model``.

    A model of another family (dense, or already converted) is returned unchanged. Dense layers of a MoE model
    (Qwen2-MoE's ``mlp_only_layers``) stay as they are.

    Raises:
        ModelError: a MoE layer's experts are not in the supported layout.
    """
    family = getattr(model.config, "model_type", None)
    if family not in MOE_FAMILIES:
        return model
    norm = MOE_FAMILIES[family]
    norm_topk_prob = bool(model.config.norm_topk_prob) if norm is None else norm
    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if isinstance(mlp, MoeBlock) or not (hasattr(mlp, "gate") and hasattr(mlp, "experts")):
            continue
        layer.mlp = block_from_hf(mlp, norm_topk_prob=norm_topk_prob, name=f"{family} layer {index}")
    return model
