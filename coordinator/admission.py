"""Admission control for the coordinator's websocket server: who may hold a connection, and how much.

Limits (see ``CoordinatorConfig``; measured failures of the unlimited server in issue 10, defect 8):

* **Connections in total**: at most ``max_connections``, and never more than the file-descriptor limit
  minus :data:`FD_RESERVE` (left for the registry, the tensor store and bundle files). Beyond it a new TCP
  connection is aborted as soon as it is accepted, so the process never reaches ``EMFILE``: there asyncio's
  accept loop logs one traceback per queued connection (measured: 91,509 tracebacks and 33 MB of log in
  10 s with 200 idle sockets under a 128-descriptor limit) and real devices time out.
* **Unauthenticated connections per address**: at most ``max_unauthenticated_per_address``. An
  authenticated connection no longer counts against its address (many devices may share a NAT).
* **Sessions per device**: one. A device that authenticates again replaces its older connection (a
  reconnecting device whose previous TCP connection is not yet known dead must not be locked out).
* **Messages per device**: a token bucket of :data:`MESSAGE_BURST` messages refilled at
  :data:`MESSAGES_PER_S`, one per device across its connections (reconnecting does not refill it); an
  authenticated device beyond it is disconnected.

The login deadline, the small pre-login frame limit and websockets' ``max_queue`` are applied by
``coordinator.server``, which also uses :class:`AdmittedConnection` for every connection.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection

log = logging.getLogger("fedmoe.coord")
FD_RESERVE = 64  # descriptors kept free for the registry, tensor files and bundle transfers
MESSAGE_BURST = 200  # messages a device may send at once
MESSAGES_PER_S = 20.0  # sustained messages per second per device (a device sends one Heartbeat per 20 s)
REFUSAL_LOG_EVERY_S = 10.0  # at most one log line per this many seconds about refused connections


def descriptor_limit() -> int:
    """This process's soft limit on open file descriptors (``RLIMIT_NOFILE``)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft file-descriptor limit to the hard limit (children inherit it); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's "socket.accept() out of system resource" at most once per :data:`REFUSAL_LOG_EVERY_S`
    (with the count), instead of one traceback per queued connection; other errors go to the old handler."""
    previous = loop.get_exception_handler()
    last, count = -REFUSAL_LOG_EVERY_S, 0

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        nonlocal last, count
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            (previous or asyncio.AbstractEventLoop.default_exception_handler)(loop, context)
            return
        count += 1
        if time.monotonic() - last >= REFUSAL_LOG_EVERY_S:
            log.error("accept() failed %d time(s): %s; raise the descriptor limit (ulimit -n) or lower "
                      "max_connections", count, context.get("exception"))
            last, count = time.monotonic(), 0

    loop.set_exception_handler(handler)


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second (``clock`` in seconds); :meth:`take` spends one."""

    def __init__(self, burst: int = MESSAGE_BURST, rate: float = MESSAGES_PER_S,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.rate, self._clock = burst, rate, clock
        self._tokens, self._at = float(burst), clock()

    def take(self) -> bool:
        """Spend a token; False (nothing spent) when the bucket is empty."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class Admission:
    """The live connections of one server, counted against the limits in the module docstring.

    Args:
        max_connections: connections in total (capped by the descriptor limit minus :data:`FD_RESERVE`).
        max_unauthenticated_per_address: connections per remote address that have not authenticated.
    """

    def __init__(self, max_connections: int, max_unauthenticated_per_address: int):
        self.max_connections = max(1, min(max_connections, descriptor_limit() - FD_RESERVE))
        self.max_per_address = max_unauthenticated_per_address
        self.total = 0
        self.unauthenticated: Counter[str] = Counter()
        self.devices: dict[str, AdmittedConnection] = {}
        self.buckets: dict[str, TokenBucket] = {}  # per authenticated device id (bounded by enrolled devices)
        self.refused = 0  # connections refused since the last log line about them
        self._refusal_logged = 0.0

    def admit(self, address: str) -> bool:
        """Count a new TCP connection from ``address``; False (nothing counted) if a limit is reached."""
        if self.total >= self.max_connections or self.unauthenticated[address] >= self.max_per_address:
            self._refusal(address)
            return False
        self.total += 1
        self.unauthenticated[address] += 1
        return True

    def release(self, connection: AdmittedConnection) -> None:
        """The connection closed."""
        self.total -= 1
        if connection.device_id is None:
            self._uncount(connection.address)
        elif self.devices.get(connection.device_id) is connection:
            del self.devices[connection.device_id]

    def authenticated(self, connection: AdmittedConnection, device_id: str) -> AdmittedConnection | None:
        """``connection`` logged in as ``device_id``; returns the device's older connection (to close), if any."""
        self._uncount(connection.address)
        connection.device_id = device_id
        older = self.devices.get(device_id)
        self.devices[device_id] = connection
        return older

    def take(self, device_id: str) -> bool:
        """Spend one of ``device_id``'s message tokens; False when its bucket is empty (disconnect it)."""
        return self.buckets.setdefault(device_id, TokenBucket()).take()

    def _uncount(self, address: str) -> None:
        self.unauthenticated[address] -= 1
        if self.unauthenticated[address] <= 0:
            del self.unauthenticated[address]

    def _refusal(self, address: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_EVERY_S:
            log.warning("refused %d connection(s) (last from %s): %d of %d connections open, %d unauthenticated "
                        "from that address (limit %d)", self.refused, address, self.total, self.max_connections,
                        self.unauthenticated[address], self.max_per_address)
            self.refused, self._refusal_logged = 0, now


class AdmittedConnection(ServerConnection):
    """A websockets server connection counted by an :class:`Admission` from TCP accept to close.

    Over a limit, the transport is aborted at once (before any byte is read). Build with
    ``functools.partial(AdmittedConnection, admission=...)`` as ``serve(create_connection=...)``.
    """

    def __init__(self, *args, admission: Admission, **kwargs):
        super().__init__(*args, **kwargs)
        self.admission = admission
        self.address, self.device_id, self.admitted = "", None, False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "?"
        self.admitted = self.admission.admit(self.address)
        if not self.admitted:
            transport.abort()

    def connection_lost(self, exc) -> None:
        if self.admitted:
            self.admitted = False
            self.admission.release(self)
        super().connection_lost(exc)
