"""Validation of a client update against the global model, before it touches any accumulator.

Every size and shape comes from the network: nothing is trusted. :func:`validate_update` raises
:class:`device_runtime.errors.UpdateRejected` with a reason naming the client and the offending field.
"""

from __future__ import annotations

import numpy as np

from coordinator.strategy.types import ClientUpdate, LayerRouting, Params
from device_runtime.bundle import TensorSpec
from device_runtime.errors import UpdateRejected

_STAT_TOLERANCE = 1e-6


def validate_update(update: ClientUpdate, global_params: Params) -> tuple[int, ...]:
    """Check an update's structure, shapes, dtypes, finiteness and statistics.

    Returns:
        the global expert count of each MoE layer of the update (from the global tensors' expert axis).
    Raises:
        UpdateRejected: on the first problem found; ``.reason`` names the client and the field.
    """
    who = f"client {update.client_id!r}"
    if (
        isinstance(update.num_examples, bool)
        or not isinstance(update.num_examples, (int, np.integer))
        or update.num_examples <= 0
    ):
        raise UpdateRejected(f"{who}: num_examples must be a positive integer, got {update.num_examples!r}")
    num_layers = len(update.expert_ids)
    if (
        len(update.trained_experts) != num_layers
        or len(update.routing) != num_layers
        or len(update.frozen_ids) not in (0, num_layers)
    ):
        raise UpdateRejected(
            f"{who}: expert_ids, trained_experts and routing cover different numbers of layers "
            f"({num_layers}, {len(update.trained_experts)}, {len(update.routing)})"
        )
    if set(update.tensors) != set(update.tensor_meta):
        raise UpdateRejected(f"{who}: tensors and tensor_meta name different tensors")
    num_experts: dict[int, int] = {}
    for name, tensor in update.tensors.items():
        _check_tensor(who, name, tensor, update.tensor_meta[name], update, global_params, num_experts)
    for layer in range(num_layers):
        _check_layer(who, layer, update, num_experts.get(layer))
    return tuple(num_experts[layer] for layer in range(num_layers))


def _check_tensor(
    who: str,
    name: str,
    tensor: object,
    meta: TensorSpec,
    update: ClientUpdate,
    global_params: Params,
    num_experts: dict[int, int],
) -> None:
    if name not in global_params:
        raise UpdateRejected(f"{who}: tensor {name!r} is not in the global model")
    if not isinstance(tensor, np.ndarray) or not np.issubdtype(tensor.dtype, np.floating):
        raise UpdateRejected(f"{who}: tensor {name!r} must be a floating-point numpy array")
    reference = global_params[name]
    if not meta.indexed:
        if tensor.shape != reference.shape:
            raise UpdateRejected(
                f"{who}: tensor {name!r} has shape {tensor.shape}, the global model has {reference.shape}"
            )
    else:
        _check_indexed_shape(who, name, tensor.shape, meta, update, reference.shape, num_experts)
    if not np.all(np.isfinite(tensor)):
        raise UpdateRejected(f"{who}: tensor {name!r} holds NaN or infinite values")


def _check_indexed_shape(
    who: str,
    name: str,
    shape: tuple[int, ...],
    meta: TensorSpec,
    update: ClientUpdate,
    global_shape: tuple[int, ...],
    num_experts: dict[int, int],
) -> None:
    layer, axis = meta.moe_layer, meta.moe_axis
    if not 0 <= layer < len(update.expert_ids):
        raise UpdateRejected(
            f"{who}: tensor {name!r} names MoE layer {layer}, the update has {len(update.expert_ids)} layers"
        )
    if not 0 <= axis < len(global_shape) or len(shape) != len(global_shape):
        raise UpdateRejected(
            f"{who}: tensor {name!r} has shape {shape}, incompatible with the global "
            f"{global_shape} on expert axis {axis}"
        )
    kept = len(update.rows(meta))
    expected = global_shape[:axis] + (kept,) + global_shape[axis + 1 :]
    if tuple(shape) != expected:
        raise UpdateRejected(
            f"{who}: tensor {name!r} has shape {tuple(shape)}, expected {expected} "
            f"({kept} experts of the global {global_shape})"
        )
    total = num_experts.setdefault(layer, global_shape[axis])
    if total != global_shape[axis]:
        raise UpdateRejected(
            f"{who}: tensor {name!r} has {global_shape[axis]} global experts, "
            f"other tensors of layer {layer} have {total}"
        )


def _check_layer(who: str, layer: int, update: ClientUpdate, total: int | None) -> None:
    ids, held = update.expert_ids[layer], update.held_ids(layer)
    if total is None:
        raise UpdateRejected(
            f"{who}: MoE layer {layer} has no expert-indexed tensor; its expert ids "
            "cannot be mapped onto the global model"
        )
    if len(ids) == 0 or len(set(held)) != len(held) or any(not 0 <= int(g) < total for g in held):
        raise UpdateRejected(f"{who}: layer {layer} expert ids {held} must be distinct, non-empty and in [0, {total})")
    if not set(update.trained_experts[layer]) <= set(ids):
        raise UpdateRejected(
            f"{who}: layer {layer} trained experts {sorted(update.trained_experts[layer])} "
            f"are not all among its kept experts {ids}"
        )
    _check_routing(who, layer, update.routing[layer], len(held))


def _check_routing(who: str, layer: int, stats: LayerRouting, kept: int) -> None:
    for field_name in ("usage", "specific", "kl", "tokens_routed"):
        values = np.asarray(getattr(stats, field_name))
        if values.shape != (kept,) or not np.all(np.isfinite(values)):
            raise UpdateRejected(
                f"{who}: layer {layer} routing {field_name} must be {kept} finite values, got shape {values.shape}"
            )
    for field_name in ("usage", "specific"):
        values = np.asarray(getattr(stats, field_name))
        if np.any(values < -_STAT_TOLERANCE) or np.any(values > 1 + _STAT_TOLERANCE):
            raise UpdateRejected(f"{who}: layer {layer} routing {field_name} must be probabilities in [0, 1]")
    if np.any(np.asarray(stats.kl) < -_STAT_TOLERANCE) or np.any(np.asarray(stats.tokens_routed) < 0):
        raise UpdateRejected(f"{who}: layer {layer} routing kl and tokens_routed must be >= 0")
