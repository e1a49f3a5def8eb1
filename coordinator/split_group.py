"""One round's split devices stepping together (HO-SFL, Chen et al., arXiv 2603.14773), free of I/O.

The group keeps its members in lockstep: step s collects every active member's SmashedData, runs the top once
for all of them (:class:`~coordinator.split_top.SplitTop`), answers each with its CutGradient, collects their
SplitScalars, averages them into ``vbar_s``, applies it to the coordinator's copy of the bottom and answers
every member with SplitStep. Each handler returns the ``(update_id, message)`` pairs to send.

A member that disconnects is dropped from the step it was awaited in (the others go on). When it comes back it
sends SmashedData for the step it stopped at; it gets the history it missed (``vbar`` of the later steps) in
one SplitStep, and joins the next step that opens. After the group's last step, :meth:`update_of` gives each
member's update as the strategy reads any other: the group's model (its rows of the bottom, the whole top)
weighted by its own examples, so the group counts by its examples in every strategy.

Everything a device sends is checked before use: its step, the shapes (batch <= batch_size, seq_len <=
seq_len, the hidden size or ACP-SL's kept channels), finite float16 values, a 0/1 mask, labels in the
vocabulary or -100, and P finite scalars (:class:`~coordinator.planning.UpdateRejected` otherwise: the step
goes on without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from device_runtime import acp
from device_runtime.data import IGNORE_INDEX
from device_runtime.errors import UpdateRejected
from device_runtime.hosfl import step_seeds
from device_runtime.stats import RoutingStats
from device_runtime.wire import CutGradient, FitConfig, Message, SmashedData, SplitScalars, SplitStep

if TYPE_CHECKING:  # split_top imports torch (~200 MiB): a coordinator loads it only when a split round runs
    from coordinator.split_top import Smashed, SplitTop

Replies = list[tuple[str, Message]]


@dataclass
class Member:
    """One split device of the group: its assignment, its bottom experts (global ids per MoE layer below the cut)
    and where it is."""

    update_id: str
    device_id: str
    expert_ids: tuple[tuple[int, ...], ...]
    step: int = 0
    active: bool = True
    late: bool = False  # came back during a step's scalar phase: answered when that step ends
    means: acp.ChannelMeans | None = None
    top_routing: RoutingStats | None = None
    bytes_up: int = 0


@dataclass
class _Step:
    smashed: dict[str, Smashed] = field(default_factory=dict)
    scalars: dict[str, tuple[float, ...]] = field(default_factory=dict)
    collecting_scalars: bool = False


class SplitGroup:
    """The split devices of round ``round_id`` (module docstring).

    Args:
        round_id: the round. config: the split devices' FitConfig (``config.split`` set, its ``learning_rate``
            the bottom's step size; ``local_steps`` >= 1 steps).
        top: the round's :class:`SplitTop`. members: the split assignments. vocab_size: for label checks.
    """

    def __init__(self, round_id: int, config: FitConfig, top: SplitTop, members: list[Member], vocab_size: int):
        assert config.split is not None and config.local_steps >= 1
        self.round_id, self.config, self.split, self.top = round_id, config, config.split, top
        self.members = {m.update_id: m for m in members}
        self.steps, self.vocab_size = config.local_steps, vocab_size
        self.lr = config.split.learning_rate
        self.hidden = int(top.top.config.hidden_size)
        self.history: list[tuple[float, ...]] = []
        self.current = _Step()
        self.losses: list[float] = []
        for member in members:
            member.means, member.top_routing = acp.ChannelMeans(self.hidden), top.top_routing()

    @property
    def step(self) -> int:
        """The step the group is at (== ``len(history)``)."""
        return len(self.history)

    @property
    def finished(self) -> bool:
        return self.step >= self.steps

    # -- messages ----------------------------------------------------------------------------------------

    def on_smashed(self, update_id: str, msg: SmashedData) -> Replies:
        """A member's smashed data. Raises UpdateRejected: not a member, a step ahead of the group, or bad data."""
        member = self._member(update_id, msg.round_id)
        if msg.step > self.step or self.finished:
            raise UpdateRejected(f"split step {msg.step}: the group is at step {self.step} of {self.steps}")
        smashed = self._checked(member, msg)  # also folds the values into the ACP-SL means, as the device did
        member.active = True
        member.bytes_up += sum(a.nbytes for a in msg.tensors.values())
        if msg.step < self.step:  # it fell behind: the history it missed, then it smashes again
            member.step = self.step
            return [(update_id, self._history_from(update_id, msg.step))]
        if self.current.collecting_scalars:  # this step's top already ran: wait for the next one
            member.late = True
            return []
        self.current.smashed[update_id] = smashed
        return self._maybe_run_top()

    def on_scalars(self, update_id: str, msg: SplitScalars) -> Replies:
        """A member's P scalars. Raises UpdateRejected: not in this step's top pass, or a bad count / value."""
        self._member(update_id, msg.round_id)
        if not self.current.collecting_scalars or msg.step != self.step or update_id not in self.current.smashed:
            raise UpdateRejected(f"split scalars for step {msg.step}: none expected from this device now")
        if len(msg.scalars) != self.split.perturbations or not all(np.isfinite(msg.scalars)):
            raise UpdateRejected(f"split step {msg.step}: need {self.split.perturbations} finite scalars")
        self.current.scalars[update_id] = tuple(float(v) for v in msg.scalars)
        return self._maybe_finish_step()

    def drop(self, update_id: str) -> Replies:
        """A member is gone (disconnected or failed): the step goes on without it."""
        member = self.members.get(update_id)
        if member is None or not member.active:
            return []
        member.active = False
        if self.current.collecting_scalars:
            self.current.smashed.pop(update_id, None)
            return self._maybe_finish_step()
        self.current.smashed.pop(update_id, None)
        return self._maybe_run_top()

    # -- the step ----------------------------------------------------------------------------------------

    def _awaited(self) -> list[str]:
        return [u for u, m in self.members.items() if m.active and not m.late]

    def _maybe_run_top(self) -> Replies:
        awaited = self._awaited()
        if not self.current.smashed or any(u not in self.current.smashed for u in awaited):
            return []
        order = list(self.current.smashed)
        result = self.top.step([self.current.smashed[u] for u in order])
        self.current.collecting_scalars = True
        replies: Replies = []
        for update_id, loss, gradient, routing in zip(order, result.losses, result.gradients, result.routing):
            member, (per_layer, tokens) = self.members[update_id], routing
            assert member.top_routing is not None
            member.top_routing.update(per_layer, tokens)
            self.losses.append(loss)
            replies.append(
                (
                    update_id,
                    CutGradient(
                        update_id=update_id,
                        round_id=self.round_id,
                        step=self.step,
                        loss=min(loss, 1e6),
                        tensors={"gradient": gradient.astype(np.float16)},
                    ),
                )
            )
        return replies

    def _maybe_finish_step(self) -> Replies:
        pending = [u for u in self.current.smashed if u not in self.current.scalars]
        if pending or not self.current.scalars:
            return [] if pending else self._reopen()
        vbar = tuple(float(v) for v in np.mean(list(self.current.scalars.values()), axis=0))
        seeds = step_seeds(self.config.seed, self.round_id, self.step, self.split.perturbations)
        rows: dict[int, set[int]] = {}
        for update_id in self.current.scalars:
            for layer, ids in enumerate(self.members[update_id].expert_ids):
                rows.setdefault(layer, set()).update(ids)
        self.top.apply_bottom(rows, seeds, vbar, self.lr)
        first = self.step
        self.history.append(vbar)
        notified = [u for u in self.members if u in self.current.scalars or self.members[u].late]
        for update_id in notified:
            member = self.members[update_id]
            member.step, member.late = self.step, False
        self.current = _Step()
        replies: Replies = [(u, self._history_from(u, first)) for u in notified]
        return replies

    def _reopen(self) -> Replies:
        """Every member of the step dropped before its scalars came: the step reopens for smashed data."""
        self.current = _Step()
        for member in self.members.values():
            member.late = False
        return []

    def _history_from(self, update_id: str, first: int) -> SplitStep:
        history = tuple(self.history[first:])
        return SplitStep(update_id=update_id, round_id=self.round_id, first_step=first, scalars=history)

    # -- checks ------------------------------------------------------------------------------------------

    def _member(self, update_id: str, round_id: int) -> Member:
        member = self.members.get(update_id)
        if member is None or round_id != self.round_id:
            raise UpdateRejected(f"no split assignment {update_id} in round {round_id}")
        return member

    def _checked(self, member: Member, msg: SmashedData) -> Smashed:
        """The smashed data as the top takes it (dropped channels filled from the running means).

        Raises:
            UpdateRejected: naming the first problem.
        """
        tensors = msg.tensors
        if set(tensors) != {"smashed", "attention_mask", "labels"}:
            raise UpdateRejected(f"smashed data needs tensors smashed, attention_mask, labels; got {sorted(tensors)}")
        values, mask, labels = tensors["smashed"], tensors["attention_mask"], tensors["labels"]
        channels = np.arange(self.hidden) if msg.channels is None else np.asarray(msg.channels, dtype=np.int64)
        if channels.size and (np.any(np.diff(channels) <= 0) or channels[-1] >= self.hidden):
            raise UpdateRejected(f"kept channels must ascend within [0, {self.hidden})")
        batch, seq = mask.shape if mask.ndim == 2 else (0, 0)
        if (
            values.dtype != np.float16
            or values.shape != (batch, seq, channels.size)
            or labels.shape != mask.shape
            or mask.dtype != np.int32
            or labels.dtype != np.int32
            or not 1 <= batch <= self.config.batch_size
            or not 1 <= seq <= self.config.seq_len
        ):
            raise UpdateRejected(
                f"smashed data {values.dtype}{values.shape}, mask {mask.shape}, labels {labels.shape}: need float16 "
                f"(batch <= {self.config.batch_size}, seq_len <= {self.config.seq_len}, {channels.size} channels)"
                " and int32 masks and labels of (batch, seq_len)"
            )
        if not np.all(np.isfinite(values)) or not np.isin(mask, (0, 1)).all():
            raise UpdateRejected("smashed data must be finite, the attention mask 0/1")
        if np.any((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.vocab_size))):
            raise UpdateRejected(f"labels must be -100 or token ids below {self.vocab_size}")
        assert member.means is not None
        member.means.update(values, channels, mask)
        full = member.means.fill(values.astype(np.float32), channels)
        from coordinator.split_top import Smashed  # loaded with the round's SplitTop already

        return Smashed(full, mask.astype(np.int64), labels.astype(np.int64))
