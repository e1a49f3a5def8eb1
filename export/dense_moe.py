"""A dense decoder's gated MLPs as fedmoe MoE blocks (``export.moe_block``): the structure sparse upcycling builds.

Komatsuzaki et al., "Sparse Upcycling" (ICLR 2023): each MLP ``down(act(gate x) * up x)`` is copied into every
expert of a :class:`~export.moe_block.MoeBlock` with a fresh router. Used by ``export.upcycle`` (the weights copied
from the dense model) and by ``export.loading`` (the blocks of a fedmoe-format checkpoint, whose tensors are then
loaded over them). MLP layouts: separate ``gate_proj`` / ``up_proj`` / ``down_proj`` (Llama, Mistral, Qwen2/2.5,
Qwen3, Gemma 3) or Phi-3's fused ``gate_up_proj`` (``[gate; up]``, the experts' own layout), no bias.
"""

from __future__ import annotations

from device_runtime.errors import ModelError


def experts_from_dense(gate_proj, up_proj, down_proj, num_experts: int):
    """A dense FFN copied into ``num_experts`` fused experts: ``(gate_up (E, 2I, H), down (E, H, I))``.

    Args: the dense ``gate_proj (I, H)``, ``up_proj (I, H)``, ``down_proj (H, I)`` weights (torch tensors).
    The fused layout is ``[gate; up]`` along dim 1, as transformers' MoE experts keep it.
    """
    import torch

    gate_up = torch.cat([gate_proj, up_proj]).unsqueeze(0).repeat(num_experts, 1, 1)  # (E, 2I, H)
    return gate_up, down_proj.unsqueeze(0).repeat(num_experts, 1, 1)  # (E, H, I)


def dense_mlp(mlp):
    """``(gate (I, H), up (I, H), down (H, I), act_fn)`` of a family's gated MLP module.

    Raises:
        ModelError: the MLP is not gated (no gate/up/down or fused gate_up + down projections) or has biases.
    """
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: one Linear(H, 2I), [gate; up]
        projections, act_fn = (mlp.gate_up_proj, mlp.down_proj), getattr(mlp, "activation_fn", None)
    elif all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        projections, act_fn = (mlp.gate_proj, mlp.up_proj, mlp.down_proj), getattr(mlp, "act_fn", None)
    else:
        raise ModelError(f"{type(mlp).__name__} is not a gated MLP (gate/up/down or gate_up/down projections)")
    if any(p.bias is not None for p in projections) or not callable(act_fn):
        raise ModelError(f"{type(mlp).__name__}: MLP biases or a missing activation are not supported")
    weights = [p.weight.detach() for p in projections]
    if len(weights) == 2:
        weights = [*weights[0].chunk(2, dim=0), weights[1]]
    return (*weights, act_fn)


def install_moe(model, *, num_experts: int, experts_per_token: int, router_std: float = 0.02, seed: int = 0):
    """Replace, in place, every decoder layer's MLP of a dense CausalLM with a :class:`MoeBlock` whose
    ``num_experts`` experts are copies of it and whose router ``(E, H)`` is drawn ``N(0, router_std^2)`` from a
    generator seeded with ``seed`` (layers in order). Returns ``model``.

    Raises:
        ModelError: a layer's MLP is not a gated MLP without bias (:func:`dense_mlp`).
    """
    import torch

    from export.moe_block import Experts, MoeBlock, Router

    generator = torch.Generator().manual_seed(seed)
    hidden = int(model.config.hidden_size)
    for layer in model.model.layers:
        gate, up, down, act_fn = dense_mlp(layer.mlp)
        gate_up, down = experts_from_dense(gate, up, down, num_experts)
        router = torch.randn((num_experts, hidden), generator=generator) * router_std
        layer.mlp = MoeBlock(
            router=Router(router.to(gate.dtype), top_k=experts_per_token, norm_topk_prob=True),
            experts=Experts(gate_up, down, act_fn=act_fn),
        )
    return model
