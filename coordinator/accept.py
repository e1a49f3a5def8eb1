"""Admission at TCP accept (issue 19): a connection is counted and capped (``coordinator.admission``) before any
TLS state exists, costs no TLS buffers until its first bytes arrive, and must finish its TLS handshake within
``handshake_timeout_s`` of accept; only then does websockets see it.

asyncio's ``create_server(ssl=...)`` gives every accepted socket ~256 KiB of SSL buffers at once and calls the
protocol only after the handshake (measured: 5,000 connections that never sent a ClientHello, 92 -> 1,598 MiB,
not returned). So websockets' ``serve`` runs without ``ssl``, and its ``create_connection`` hook returns a
:class:`Gate` per accepted socket. The gate pauses reading and waits in a shared :class:`FirstBytes` selector
(a silent connection costs a socket and a few small objects), then runs ``loop.start_tls`` with itself as the
application protocol, settles the connection's class (client certificate or not) with the admission, builds the
websockets connection and hands it the TLS transport. When the total cap is full, a new connection closes the
oldest one that has not sent a byte yet (one silent for :data:`GRACE_S`, or any if the newcomer's first bytes
came with it), so connections that never start a handshake cannot lock devices out; a peer that closes without
sending a byte gets no TLS state at all; handshakes take turns (``coordinator.handshake_slots``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import selectors
import socket
import ssl
from collections.abc import Callable, Iterable

from coordinator.admission import Admission, AdmittedConnection, Place
from coordinator.handshake_slots import HandshakeSlots
from coordinator.lean_tls import lean_reads

log = logging.getLogger("fedmoe.coord")
MAX_EARLY_BYTES = 64 << 10  # application bytes a gate holds between the handshake and the hand-over
# A silent connection is closed to make room for a newcomer only once it has been silent this long (seconds)
# since its accept: an honest client sends its ClientHello right behind its TCP handshake, milliseconds later,
# and a burst of accepts must not close it before that. An attacker then needs max_connections / GRACE_S new
# connections a second to keep every silent one too young to close.
GRACE_S = 0.25


class FirstBytes:
    """Calls back once a socket is readable (first bytes arrived, or the peer closed) without reading it: one
    ``selectors`` instance whose own descriptor the event loop watches (a transport owns the socket's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._selector = loop, selectors.DefaultSelector()
        loop.add_reader(self._selector.fileno(), self._ready)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once ``fd`` is readable; :meth:`forget` it before closing ``fd``."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def forget(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def close(self) -> None:
        self._loop.remove_reader(self._selector.fileno())
        self._selector.close()

    def _ready(self) -> None:
        for key, _ in self._selector.select(0):
            self._selector.unregister(key.fd)
            key.data()


def peek(fd: int) -> bytes | None:
    """The first byte the peer of non-blocking socket ``fd`` sent, left unread: None if nothing came yet, ``b""``
    if it closed or reset the connection."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError:
        return b""
    finally:
        sock.detach()


def deepen_backlog(listeners: Iterable[socket.socket], backlog: int) -> None:
    """``listen(backlog)`` again on each of ``listeners`` (Linux caps it at ``net.core.somaxconn``). asyncio uses
    its ``backlog`` argument both for ``listen()`` and as the connections it accepts in one loop iteration: a
    deep kernel queue with a small batch keeps a flood of accepts from stalling the loop (measured: 4096 per
    iteration, /healthz 988 ms under 10,000 connections)."""
    for listener in listeners:
        sock = socket.socket(fileno=listener.fileno())
        try:
            sock.listen(backlog)
        finally:
            sock.detach()


class Gatekeeper:
    """What every :class:`Gate` of one server shares.

    Args:
        admission: the server's connection counts.
        context: the server's TLS context; None serves plain TCP (``insecure``).
        handshake_timeout_s: seconds from TCP accept to a completed TLS handshake.
        first_bytes: the selector gates wait in (on the running loop).
    """

    def __init__(
        self, admission: Admission, context: ssl.SSLContext | None, handshake_timeout_s: float, first_bytes: FirstBytes
    ):
        self.admission, self.context, self.timeout_s, self.first_bytes = (
            admission,
            context,
            handshake_timeout_s,
            first_bytes,
        )
        self.pending: set[Gate] = set()  # gates not yet handed over or released
        self.silent: dict[Gate, None] = {}  # gates waiting for their first bytes, oldest first
        self.slots = HandshakeSlots(asyncio.get_running_loop())

    def make_room(self, spoke: bool) -> bool:
        """Close the oldest connection that has sent nothing, for :data:`GRACE_S` unless the newcomer ``spoke``
        already (its first bytes came with it: it is no silent connection); False if there is none."""
        oldest = next(iter(self.silent), None)
        if oldest is None or (not spoke and asyncio.get_running_loop().time() - oldest.accepted < GRACE_S):
            return False
        oldest.transport.abort()
        oldest.release()
        return True

    def close(self) -> None:
        """Abort the connections still in their handshake (the server stops)."""
        for gate in list(self.pending):
            gate.transport.abort()
            gate.release()
        self.slots.close()
        self.first_bytes.close()

    def create_connection(self, *args, **kwargs) -> Gate:
        """websockets' ``serve(create_connection=...)`` hook: ``args``/``kwargs`` go to
        :class:`AdmittedConnection` once the connection is admitted and its TLS handshake done."""
        return Gate(self, lambda place: AdmittedConnection(*args, admission=self.admission, place=place, **kwargs))


class Gate(asyncio.Protocol):
    """The asyncio protocol of one accepted TCP connection until websockets takes over (module docstring)."""

    def __init__(self, keeper: Gatekeeper, build: Callable[[Place], AdmittedConnection]):
        self.keeper, self.build = keeper, build
        self.place: Place | None = None  # counted in the admission until released or handed over
        self.transport: asyncio.Transport | None = None
        self.fd, self.deadline, self.tls_task = -1, None, None
        self.accepted = 0.0  # loop time of the TCP accept
        self.early: list[bytes] = []  # application data read by the TLS layer before the hand-over
        self.early_eof = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        peer, fd = transport.get_extra_info("peername"), transport.get_extra_info("socket").fileno()
        first = None if self.keeper.context is None else peek(fd)  # nothing is read before this
        self.place = self.keeper.admission.admit(
            str(peer[0]) if peer else "?", functools.partial(self.keeper.make_room, bool(first))
        )
        if self.place is None:
            transport.abort()
            return
        self.transport = transport
        self.keeper.pending.add(self)
        if self.keeper.context is None:
            self.hand_over(transport, certified=False)
            return
        loop = asyncio.get_running_loop()
        self.accepted, self.deadline = loop.time(), loop.call_later(self.keeper.timeout_s, self.expire)
        transport.pause_reading()
        self.fd = fd
        if first is None:
            self.keeper.first_bytes.watch(fd, self.start_tls)
            self.keeper.silent[self] = None
        else:
            self.start_tls()

    def start_tls(self) -> None:
        """The socket is readable: its first bytes arrived, or its peer closed it (no TLS state then)."""
        fd, self.fd = self.fd, -1
        self.keeper.silent.pop(self, None)
        if peek(fd) == b"":
            self.transport.abort()
            self.release()
            return
        self.keeper.slots.request(self)

    def launch(self) -> None:
        """Start the TLS handshake (``coordinator.handshake_slots`` gave it a slot)."""
        self.tls_task = asyncio.get_running_loop().create_task(self.handshake())

    async def handshake(self) -> None:
        loop = asyncio.get_running_loop()
        if self.transport.is_closing() or peek(self.transport.get_extra_info("socket").fileno()) == b"":
            self.release()  # closed before its turn came (start_tls would then wait forever), or by its peer
            return
        try:
            tls = await loop.start_tls(
                self.transport,
                self,
                self.keeper.context,
                server_side=True,
                ssl_handshake_timeout=max(0.1, self.deadline.when() - loop.time()),
            )
        except OSError as exc:
            log.debug("TLS handshake from %s failed: %s", self.place and self.place.address, exc)
            tls = None
        if tls is None:  # failed, late, or the peer left right after it; the socket is closed
            self.release()
            return
        self.hand_over(tls, certified=bool(tls.get_extra_info("peercert")))

    def hand_over(self, transport: asyncio.Transport, certified: bool) -> None:
        """Settle the connection's class and give ``transport`` to a new websockets connection."""
        if self.deadline is not None:
            self.deadline.cancel()
        self.keeper.pending.discard(self)
        self.keeper.slots.done(self)
        place, self.place = self.place, None
        if place is None or transport.is_closing():
            if place is not None:
                self.keeper.admission.release(place)
            return
        if not self.keeper.admission.settle(place, certified):
            transport.abort()
            return
        lean_reads(transport)  # 4 KiB of TLS read buffer while idle instead of 256 KiB (coordinator.lean_tls)
        connection = self.build(place)
        transport.set_protocol(connection)
        connection.connection_made(transport)
        if self.early:
            connection.data_received(b"".join(self.early))
        if self.early_eof:
            connection.eof_received()

    def expire(self) -> None:
        """The handshake deadline passed: a socket still silent, or still waiting for a handshake slot, is closed
        (a handshake in progress is closed by ``start_tls``'s own timeout)."""
        if self.tls_task is None:
            self.transport.abort()
            self.release()

    def release(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.keeper.pending.discard(self)
        self.keeper.silent.pop(self, None)
        self.keeper.slots.done(self)
        if self.fd >= 0:
            self.keeper.first_bytes.forget(self.fd)
            self.fd = -1
        place, self.place = self.place, None
        if place is not None:
            self.keeper.admission.release(place)

    # asyncio.Protocol: the plain socket before TLS, then the TLS layer until the hand-over

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()

    def data_received(self, data: bytes) -> None:
        self.early.append(data)
        if sum(map(len, self.early)) > MAX_EARLY_BYTES:
            self.transport.abort()

    def eof_received(self) -> bool:
        self.early_eof = True
        return True
