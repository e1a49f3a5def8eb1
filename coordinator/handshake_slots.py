"""At most :data:`MAX_HANDSHAKES` TLS handshakes at once on the coordinator (issue 19); the others wait their turn,
first come first served, holding no TLS state.

Each handshake asyncio runs holds ~256 KiB of SSL buffers, which glibc keeps once they are freed, so their number
is bounded rather than their release relied on. Closing the oldest handshake for every newcomer beyond the bound
was measured to thrash: 1,000 devices connecting at once over TLS, 744 reset. Waiting in turn lets a herd through
at the pace the server handshakes; a handshake that has run for :data:`HANDSHAKE_GRACE_S` (an honest one takes
milliseconds, a loaded server's under a second) gives its slot to the next waiting connection and is closed, so
peers that start a handshake and stall cannot hold the slots.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

MAX_HANDSHAKES = 256
HANDSHAKE_GRACE_S = 2.0


class Handshaker(Protocol):
    transport: asyncio.Transport

    def launch(self) -> None:
        """Start the TLS handshake (it now holds a slot)."""


class HandshakeSlots:
    """The running and the waiting handshakes of one server (on its event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.running: dict[Handshaker, float] = {}  # -> loop time it started; oldest first
        self.waiting: dict[Handshaker, None] = {}  # first come first
        self._timer: asyncio.TimerHandle | None = None

    def request(self, handshaker: Handshaker) -> None:
        """``handshaker`` wants to handshake: launched now or in its turn."""
        self.waiting[handshaker] = None
        self.pump()

    def done(self, handshaker: Handshaker) -> None:
        """``handshaker`` finished, failed or closed (idempotent): its slot, if any, goes to the next one."""
        self.waiting.pop(handshaker, None)
        if self.running.pop(handshaker, None) is not None:
            self.pump()

    def pump(self) -> None:
        """Launch waiting handshakes while a slot is free or the oldest running one is past its grace."""
        while self.waiting:
            if len(self.running) >= MAX_HANDSHAKES:
                oldest, started = next(iter(self.running.items()))
                if self.loop.time() - started < HANDSHAKE_GRACE_S:
                    self._pump_at(started + HANDSHAKE_GRACE_S)
                    return
                del self.running[oldest]
                oldest.transport.abort()  # its handshake fails and releases it
            nxt = next(iter(self.waiting))
            del self.waiting[nxt]
            self.running[nxt] = self.loop.time()
            nxt.launch()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _pump_at(self, when: float) -> None:
        if self._timer is None or self._timer.when() > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._woken)

    def _woken(self) -> None:
        self._timer = None
        self.pump()
