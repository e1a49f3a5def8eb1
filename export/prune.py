"""Pruning: a MoE model holding only the experts a device keeps.

Per MoE layer the fused expert tensors (and LoRA adapters, when present) keep the rows of the kept experts,
the router keeps the same rows, and top-k becomes ``min(k, kept)``. Local expert index i of layer l is
global expert ``expert_ids[l][i]``: the map every update is scattered back with.
"""

from __future__ import annotations

import copy
from typing import Sequence

from device_runtime.errors import ConfigError
from export.families import describe


def _slice_parameters(module, index) -> None:
    """Keep rows ``index`` on axis 0 of every direct parameter of ``module``."""
    import torch

    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, torch.nn.Parameter(param.detach()[index].clone(), requires_grad=param.requires_grad))


def prune(model, keep: Sequence[Sequence[int]]):
    """Return a copy of ``model`` holding, in MoE layer l, only the global experts ``keep[l]`` (in that order).

    Args:
        model: a transformers MoE CausalLM of a supported family.
        keep: per MoE layer, the global expert ids to keep, distinct, each in ``[0, num_experts)``.

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
        index = torch.tensor(ids, dtype=torch.long)
        mlp = pruned.model.layers[layer.index].mlp
        _slice_parameters(mlp.gate, index)
        _slice_parameters(mlp.experts, index)
        mlp.gate.num_experts = mlp.experts.num_experts = len(ids)
        mlp.gate.top_k = min(layer.experts_per_token, len(ids))
        if hasattr(mlp, "top_k"):
            mlp.top_k = mlp.gate.top_k
        expert_ids.append(ids)
    _sync_config(pruned.config, expert_ids, description.experts_per_token)
    return pruned, tuple(expert_ids)


def _sync_config(config, expert_ids, top_k: int) -> None:
    """Make the config tell the pruned sizes (the largest kept count; layers carry their own)."""
    kept = max(len(ids) for ids in expert_ids)
    for attr in ("num_local_experts", "num_experts"):
        if hasattr(config, attr):
            setattr(config, attr, kept)
    config.num_experts_per_tok = min(top_k, kept)
