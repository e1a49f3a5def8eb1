"""Pruning: a MoE model holding only the experts a device trains, and optionally the others frozen.

Per MoE layer the fused expert tensors (and LoRA adapters, when present) keep the rows of the trained experts.

- Pruned (``frozen_dtype=None``): the router keeps the same rows and top-k becomes ``min(k, kept)``. Local expert
  index i of layer l is global expert ``expert_ids[l][i]``: the map every update is scattered back with.
- Resident (``frozen_dtype="float16"``; HFedMoE's device design, arXiv 2601.00583 Sec. IV: the budget bounds
  what trains, not what the forward pass routes over): every other expert stays, frozen, in ``frozen_dtype``
  (``experts.frozen_experts``, see ``export.experts_impl.expert_weights``); the router keeps all E rows,
  reordered to the local order ``device_runtime.shape_key.held_experts`` (trained first, then the frozen ones
  ascending), and top-k stays k. The forward pass equals the global model's up to the frozen experts' rounding.
- Merged (``merged=True`` with a ``frozen_dtype``; FLUX, arXiv 2508.19078, for budgets below the resident set):
  as resident, but the frozen experts of a layer become ONE stand-in, their mean (MC-SMoE / HC-SMoE merge experts
  the same way, weighted by usage); the router still scores all E and every frozen expert's gate goes to the
  stand-in (``export.experts_impl``), so the forward costs C + 1 experts instead of E.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from device_runtime.errors import ConfigError
from device_runtime.shape_key import held_experts, standin_expert
from export.families import describe


def _slice_parameters(module, index) -> None:
    """Keep rows ``index`` on axis 0 of every direct parameter of ``module``."""
    import torch

    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, torch.nn.Parameter(param.detach()[index].clone(), requires_grad=param.requires_grad))


def prune(model, keep: Sequence[Sequence[int]], frozen_dtype: str | None = None, merged: bool = False):
    """Return a copy of ``model`` training, in MoE layer l, only the global experts ``keep[l]`` (in that order),
    and holding the others frozen in ``frozen_dtype`` or not at all (None; see the module docstring).

    Args:
        model: a transformers MoE CausalLM of a supported family.
        keep: per MoE layer, the global expert ids to keep, distinct, each in ``[0, num_experts)``.
        frozen_dtype: None, or ``"float16"``. merged: hold the frozen experts as one stand-in per layer.

    Returns:
        ``(pruned_model, expert_ids)``: expert_ids is ``keep`` as a tuple of tuples (local -> global).

    Raises:
        ConfigError: ``keep`` has the wrong number of layers, duplicates, or out-of-range ids.
    """
    import torch

    description = describe(model)
    if len(keep) != len(description.layers):
        raise ConfigError(f"keep lists {len(keep)} layers, the model has {len(description.layers)} MoE layers")
    pruned = copy.deepcopy(model)
    expert_ids = []
    for layer, ids in zip(description.layers, keep):
        ids = tuple(int(g) for g in ids)
        if not ids or len(set(ids)) != len(ids) or not all(0 <= g < layer.num_experts for g in ids):
            raise ConfigError(f"layer {layer.index}: expert ids {ids} must be distinct, in [0, {layer.num_experts})")
        mlp = pruned.model.layers[layer.index].mlp
        held = held_experts((ids,), layer.num_experts, frozen_dtype is not None)[0]
        if len(held) > len(ids):
            rest = torch.tensor(held[len(ids) :], dtype=torch.long)
            dtype = getattr(torch, frozen_dtype)
            mlp.experts.frozen_experts = tuple(
                _frozen_rows(param.detach()[rest], merged).transpose(1, 2).contiguous().to(dtype)
                for param in (mlp.experts.gate_up_proj, mlp.experts.down_proj)
            )
        _slice_parameters(mlp.gate, torch.tensor(held, dtype=torch.long))
        _slice_parameters(mlp.experts, torch.tensor(ids, dtype=torch.long))
        mlp.gate.num_experts = mlp.experts.num_experts = len(held)
        mlp.gate.top_k = min(layer.experts_per_token, len(held))
        if hasattr(mlp, "top_k"):
            mlp.top_k = mlp.gate.top_k
        expert_ids.append(ids)
    _sync_config(
        pruned.config,
        held_experts(expert_ids, description.num_experts, frozen_dtype is not None),
        description.experts_per_token,
    )
    return pruned, tuple(expert_ids)


def _frozen_rows(rows, merged: bool):
    """The frozen experts ``rows (F, out, in)`` as held: all of them, or their stand-in (``standin_expert``)."""
    import torch

    return torch.from_numpy(standin_expert(rows.numpy())) if merged else rows


def _sync_config(config, held, top_k: int) -> None:
    """Make the config tell the pruned sizes (the largest held count; layers carry their own)."""
    kept = max(len(ids) for ids in held)
    for attr in ("num_local_experts", "num_experts"):
        if hasattr(config, attr):
            setattr(config, attr, kept)
    config.num_experts_per_tok = min(top_k, kept)
