"""A device's secure rounds (``device_runtime.secagg``) as its client runs them: one ``DeviceSecAgg`` per
assignment, the answer to each coordinator step, and the masked result kept in memory until acknowledged (the
secrets never touch the disk: a device that restarts mid-round is one of the round's dropouts)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np

from device_runtime.bundle import Manifest
from device_runtime.errors import ProtocolError
from device_runtime.secagg import DeviceSecAgg, row_weighting, slots_of
from device_runtime.wire import (
    Message,
    SecAggInbox,
    SecAggMasked,
    SecAggRoster,
    SecAggStart,
    SecAggUnmask,
    Update,
)


class SecureRounds:
    """The secure states of one device, by update id (call from the event loop's thread)."""

    def __init__(self, device_id: str):
        self.device_id = device_id
        self._states: dict[str, DeviceSecAgg] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self.unacked: dict[str, SecAggMasked] = {}  # masked results sent and not yet acknowledged

    def expects(self, update_id: str) -> bool:
        """Whether ``update_id``'s result must go out masked (its SecAggStart came before its Assignment)."""
        return update_id in self._states

    def answer(self, msg: Message) -> Message | None:
        """The reply to a coordinator step (keys, shares, reveal; None for an inbox). Runs the cryptography:
        call it in a worker thread, then :meth:`arrived` on the loop.

        Raises:
            ProtocolError: the step does not fit this device's state (sent back as an Error).
        """
        update_id = getattr(msg, "update_id", "")
        if isinstance(msg, SecAggStart):
            state = self._states.get(update_id)
            if state is None:
                state = self._states[update_id] = DeviceSecAgg(msg, self.device_id)
            elif state.start != msg:
                raise ProtocolError("unexpected", f"{update_id}: a second, different secure start")
            return state.keys()
        state = self._states.get(update_id)
        if state is None:
            raise ProtocolError("unexpected", f"{update_id}: no secure round of this device (restarted?)")
        if isinstance(msg, SecAggRoster):
            return state.on_roster(msg)
        if isinstance(msg, SecAggInbox):
            state.on_inbox(msg)
            return None
        if isinstance(msg, SecAggUnmask):
            return state.on_unmask(msg)
        raise ProtocolError("unexpected", f"{msg.TYPE} is not a coordinator's secure step")

    def arrived(self, msg: Message) -> None:
        """After :meth:`answer` on the loop: wake the masking of an inbox's assignment. A SecAggStart of a new
        assignment ends every older secure round of this device (the coordinator runs one round at a time and
        closed the last before it started this one): their states, waiting maskings (which end) and unacknowledged
        results are forgotten, so a failed round holds no model-sized arrays."""
        update_id = getattr(msg, "update_id", "")
        if isinstance(msg, SecAggInbox):
            self._event(update_id).set()
        if isinstance(msg, SecAggStart):
            for old in [u for u in self._states if u != update_id]:
                del self._states[old]
                self._event(old).set()
                del self._ready[old]
                self.unacked.pop(old, None)

    def _event(self, update_id: str) -> asyncio.Event:
        return self._ready.setdefault(update_id, asyncio.Event())

    async def masked(
        self,
        update: Update,
        manifest: Manifest,
        expert_ids: tuple[tuple[int, ...], ...],
        base: Mapping[str, np.ndarray],
    ) -> SecAggMasked | None:
        """``update`` masked (``DeviceSecAgg.mask`` in a worker thread) once its inbox arrived: None if its state
        was forgotten meanwhile (a newer round started). The message is kept in :attr:`unacked` until :meth:`acked`.

        Args:
            base: the assignment's trainable tensors as received (float32), the rows the deltas are taken from.
        """
        update_id = update.update_id
        await self._event(update_id).wait()
        state = self._states.get(update_id)
        if state is None:
            return None
        slots = slots_of(manifest, expert_ids)
        weight_of = row_weighting(state.start, update.num_examples, update.routing, expert_ids, update.trained_experts)
        data = await asyncio.to_thread(state.mask, slots, base, update.tensors, weight_of)
        msg = SecAggMasked(
            round_id=update.round_id,
            update_id=update_id,
            metrics=update.metrics,
            routing=update.routing,
            trained_experts=update.trained_experts,
            evaluation=update.evaluation,
            data=data,
        )
        self.unacked[update_id] = msg
        return msg

    def acked(self, update_id: str) -> None:
        self.unacked.pop(update_id, None)
