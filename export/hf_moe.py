"""Pretrained Hugging Face MoE models mapped into fedmoe's block (``export.moe_block``), and back.

transformers 5.x loads every family of :data:`export.families.MOE_FAMILIES` with its experts as fused 3-D tensors
(``experts.gate_up_proj (E, 2I, H)``, ``experts.down_proj (E, H, I)``) and a router weight ``(E, H)``; Qwen2-MoE adds a
shared expert (``mlp.shared_expert``, a dense gated MLP) scaled by ``sigmoid(mlp.shared_expert_gate(x))``.
:func:`to_fedmoe` moves those tensors (sharing their storage) into a :class:`~export.moe_block.MoeBlock` at
``layer.mlp``. Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE keep them there already (``mlp.gate``, ``mlp.experts``), so a
converted model's ``state_dict`` and ``save_pretrained`` output equal the original's. GraniteMoE keeps its MoE at
``layer.block_sparse_moe`` with the router at ``.router`` (:data:`HF_LAYOUT`): the block goes to ``layer.mlp``, so its
tensors get fedmoe's names (the ones bundles and the wire format use), and ``layer.block_sparse_moe`` stays an
unregistered alias of it (an instance attribute, not a submodule: the decoder layer's forward calls it, the state
dict does not list it twice); :func:`to_hf` gives the tensors back their family's names for a Hugging Face export.
Only public module attributes are read; no transformers function is called.

Routing per family (transformers' router classes): softmax over all experts, top-k, renormalised to sum 1 for
Mixtral and, when ``config.norm_topk_prob``, for Qwen2-MoE, Qwen3-MoE and OLMoE; GraniteMoE's softmax over the top-k
logits is the same renormalised number. Mixtral's router jitter
(``router_jitter_noise``, a training-time multiplicative noise on the input) is not reproduced: fedmoe trains
without it.
"""

from __future__ import annotations

from torch import nn

from device_runtime.errors import ModelError
from export.families import MOE_FAMILIES
from export.moe_block import Experts, MoeBlock, Router

# model_type -> (the decoder layer's attribute holding its MoE, the MoE's router attribute); default ("mlp", "gate")
HF_LAYOUT = {"granitemoe": ("block_sparse_moe", "router")}
_FEDMOE_LAYOUT = ("mlp", "gate")


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


def block_from_hf(mlp: nn.Module, *, norm_topk_prob: bool, router: str = "gate", name: str = "mlp") -> MoeBlock:
    """A :class:`MoeBlock` holding the router, fused experts and shared expert of a transformers MoE layer.

    Args:
        mlp: a transformers sparse MoE block with a router at attribute ``router`` (``weight (E, H)``, ``top_k``) and
            ``experts`` (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, ``act_fn``); optional
            ``shared_expert`` and ``shared_expert_gate`` (kept as they are).
        norm_topk_prob: renormalise the top-k router weights. name: for error messages.

    Raises:
        ModelError: the experts' layout is not plain ``[gate; up]`` without bias (:func:`_check_layout`).
    """
    _check_layout(name, mlp.experts)
    gate = getattr(mlp, router)
    return MoeBlock(
        router=Router(gate.weight, top_k=int(gate.top_k), norm_topk_prob=norm_topk_prob),
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
    where, router = HF_LAYOUT.get(family, _FEDMOE_LAYOUT)
    for index, layer in enumerate(model.model.layers):
        hf = getattr(layer, where, None)
        if isinstance(hf, MoeBlock) or not (hasattr(hf, router) and hasattr(hf, "experts")):
            continue
        block = block_from_hf(hf, norm_topk_prob=norm_topk_prob, router=router, name=f"{family} layer {index}")
        if where != "mlp":
            delattr(layer, where)  # unregistered, then aliased: the forward calls it, the state dict skips it
            layer.__dict__[where] = block
        layer.mlp = block
    return model


def to_hf(model: nn.Module) -> nn.Module:
    """A model that ``save_pretrained`` writes in its family's own Hugging Face layout: ``model`` itself, except for
    the families of :data:`HF_LAYOUT` (GraniteMoE), for which a fresh transformers model of the family gets
    ``model``'s tensors under the family's names (``block_sparse_moe.router`` / ``.experts`` for fedmoe's
    ``mlp.gate`` / ``mlp.experts``), loaded strictly.
    """
    layout = HF_LAYOUT.get(getattr(model.config, "model_type", None))
    if layout is None:
        return model
    import torch
    from transformers import AutoModelForCausalLM

    where, router = layout
    renamed = {".mlp.gate.": f".{where}.{router}.", ".mlp.experts.": f".{where}.experts."}
    state = {}
    for name, tensor in model.state_dict().items():
        for ours, theirs in renamed.items():
            name = name.replace(ours, theirs)
        state[name] = tensor
    hf = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    hf.load_state_dict(state, strict=True)
    return hf.eval()
