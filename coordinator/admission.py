"""Admission control for the coordinator's websocket server: who may hold a connection, and how much.

Limits (see ``CoordinatorConfig``; measured failures of the unlimited server in issue 10, defect 8):

* **Connections in total**: at most ``max_connections``, and never more than the file-descriptor limit
  minus :data:`FD_RESERVE` (left for the registry, the tensor store and bundle files). Beyond it a new TCP
  connection is aborted as soon as it is accepted, so the process never reaches ``EMFILE``: there asyncio's
  accept loop logs one traceback per queued connection (measured: 91,509 tracebacks and 33 MB of log in
  10 s with 200 idle sockets under a 128-descriptor limit) and real devices time out.
  Connections are counted from TCP accept, before any TLS state exists (``coordinator.accept``; issue 19:
  counted after the handshake, 5,000 connections that never sent a ClientHello took 1.5 GiB).
* **Connections without a client certificate**: once its TLS handshake is done, a connection whose peer showed
  no client certificate of this CA may not use the last ``certified_share`` of ``max_connections`` (with
  mutual TLS): idle anonymous TLS connections cannot lock enrolled devices out.
* **Unauthenticated connections per address**: at most ``max_unauthenticated_per_address``. An
  authenticated connection no longer counts against its address (many devices may share a NAT).
* **Failed enrollments per address**: :data:`ENROLL_FAILURE_BURST`, then one per :data:`ENROLL_FAILURE_EVERY_S`
  (enrollment needs no client certificate; successful enrollments are bounded by the tokens the operator made).
* **Sessions per device**: one. A device that authenticates again replaces its older connection (a
  reconnecting device whose previous TCP connection is not yet known dead must not be locked out).
* **Messages per device**: a token bucket of :data:`MESSAGE_BURST` messages refilled at
  :data:`MESSAGES_PER_S`, one per device across its connections (reconnecting does not refill it); an
  authenticated device beyond it is disconnected.

The TLS handshake deadline is applied by ``coordinator.accept``; the login deadline, the small pre-login frame
limit and websockets' ``max_queue`` by ``coordinator.server``, which uses :class:`AdmittedConnection` for
every connection; the enrollment and message rate checks by ``coordinator.connection`` (its ``Limits`` port).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection

log = logging.getLogger("fedmoe.coord")
FD_RESERVE = 64  # descriptors kept free for the registry, tensor files and bundle transfers
MESSAGE_BURST = 200  # messages a device may send at once
MESSAGES_PER_S = 20.0  # sustained messages per second per device (a device sends one Heartbeat per 20 s)
REFUSAL_LOG_EVERY_S = 10.0  # at most one log line per this many seconds about refused connections
ENROLL_FAILURE_BURST = 10  # failed enrollments an address may make at once
ENROLL_FAILURE_EVERY_S = 6.0  # then one more per this many seconds
ENROLL_ADDRESSES = 4096  # addresses whose failed enrollments are remembered


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
            previous(loop, context) if previous else loop.default_exception_handler(context)
            return
        count += 1
        if time.monotonic() - last >= REFUSAL_LOG_EVERY_S:
            log.error(
                "accept() failed %d time(s): %s; raise the descriptor limit (ulimit -n) or lower max_connections",
                count,
                context.get("exception"),
            )
            last, count = time.monotonic(), 0

    loop.set_exception_handler(handler)


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second (``clock`` in seconds); :meth:`take` spends one."""

    def __init__(
        self, burst: int = MESSAGE_BURST, rate: float = MESSAGES_PER_S, clock: Callable[[], float] = time.monotonic
    ):
        self.burst, self.rate, self._clock = burst, rate, clock
        self._tokens, self._at = float(burst), clock()

    def take(self) -> bool:
        """Spend a token; False (nothing spent) when the bucket is empty."""
        if not self.peek():
            return False
        self._tokens -= 1
        return True

    def peek(self) -> bool:
        """Whether a token is left (none is spent)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens >= 1


@dataclass
class Place:
    """One counted connection: its remote ``address``, whether its TLS peer showed a client certificate of
    this CA (``certified``; None until the handshake is done) and the device it logged in as."""

    address: str
    certified: bool | None = None
    device_id: str | None = None


class Admission:
    """The live connections of one server, counted from TCP accept against the limits in the module docstring.

    Args:
        max_connections: connections in total (capped by the descriptor limit minus :data:`FD_RESERVE`).
        max_unauthenticated_per_address: connections per remote address that have not authenticated.
        certified_share: fraction of ``max_connections`` that connections without a client certificate of
            this CA may not use once their TLS handshake is done (0 without mutual TLS).
    """

    def __init__(self, max_connections: int, max_unauthenticated_per_address: int, certified_share: float = 0.0):
        self.max_connections = max(1, min(max_connections, descriptor_limit() - FD_RESERVE))
        self.max_uncertified = max(1, self.max_connections - int(self.max_connections * certified_share))
        self.max_per_address = max_unauthenticated_per_address
        self.total = self.uncertified = 0
        self.unauthenticated: Counter[str] = Counter()
        self.devices: dict[str, AdmittedConnection] = {}
        self.buckets: dict[str, TokenBucket] = {}  # per authenticated device id (bounded by enrolled devices)
        self.enroll_failures: OrderedDict[str, TokenBucket] = OrderedDict()  # per address, least recent first
        self.refused = 0  # connections refused since the last log line about them
        self._refusal_logged = 0.0

    def admit(self, address: str, make_room: Callable[[], bool] = lambda: False) -> Place | None:
        """Count a new TCP connection from ``address`` (at accept, before any TLS); None if a limit is reached.
        When only the total is, ``make_room()`` may first close another connection (True: one was released)."""
        if self.unauthenticated[address] >= self.max_per_address or (
            self.total >= self.max_connections and not make_room()
        ):
            self._refusal(address, "at accept")
            return None
        self.total += 1
        self.unauthenticated[address] += 1
        return Place(address)

    def settle(self, place: Place, certified: bool) -> bool:
        """``place``'s TLS handshake is done (or there is no TLS); False (``place`` released) if it showed no
        client certificate of this CA and the connections without one already fill their share."""
        if not certified and self.uncertified >= self.max_uncertified:
            self.release(place)
            self._refusal(place.address, "without a client certificate")
            return False
        place.certified = certified
        self.uncertified += not certified
        return True

    def release(self, place: Place) -> None:
        """The connection at ``place`` closed (call once)."""
        self.total -= 1
        self.uncertified -= place.certified is False
        if place.device_id is None:
            self._uncount(place.address)

    def authenticated(self, connection: AdmittedConnection, device_id: str) -> AdmittedConnection | None:
        """``connection`` logged in as ``device_id``; returns the device's older connection (to close), if any."""
        self._uncount(connection.place.address)
        connection.place.device_id = device_id
        older = self.devices.get(device_id)
        self.devices[device_id] = connection
        return older

    def closed(self, connection: AdmittedConnection) -> None:
        """``connection`` (admitted, handed to websockets) closed."""
        self.release(connection.place)
        if self.devices.get(connection.place.device_id) is connection:
            del self.devices[connection.place.device_id]

    def take(self, device_id: str) -> bool:
        """Spend one of ``device_id``'s message tokens; False when its bucket is empty (disconnect it)."""
        return self.buckets.setdefault(device_id, TokenBucket()).take()

    def may_enroll(self, address: str) -> bool:
        """Whether ``address`` may try an enrollment: False after :data:`ENROLL_FAILURE_BURST` failed ones until
        its bucket refills (one per :data:`ENROLL_FAILURE_EVERY_S` seconds)."""
        bucket = self.enroll_failures.get(address)
        return bucket is None or bucket.peek()

    def enroll_failed(self, address: str) -> None:
        """An enrollment from ``address`` was refused (bad, used or expired token): spend one of its tries.
        At most :data:`ENROLL_ADDRESSES` addresses are remembered (the least recent is forgotten)."""
        bucket = self.enroll_failures.pop(address, None) or TokenBucket(
            ENROLL_FAILURE_BURST, 1 / ENROLL_FAILURE_EVERY_S
        )
        bucket.take()
        self.enroll_failures[address] = bucket
        while len(self.enroll_failures) > ENROLL_ADDRESSES:
            self.enroll_failures.popitem(last=False)

    def _uncount(self, address: str) -> None:
        self.unauthenticated[address] -= 1
        if self.unauthenticated[address] <= 0:
            del self.unauthenticated[address]

    def _refusal(self, address: str, where: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_EVERY_S:
            log.warning(
                "refused %d connection(s) (last from %s, %s): %d of %d connections open (%d without a "
                "client certificate, limit %d), %d unauthenticated from that address (limit %d)",
                self.refused,
                address,
                where,
                self.total,
                self.max_connections,
                self.uncertified,
                self.max_uncertified,
                self.unauthenticated[address],
                self.max_per_address,
            )
            self.refused, self._refusal_logged = 0, now


class AdmittedConnection(ServerConnection):
    """A websockets server connection at an admitted :class:`Place`, released from its :class:`Admission`
    when it closes. ``coordinator.accept`` builds it once the connection is admitted and its TLS handshake
    done, and sets ``place``."""

    def __init__(self, *args, admission: Admission, place: Place, **kwargs):
        super().__init__(*args, **kwargs)
        self.admission, self.place = admission, place

    def connection_lost(self, exc) -> None:
        self.admission.closed(self)
        super().connection_lost(exc)
