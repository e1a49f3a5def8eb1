"""The two forwards of fedmoe's fused experts (``export.moe_block.Experts``), and per-expert LoRA adapters.

Why: ONNX Runtime training gives silent wrong gradients for ScatterND/ScatterElements with
``reduction="add"`` (``index_add``) and Sequence ops, and no gradient for Einsum (``docs/stack.md``). Here every
expert of a (pruned) layer runs on every token with batched MatMul, and the outputs are combined with an
``(num_tokens, num_experts)`` gate matrix that is zero outside each token's top-k. The result equals the
sparse computation (the zero gates drop the unused outputs); the cost is ``num_experts / top_k`` times the
expert FLOPs, which is acceptable for the few experts a device keeps.

The experts are fused tensors (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, concatenated ``[gate; up]``
layout, no bias) with an ``act_fn``; :func:`routed_experts_forward` is the sparse form for torch evaluation.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3:
``h = W0 x + (alpha / r) B A x``) is added per expert by :func:`add_lora`; the dense-masked forward uses
the adapters whenever they are present.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from device_runtime.errors import ModelError

DENSE_MASKED = "dense_masked"
ROUTED = "routed"
LORA_PARAMS = ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B")


def gate_matrix(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The dense routing matrix: ``gates[n, e] = sum_k [top_k_index[n, k] == e] * top_k_weights[n, k]``.

    Args:
        top_k_index: ``(num_tokens, top_k)`` int64 expert ids.
        top_k_weights: ``(num_tokens, top_k)`` routing weights.
        num_experts: E.

    Returns:
        ``(num_tokens, num_experts)``, zero outside each token's top-k (built with Equal + Mul + ReduceSum:
        no OneHot/Scatter in the exported graph).
    """
    experts = torch.arange(num_experts, device=top_k_index.device)
    hits = (top_k_index.unsqueeze(-1) == experts).to(top_k_weights.dtype)  # (N, k, E)
    return (hits * top_k_weights.unsqueeze(-1)).sum(dim=1)  # (N, E)


