"""Messages of the aggregation strategies: frozen dataclasses over numpy arrays (Flower's ``FitRes`` style).

The **global model** is a ``dict[str, np.ndarray]`` keyed by torch ``state_dict`` name. Expert-indexed
tensors hold the layer's GLOBAL experts on their expert axis (axis 0 for the fused transformers 5.x
layouts), e.g. for ``E`` experts, hidden ``H``, FFN ``I``, LoRA rank ``r``::

    model.layers.3.mlp.experts.gate_up_proj     (E, 2I, H)   role EXPERT, expert_axis 0
    model.layers.3.mlp.experts.down_proj        (E, H, I)    role EXPERT, expert_axis 0
    model.layers.3.mlp.experts.gate_up_lora_A   (E, r, H)    role LORA, expert_axis 0
    model.layers.3.mlp.gate.weight              (E, H)       role ROUTER, expert_axis 0
    model.layers.3.self_attn.q_proj.weight      (H, H)       role SHARED (not indexed by expert)

A :class:`ClientUpdate` carries a client's *pruned* tensors: on the expert axis EXPERT tensors hold only the
client's trained experts, in local order (``expert_ids[layer][i]`` is the global id of local expert ``i``); ROUTER
tensors and the routing statistics hold every expert the client's forward pass routed over,
``held_ids(layer)``: the same, plus, for a device that held the others frozen (a resident bundle,
``export.prune``), ``frozen_ids[layer]`` after them.

A round starts with :class:`FitIns` (Flower's ``FitIns``): what one client trains, chosen by the strategy's
``configure_fit`` from a :class:`ClientInfo` per selected client and the :class:`FitContext` it was bound to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from device_runtime.bundle import TensorRole as TensorRole  # re-exported (coordinator.strategy)
from device_runtime.bundle import TensorSpec as TensorSpec  # re-exported
from device_runtime.shape_key import ShapeKey, parse_trainable_mode
from device_runtime.stats import LayerRouting as LayerRouting  # re-exported
from device_runtime.stats import RoutingStats
from device_runtime.wire import FitConfig, SplitConfig
from export.planner import ModelShape


@dataclass(frozen=True)
class ClientUpdate:
    """One client's fit result (Flower's ``FitRes``), pruned to the experts it held.

    Attributes:
        client_id: the device's id.
        num_examples: |D_c|, training examples (sequences) the client used this round, > 0.
        tensors: name -> pruned tensor; on their expert axis EXPERT tensors have ``len(expert_ids[layer])``
            entries and ROUTER tensors ``len(held_ids(layer))``, every other axis as in the global model.
        tensor_meta: name -> the ``device_runtime.bundle.TensorSpec`` (role, layer, expert axis) of every name in
            ``tensors``.
        expert_ids: per MoE layer, local expert index -> global expert id.
        trained_experts: per MoE layer, the global ids whose weights received gradient steps this round.
        routing: per MoE layer, routing statistics over ``held_ids(layer)`` (``device_runtime.stats.LayerRouting``:
            usage, specific, kl, tokens_routed, num_tokens; HFedMoE's s_cum, s_spec, KL_e).
        metrics: free-form scalars the client reported (loss, seconds, peak RSS ...).
        frozen_ids: per MoE layer, the global ids of the experts the client held frozen (not trained, not sent),
            or ``()``: it held only ``expert_ids``.
    """

    client_id: str
    num_examples: int
    tensors: Mapping[str, np.ndarray]
    tensor_meta: Mapping[str, TensorSpec]
    expert_ids: tuple[tuple[int, ...], ...]
    trained_experts: tuple[frozenset[int], ...]
    routing: tuple[LayerRouting, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    frozen_ids: tuple[tuple[int, ...], ...] = ()

    def held_ids(self, layer: int) -> tuple[int, ...]:
        """Every expert of MoE layer ``layer`` the client's router scored, in local order: trained, then frozen."""
        return tuple(self.expert_ids[layer]) + (tuple(self.frozen_ids[layer]) if self.frozen_ids else ())

    def rows(self, meta: TensorSpec) -> tuple[int, ...]:
        """The global expert ids on an indexed tensor's expert axis: ``held_ids`` for ROUTER, ``expert_ids``
        for EXPERT tensors."""
        layer = meta.moe_layer
        return self.held_ids(layer) if meta.role is TensorRole.ROUTER else tuple(self.expert_ids[layer])


Params = dict[str, np.ndarray]
"""A global model: state_dict name -> array."""

StrategyState = dict[str, np.ndarray]
"""What a strategy carries from one round to the next (server-optimizer moments, a routing prior ...):
``"<kind>/<name>"`` -> array; {} for a stateless strategy. A value: ``aggregate_fit`` takes one and returns the
next, never changing the arrays it was given."""


class Aggregated(NamedTuple):
    """What ``Strategy.aggregate_fit`` returns: the new global model (unchanged tensors shared with the old one),
    the round's metrics, and the strategy state the next round starts from."""

    params: Params
    metrics: dict[str, Any]
    state: StrategyState


Failure = tuple[str, str]
"""A client that did not return a usable update: ``(client_id, reason)``."""

Results = Sequence[ClientUpdate] | Callable[[], Iterable[ClientUpdate]]
"""Client updates: a re-iterable sequence, or a zero-argument callable returning a fresh iterable (e.g.
one that reads stored update files). A plain iterator is accepted only by single-pass strategies."""


@dataclass(frozen=True)
class ClientEvaluation:
    """One client's score of a global model on its own held-out data (Flower's ``EvaluateRes``).

    In fedmoe a device scores the model its round's assignment carried, before training on it
    (``device_runtime.wire.EvalResult``), as its bundle holds it: a pruned bundle routes over its kept experts only.

    Attributes:
        client_id: the device's id.
        loss: mean cross-entropy of the held-out completion tokens, nats per token.
        num_examples: held-out sequences scored, > 0 (the weight of the default aggregation).
        metrics: other numbers, e.g. ``accuracy`` in [0, 1] where the client computed it, ``num_tokens``.
        shape_key: the id of the graph the client scored with (``ShapeKey.id``; says which experts it held), or "".
    """

    client_id: str
    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    shape_key: str = ""


MetricsAggregationFn = Callable[[list[tuple[int, Mapping[str, float]]]], dict[str, float]]
"""Flower's ``MetricsAggregationFn``: ``[(num_examples, metrics) per client] -> aggregated metrics``."""


@dataclass(frozen=True)
class ClientInfo:
    """A client selected for a round, as ``configure_fit`` sees it (Flower's ``ClientProxy``).

    Attributes:
        client_id: the device's id.
        profile: the device's profile (``memory_mib`` or ``memory_available_mib`` in MiB, ``gflops`` ...,
            see ``device_runtime.profile``).
        routing: the routing statistics of its last accepted update (global expert ids in
            ``routing.expert_ids``), or None before its first one.
    """

    client_id: str
    profile: Mapping[str, Any]
    routing: RoutingStats | None = None


@dataclass(frozen=True)
class FitContext:
    """What ``configure_fit`` needs from the federation besides the strategy's own hyper-parameters.

    Attributes:
        model: the global model's sizes (``export.planner.model_shape``), for the budget planner.
        calibration: routing statistics of the calibration pass over the global experts (``fedmoe-coord init``).
        fit: the local training settings every round starts from (the config's ``[fit]``).
        trainable_mode, lora_rank: what devices train (``"experts"`` or ``"lora"`` with rank > 0).
        seed: round ``r``'s FitConfig gets seed ``(seed + r) % 2**32``.
        frozen_dtype: devices hold the experts they do not train frozen in this dtype (``export.prune``), where
            their budget affords it; None: pruned. merged: below that budget, merged into one stand-in per layer
            (the planner's ladder, ``selection.affordable_fit``).
        split: how devices with the split backend train (``[split]``, HO-SFL); None: they sit rounds out.
    """

    model: ModelShape
    calibration: RoutingStats
    fit: FitConfig = field(default_factory=FitConfig)
    trainable_mode: str = "experts"
    lora_rank: int = 0
    seed: int = 0
    frozen_dtype: str | None = None
    merged: bool = True
    split: SplitConfig | None = None


@dataclass(frozen=True)
class FitIns:
    """What one client trains in one round (Flower's ``FitIns``); the coordinator carries it to the device
    as an ``Assignment`` (its bundle is the one of :attr:`shape_key`).

    Attributes:
        expert_ids: per MoE layer, the global ids of the experts the client holds, ascending (a split client:
            per MoE layer below its cut, ``config.split.cut_layer``).
        config: the local training settings, with the strategy's own inputs (FedProx ``prox_mu``, FedAlign-MoE
            ``routing_prior`` and its coefficient).
        trainable_mode: ``"experts"`` or ``"lora"``. lora_rank: r (LoRA mode only).
        frozen_dtype: the client holds every other expert frozen in this dtype; None: only ``expert_ids``.
        merged: it holds them merged into one stand-in per layer.
    """

    expert_ids: tuple[tuple[int, ...], ...]
    config: FitConfig
    trainable_mode: str = "experts"
    lora_rank: int = 0
    frozen_dtype: str | None = None
    merged: bool = False

    @property
    def shape_key(self) -> ShapeKey:
        """The graph this client trains: experts per layer, trainable mode, a FedProx anchor if mu > 0, and the
        dtype of the experts it holds frozen."""
        return ShapeKey(
            tuple(len(ids) for ids in self.expert_ids),
            parse_trainable_mode(self.trainable_mode),
            self.lora_rank,
            self.config.prox_mu > 0,
            self.frozen_dtype,
            self.merged,
            0 if self.config.split is None else self.config.split.cut_layer,
        )
