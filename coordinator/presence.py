"""The registry calls that keep track of the logged-in devices, batched: every :data:`SWEEP_S` one write of the
``last_seen`` stamps due and one query for the revoked devices, whose sessions end, for all connections at once.

Each was a registry call per Heartbeat on the event loop before: with 10,000 idle devices they were the largest
items of the coordinator's profile (``bench/bench_connections.py --py-spy``: ``get_device`` 23% and
``touch_device`` 9% of its busy samples). A connection marks its device's ``last_seen`` due
(``coordinator.connection``: at most every ``LAST_SEEN_EVERY_S``) with :meth:`Presence.seen`;
:meth:`Presence.sweep` writes them and calls ``Session.revoked`` of each connected device the registry says was
revoked (``fedmoe-coord devices revoke``, another process). The revoked ids of the last sweep are also what the
round engine's selection leaves out (``Coordinator._available``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Protocol

from coordinator.registry import Registry

log = logging.getLogger("fedmoe.coord")
# Seconds between two sweeps: a revoked device's session ends at most this long after the revocation (plus one
# sweep's time). A sweep costs ~6 ms with 10,000 devices connected (the revoked query; bench_connections.py).
SWEEP_S = 1.0


class Revocable(Protocol):
    """What a sweep needs of a connected device's session (``coordinator.service.Session``)."""

    def revoked(self) -> None:
        """End the session: the registry says the device was revoked."""


class Presence:
    """Batched ``last_seen`` writes and revocation checks of the connected devices (see the module docstring).

    Args:
        registry: the registry.
        sessions: the connected devices' sessions by device id (the coordinator's, read at each sweep).
    """

    def __init__(self, registry: Registry, sessions: Mapping[str, Revocable]):
        self.registry, self.sessions = registry, sessions
        self.revoked: set[str] = set()  # the revoked device ids as of the last sweep (none before it)
        self._due: set[str] = set()  # devices whose ``last_seen`` the next sweep writes

    def seen(self, device_id: str) -> None:
        """Write the device's ``last_seen`` with the next sweep."""
        self._due.add(device_id)

    def sweep(self) -> None:
        """Write the due ``last_seen`` stamps (one registry call), ask for the revoked devices (one query) and
        end the sessions of those connected. Raises what the registry raises (the due stamps stay due then)."""
        self.registry.touch_devices(self._due)
        self._due.clear()
        self.revoked = self.registry.revoked_device_ids()
        for device_id in self.revoked & self.sessions.keys():
            self.sessions[device_id].revoked()

    async def run(self, stop: asyncio.Event) -> None:
        """:meth:`sweep` every :data:`SWEEP_S` seconds until ``stop`` is set; a failed sweep (the registry is
        down, say) is logged and tried again at the next."""
        while not stop.is_set():
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - a registry error must not end the sweeps
                log.exception("the registry sweep (last_seen, revocations) failed; trying again in %g s", SWEEP_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SWEEP_S)