def gated_activation(self: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The gated expert activation ``act(gate) * up`` of a ``[gate; up]`` projection (SwiGLU for SiLU experts:
    Shazeer 2020, "GLU Variants Improve Transformer", eq. 6).

    Args:
        self: the fused experts module; its ``act_fn`` is the activation.
        gate_up: ``(..., 2I)``.

    Returns:
        ``(..., I)``.
    """
    gate, up = gate_up.chunk(2, dim=-1)
    return self.act_fn(gate) * up


def _project(x: torch.Tensor, weight: torch.Tensor, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """Every expert's linear map of ``x``: ``(N, in) -> (E, N, out)`` for ``weight (E, out, in)``."""
    out = torch.matmul(x, weight.transpose(1, 2))  # (E, N, out)
    if lora_a is not None:
        low = torch.matmul(x, lora_a.transpose(1, 2))  # (E, N, r)
        out = out + scaling * torch.matmul(low, lora_b.transpose(1, 2))  # (E, N, out)
    return out


def expert_weights(self: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's ``(gate_up (E, 2I, H), down (E, H, I))`` in local order: the module's own (trained) rows,
    then the rows of ``self.frozen_experts`` (held frozen in reduced precision, cast up here) if it is set.

    ``frozen_experts`` is a plain attribute, ``(gate_up (F, H, 2I), down (F, I, H))`` (transposed: the layout
    the forward's matmuls read, so the graph keeps no transposed float32 copy of them) or None: not a
    parameter, so the exported graph takes it as an input (``export.training_graph``) and it is never trained.
    """
    frozen = getattr(self, "frozen_experts", None)
    if frozen is None:
        return self.gate_up_proj, self.down_proj
    gate_up, down = frozen
    if self.gate_up_proj.shape[0] + gate_up.shape[0] != getattr(self, "num_experts", 0):
        raise ModelError("a merged stand-in expert has no per-expert weights: use the dense-masked forward")
    return (
        torch.cat([self.gate_up_proj, gate_up.transpose(1, 2).to(self.gate_up_proj.dtype)]),
        torch.cat([self.down_proj, down.transpose(1, 2).to(self.down_proj.dtype)]),
    )


def dense_masked_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward, every expert on every token.

    Args:
        self: the fused experts module (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, optional LoRA
            parameters from :func:`add_lora`, optional frozen experts: :func:`expert_weights`).
        hidden_states: ``(num_tokens, hidden)``.
        top_k_index: ``(num_tokens, top_k)`` int64.
        top_k_weights: ``(num_tokens, top_k)``.

    Returns:
        ``(num_tokens, hidden)``: ``sum_e gates[n, e] * expert_e(hidden_states[n])``.

    Frozen experts (stored transposed, :func:`expert_weights`) are projected apart from the trained ones and only
    their outputs concatenated: concatenating the weights, or transposing them in the graph, keeps more float32
    copies of every expert's matrices for the backward (measured on the 8-layer SmolLM2 e4k2 Pi bundle, 1
    trained + 3 frozen experts per layer, 10 steps of 4 x 64: 1564 MiB peak with concatenated weights, 1496
    with concatenated outputs, against 795 pruned).
    """
    lora = getattr(self, "gate_up_lora_A", None) is not None
    scaling = getattr(self, "lora_scaling", 0.0)
    frozen = getattr(self, "frozen_experts", None)
    gate_up = _project(
        hidden_states,
        self.gate_up_proj,
        self.gate_up_lora_A if lora else None,
        self.gate_up_lora_B if lora else None,
        scaling,
    )  # (C, N, 2I)
    if frozen is not None:
        gate_up = torch.cat([gate_up, torch.matmul(hidden_states, frozen[0].to(gate_up.dtype))])
    inner = gated_activation(self, gate_up)  # (E, N, I)
    trained = self.gate_up_proj.shape[0]
    out = _project(
        inner if frozen is None else inner[:trained],
        self.down_proj,
        self.down_lora_A if lora else None,
        self.down_lora_B if lora else None,
        scaling,
    )  # (C, N, H)
    if frozen is not None:
        out = torch.cat([out, torch.matmul(inner[trained:], frozen[1].to(out.dtype))])  # (E, N, H)
    gates = gate_matrix(top_k_index, top_k_weights, getattr(self, "num_experts", out.shape[0]))  # (N, E)
    if gates.shape[1] > out.shape[0]:  # a merged stand-in: every frozen expert's gate goes to it
        gates = torch.cat([gates[:, :trained], gates[:, trained:].sum(dim=1, keepdim=True)], dim=1)  # (N, C + 1)
    combined = (out * gates.transpose(0, 1).unsqueeze(-1)).sum(dim=0)  # (N, H)
    return combined.to(hidden_states.dtype)


def routed_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The same result as :func:`dense_masked_experts_forward`, each expert on only its routed tokens.

    For inference in torch (server-side evaluation): ``top_k / num_experts`` of the dense-masked expert FLOPs.
    It uses ``index_add``, so it is never exported (``docs/stack.md``). Shapes as in the dense-masked forward.
    """
    lora = getattr(self, "gate_up_lora_A", None) is not None
    scaling = getattr(self, "lora_scaling", 0.0)
    gate_up_proj, down_proj = expert_weights(self)
    gates = gate_matrix(top_k_index, top_k_weights, gate_up_proj.shape[0])  # (N, E)
    out = torch.zeros_like(hidden_states, dtype=gates.dtype)  # (N, H)
    for expert in torch.nonzero(gates.sum(0), as_tuple=True)[0].tolist():
        tokens = torch.nonzero(gates[:, expert], as_tuple=True)[0]  # (n,)
        pick = slice(expert, expert + 1)
        gate_up = _project(
            hidden_states[tokens],
            gate_up_proj[pick],
            self.gate_up_lora_A[pick] if lora else None,
            self.gate_up_lora_B[pick] if lora else None,
            scaling,
        )  # (1, n, 2I)
        inner = gated_activation(self, gate_up)  # (1, n, I)
        expert_out = _project(
            inner,
            down_proj[pick],
            self.down_lora_A[pick] if lora else None,
            self.down_lora_B[pick] if lora else None,
            scaling,
        )[0]  # (n, H)
        out.index_add_(0, tokens, expert_out * gates[tokens, expert].unsqueeze(-1))
    return out.to(hidden_states.dtype)


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fused experts modules of ``model`` (those with 3-D ``gate_up_proj`` and ``down_proj``), in order."""
    found = []
    for name, module in model.named_modules():
        gate_up = getattr(module, "gate_up_proj", None)
        down = getattr(module, "down_proj", None)
        if isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3:
            found.append((name, module))
    return found


def _lora_pair(num_experts: int, rank: int, fan_in: int, fan_out: int, like: torch.Tensor):
    """``A (E, r, in)`` Kaiming-uniform as in PEFT, ``B (E, out, r)`` zero so the output is unchanged."""
    a = torch.empty(num_experts, rank, fan_in, dtype=like.dtype, device=like.device)
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on a (r, in) matrix
    nn.init.uniform_(a, -bound, bound)
    b = torch.zeros(num_experts, fan_out, rank, dtype=like.dtype, device=like.device)
    return nn.Parameter(a), nn.Parameter(b)


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """Add per-expert LoRA adapters to every fused experts module of ``model``.

    Each experts module gets ``gate_up_lora_A (E, r, H)``, ``gate_up_lora_B (E, 2I, r)``,
    ``down_lora_A (E, r, I)``, ``down_lora_B (E, H, r)`` and ``lora_scaling = alpha / r``. B is zero, so the
    model output is unchanged until training moves it. Both forwards use the adapters.

    Returns:
        The new parameters' names, as in ``model.state_dict()``.

    Raises:
        ModelError: ``rank < 1``, adapters already present, or the model has no fused experts.
    """
    if rank < 1:
        raise ModelError(f"LoRA rank must be >= 1, got {rank}")
    found = experts_modules(model)
    if not found:
        raise ModelError(f"{type(model).__name__} has no fused MoE experts to attach LoRA adapters to")
    names = []
    for prefix, module in found:
        if getattr(module, "gate_up_lora_A", None) is not None:
            raise ModelError(f"{prefix} already has LoRA adapters")
        num_experts, two_inter, hidden = module.gate_up_proj.shape
        inter = module.down_proj.shape[2]
        like = module.gate_up_proj
        module.gate_up_lora_A, module.gate_up_lora_B = _lora_pair(num_experts, rank, hidden, two_inter, like)
        module.down_lora_A, module.down_lora_B = _lora_pair(num_experts, rank, inter, hidden, like)
        module.lora_scaling = float(alpha) / rank
        names += [f"{prefix}.{p}" for p in LORA_PARAMS]
    return names
