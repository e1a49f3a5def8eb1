"""The coordinator's split mode across rounds: builds each round's :class:`~coordinator.split_group.SplitGroup`,
serialises the devices' step messages into it (the top runs in a worker thread), and turns a split device's
Update (no tensors) into the update the strategy reads (``coordinator.split_group`` explains why each member
carries the group's model with its own examples).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from coordinator.planning import to_client_update
from coordinator.split_group import Member, Replies, SplitGroup
from coordinator.strategy.validate import validate_update
from device_runtime.bundle import tensor_role
from device_runtime.errors import ProtocolError, UpdateRejected
from device_runtime.stats import RoutingStats
from device_runtime.wire import FitConfig, SmashedData, SplitScalars, Update

if TYPE_CHECKING:  # split_top imports torch (~200 MiB): only a coordinator that runs a split round loads it
    from coordinator.split_top import SplitTop

T = TypeVar("T")


@dataclass(frozen=True)
class SplitMember:
    """A split assignment at round start: its ids, its bottom experts (per MoE layer below the cut)."""

    update_id: str
    device_id: str
    expert_ids: tuple[tuple[int, ...], ...]


class SplitRounds:
    """The running round's split group, if it has split devices.

    Args:
        checkpoint: the MoE checkpoint. trainable_mode, lora_rank: the global state's layout.
    """

    def __init__(self, checkpoint: str | Path, *, trainable_mode: str, lora_rank: int):
        self.checkpoint, self.trainable_mode, self.lora_rank = checkpoint, trainable_mode, lora_rank
        self.group: SplitGroup | None = None
        self._top: SplitTop | None = None  # kept across rounds: the checkpoint loads once per cut
        self._lock = asyncio.Lock()
        # every torch call of the top on one thread: spread over asyncio's pool, each thread's malloc arena kept its
        # own copy of the step's buffers (the coordinator's RSS grew by GBs a round)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="split-top")

    async def _run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(func, *args, **kwargs))

    async def start(
        self, round_id: int, config: FitConfig, params: Mapping[str, np.ndarray], members: Sequence[SplitMember]
    ) -> None:
        """Open round ``round_id``'s group (the top loaded, or reset to ``params``, in a worker thread); none without
        members."""
        self.group = None
        if not members:
            return
        assert config.split is not None
        top = self._top
        if top is not None and top.cut_layer == config.split.cut_layer:
            await self._run(top.reset, params, learning_rate=config.learning_rate, aux_loss_coef=config.aux_loss_coef)
        else:
            from coordinator.split_top import SplitTop

            self._top = None  # the old top's memory goes before the new one loads
            top = self._top = await self._run(
                SplitTop,
                self.checkpoint,
                params,
                cut_layer=config.split.cut_layer,
                learning_rate=config.learning_rate,
                aux_loss_coef=config.aux_loss_coef,
                trainable_mode=self.trainable_mode,
                lora_rank=self.lora_rank,
            )
        vocab = int(top.top.config.vocab_size)
        self.group = SplitGroup(
            round_id, config, top, [Member(m.update_id, m.device_id, m.expert_ids) for m in members], vocab
        )

    def close(self) -> None:
        """The round ended: its group goes (the top stays for the next round)."""
        self.group = None

    async def handle(self, update_id: str, msg: SmashedData | SplitScalars) -> Replies:
        """A member's step message; the replies to send.

        Raises:
            ProtocolError("unexpected"): no split group runs, or it refused the message (named).
        """
        async with self._lock:
            group = self.group
            if group is None or update_id not in group.members:
                raise ProtocolError("unexpected", f"{msg.TYPE}: no split step of assignment {update_id} runs")
            handler = group.on_smashed if isinstance(msg, SmashedData) else group.on_scalars
            try:
                return await self._run(handler, update_id, msg)
            except UpdateRejected as exc:
                raise ProtocolError("unexpected", f"{msg.TYPE}: {exc.reason}") from exc

    async def drop(self, update_id: str) -> Replies:
        """A member left (disconnected or failed); the replies its leaving releases."""
        async with self._lock:
            if self.group is None:
                return []
            return await self._run(self.group.drop, update_id)

    def update_of(
        self, member: str, msg: Update, norm_bound: float, global_params: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict]:
        """``(tensors, meta)`` of a split member's Update, as ``planning.check_update`` / ``update_meta`` give them
        for any other update: the group's bottom rows it held and the whole trained top, by global name.

        Raises:
            UpdateRejected: the group has not finished its steps, tensors came along, or the result fails the
                strategy's validation or the norm bound.
        """
        group = self.group
        if group is None or member not in group.members or not group.finished:
            raise UpdateRejected("split update before its group finished its steps")
        if msg.tensors or msg.zo is not None:
            raise UpdateRejected("a split device sends no tensors: the coordinator holds its steps")
        info, top = group.members[member], group.top
        tensors = {n: a[list(info.expert_ids[top.layer_of[n]])] for n, a in top.bottom.items()}
        tensors.update(top.tensors(bottom=False))
        cut = len(info.expert_ids)
        top_ids = [tuple(range(e)) for e in top.num_experts]
        assert info.top_routing is not None
        try:
            bottom = RoutingStats.from_dict(msg.routing)
        except ProtocolError as exc:
            raise UpdateRejected(f"routing statistics: {exc}") from exc
        if len(bottom.experts_per_layer) != cut or len(msg.trained_experts) != cut:
            raise UpdateRejected("routing statistics or trained experts do not describe the split bottom")
        routing = _joined(bottom, info.top_routing, info.expert_ids, top_ids)
        trained = [list(t) for t in msg.trained_experts] + [
            [ids[i] for i in local] for ids, local in zip(top_ids, info.top_routing.trained_experts())
        ]
        meta = {
            "expert_ids": [list(ids) for ids in info.expert_ids] + [list(ids) for ids in top_ids],
            "trained_experts": trained,
            "routing": routing,
            "metrics": {**msg.metrics, "split_top_loss": float(np.mean(group.losses[-len(group.members) :]))},
            "layers": {n: top.layer_of[n] for n in tensors},
            "roles": {n: tensor_role(n).value for n in tensors},
            "shape_key": f"split-cut{group.split.cut_layer}",
            "frozen_ids": [[] for _ in range(cut + len(top_ids))],
        }
        update = to_client_update(info.device_id, msg.num_examples, meta, tensors)
        validate_update(update, dict(global_params))
        for name, array in update.tensors.items():
            if float(np.linalg.norm(array)) > norm_bound:
                raise UpdateRejected(f"tensor {name}: L2 norm above the bound {norm_bound:g}")
        return dict(update.tensors), meta


def _joined(bottom: RoutingStats, top: RoutingStats, bottom_ids: Sequence, top_ids: Sequence) -> dict:
    """One routing-statistics dict over every MoE layer: the device's (below the cut) then the coordinator's."""
    low, high = bottom.to_dict(), top.to_dict()
    return {
        "num_tokens": low["num_tokens"],
        "experts_per_layer": low["experts_per_layer"] + high["experts_per_layer"],
        "expert_ids": [list(ids) for ids in bottom_ids] + [list(ids) for ids in top_ids],
        "layers": low["layers"] + high["layers"],
    }
