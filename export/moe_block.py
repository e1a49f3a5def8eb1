"""fedmoe's Mixture-of-Experts block: a router and fused experts passed in, in the place of a decoder layer's MLP.

torchtune-style (``torchtune/modules/moe/moe.py``): :class:`MoeBlock` owns no sizes of its own, its parts are
keyword-only arguments. Every MoE model fedmoe trains holds one per MoE decoder layer at ``layer.mlp``, whatever
its family: upcycled dense decoders (``export.upcycle``) and pretrained Hugging Face MoE checkpoints mapped into it
(``export.hf_moe``). Parameter names are those of transformers' fused MoE layers, so checkpoints, bundles and the
wire format keep them::

    mlp.gate.weight                (E, H)       router
    mlp.experts.gate_up_proj       (E, 2I, H)   [gate; up] of every expert
    mlp.experts.down_proj          (E, H, I)
    mlp.shared_expert.*            dense MLP    optional (Qwen2-MoE), with mlp.shared_expert_gate.weight (1, H)

Routing (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 3-5, with the softmax before the top-k as
Mixtral, Qwen-MoE and OLMoE do it): ``G = softmax(x W_r^T)``, the k largest per token, renormalised to sum to 1 when
``norm_topk_prob`` (Mixtral, Qwen3-MoE, upcycled models; GraniteMoE's softmax over the top-k logits is the same
number). Experts: ``down_e(act(gate_e x) * up_e x)`` (GLU variants, Shazeer 2020, eq. 6), act = SiLU, GELU-tanh, ...

The experts run one of two forwards (``export.experts_impl``): :data:`~export.experts_impl.DENSE_MASKED` (every
expert on every token, combined by a gate matrix: the one ONNX Runtime training differentiates correctly, used for
every export) or :data:`~export.experts_impl.ROUTED` (each expert on its routed tokens only: torch evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from device_runtime.errors import ModelError
from export.experts_impl import DENSE_MASKED, ROUTED, dense_masked_experts_forward, routed_experts_forward

_FORWARDS = {DENSE_MASKED: dense_masked_experts_forward, ROUTED: routed_experts_forward}


class Router(nn.Module):
    """Top-k softmax router.

    Args:
        weight: ``(num_experts, hidden)`` router weight (held as a parameter sharing its storage).
        top_k: experts per token, in ``[1, num_experts]``.
        norm_topk_prob: renormalise the top-k probabilities to sum to 1.

    Forward: ``hidden_states (N, H)`` -> ``(logits (N, E), top_k_weights (N, k) in hidden_states' dtype,
    top_k_index (N, k) int64)``, the output transformers' routers give (``export.training_graph`` and
    ``export.calibration`` read it with forward hooks).

    Raises:
        ModelError: ``weight`` is not 2-D or ``top_k`` is out of range.
    """

    def __init__(self, weight: torch.Tensor, *, top_k: int, norm_topk_prob: bool):
        super().__init__()
        if weight.dim() != 2 or not 1 <= top_k <= weight.shape[0]:
            raise ModelError(f"router weight {tuple(weight.shape)} with top_k {top_k}: want (E, H) and 1 <= k <= E")
        self.weight = nn.Parameter(weight.detach())  # shares storage: no copy
        self.num_experts, self.top_k, self.norm_topk_prob = int(weight.shape[0]), int(top_k), bool(norm_topk_prob)

    def forward(self, hidden_states: torch.Tensor):
        logits = nn.functional.linear(hidden_states, self.weight)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        if top_k_weights.dtype != hidden_states.dtype:  # float32 models: no Cast node in the exported graph
            top_k_weights = top_k_weights.to(hidden_states.dtype)
        return logits, top_k_weights, top_k_index


class Experts(nn.Module):
    """``num_experts`` gated experts as fused tensors.

    Args:
        gate_up_proj: ``(E, 2I, H)``, ``[gate; up]`` along dim 1. down_proj: ``(E, H, I)`` (both held as
            parameters sharing their storage).
        act_fn: the gate activation, e.g. ``nn.SiLU()`` or transformers' ``GELUTanh``.

    Attributes set later: ``implementation`` (:data:`~export.experts_impl.DENSE_MASKED` or ``ROUTED``), LoRA
    adapters (``export.experts_impl.add_lora``), ``frozen_experts`` (``export.prune``).

    Raises:
        ModelError: shapes that do not fit together.
    """

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *, act_fn: Callable):
        super().__init__()
        experts, two_inter, hidden = gate_up_proj.shape
        if two_inter % 2 or tuple(down_proj.shape) != (experts, hidden, two_inter // 2):
            raise ModelError(
                f"experts gate_up_proj {tuple(gate_up_proj.shape)} and down_proj {tuple(down_proj.shape)}: "
                "want (E, 2I, H) and (E, H, I)"
            )
        self.gate_up_proj = nn.Parameter(gate_up_proj.detach())
        self.down_proj = nn.Parameter(down_proj.detach())
        self.act_fn = act_fn
        self.num_experts = int(experts)
        self.implementation = DENSE_MASKED

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """``(N, H)``, ``(N, k)``, ``(N, k)`` -> ``(N, H)``: ``sum_k top_k_weights * expert_{top_k_index}(x)``."""
        return _FORWARDS[self.implementation](self, hidden_states, top_k_index, top_k_weights)


class MoeBlock(nn.Module):
    """A decoder layer's MoE feed-forward: ``(batch, seq_len, H) -> (batch, seq_len, H)``.

    Args (keyword-only): router (:class:`Router`), experts (:class:`Experts`), shared_expert (a dense MLP module
    run on every token, or None) and shared_expert_gate (``nn.Linear(H, 1)``: its sigmoid scales the shared
    expert's output, Qwen2-MoE; None: unscaled).
    """

    def __init__(
        self,
        *,
        router: Router,
        experts: Experts,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ):
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise ModelError(f"router scores {router.num_experts} experts, the block holds {experts.num_experts}")
        self.gate, self.experts = router, experts
        self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)  # (N, H)
        _, top_k_weights, top_k_index = self.gate(flat)
        out = self.experts(flat, top_k_index, top_k_weights)  # (N, H)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)  # (N, H)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.reshape(batch, seq_len, hidden)


def moe_blocks(model: nn.Module) -> list[tuple[int, MoeBlock]]:
    """``(decoder layer index, block)`` of every :class:`MoeBlock` at ``model.model.layers[i].mlp``, in order."""
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoeBlock)]


def set_experts_forward(model: nn.Module, implementation: str) -> nn.Module:
    """Run every fedmoe block of ``model`` with ``implementation`` (``DENSE_MASKED`` or ``ROUTED``); returns it.

    Raises:
        ModelError: an unknown ``implementation``, or ``model`` holds no :class:`MoeBlock` (load it with
            ``export.loading.load_causal_lm``, which maps pretrained MoE families into the block, or convert it
            with ``export.hf_moe.to_fedmoe``).
    """
    if implementation not in _FORWARDS:
        raise ModelError(f"unknown experts forward {implementation!r}; one of {sorted(_FORWARDS)}")
    blocks = moe_blocks(model)
    if not blocks:
        raise ModelError(
            f"{type(model).__name__} holds no fedmoe MoE block: load it with export.loading.load_causal_lm or "
            "convert it with export.hf_moe.to_fedmoe"
        )
    for _, block in blocks:
        block.experts.implementation = implementation
    return model


def use_dense_masked(model: nn.Module) -> nn.Module:
    """:func:`set_experts_forward` with :data:`~export.experts_impl.DENSE_MASKED`: the forward every export uses."""
    return set_experts_forward(model, DENSE_MASKED)


@contextmanager
def routing_outputs(model: nn.Module) -> Iterator[list]:
    """Within the context, the yielded list receives every router call's output ``(logits (N, E), top_k_weights
    (N, k), top_k_index (N, k))``, MoE layers in decoder order within a forward (forward hooks, removed on exit)."""
    captured: list = []
    hooks = [
        block.gate.register_forward_hook(lambda _module, _args, out: captured.append(out))
        for _, block in moe_blocks(model)
    ]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()
