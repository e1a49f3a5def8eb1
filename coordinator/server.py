"""The coordinator's websocket server (websockets 17, asyncio): the I/O of device connections, whose protocol
decisions (enrollment, authentication, rate and revocation checks, dispatch) ``coordinator.connection`` makes
without I/O; this module reads and decodes frames, carries out the actions it returns and awaits the heavy work
(``Coordinator.handle_update``, bundle reads).

A bundle transfer is counted as one ``bytes_down`` metric; an Assignment, BundleData, Update or secure-aggregation
frame is counted per device (registry writes are commits on the event loop). Messages with tensors are encoded in a
worker thread, frames above :data:`DECODE_IN_THREAD_BYTES` decoded in one; Assignments and secure-aggregation steps
are signed for their device.
A frame above :data:`PRE_LOGIN_MAX_BYTES` before login, and after it above what an update to the device's
assignments needs (``coordinator.frame_cap``, never above ``max_message_mib``), is refused by websockets itself
(close code 1009). Admission control (``coordinator.admission``): connection caps, one session per
device, a login deadline (``login_timeout_s``), the pre-login message budget and per-device message rate of
``coordinator.connection``, and at most :data:`MAX_QUEUE` frames buffered per connection. A device that closes
with 1009 right after an Assignment refused it as too big: the coordinator rejects that assignment instead
of re-sending it on every reconnect. An ``Error`` from a device ends its part in the current round (see
``Coordinator.device_error``). The coordinator's presence sweep (``coordinator.presence``, a task beside the
round loop) ends a revoked device's session through ``Session.revoked``. ``GET /healthz`` answers 200 ``ok``.
SIGTERM / SIGINT stop the server cleanly (:func:`run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from coordinator.accept import FirstBytes, Gatekeeper, deepen_backlog
from coordinator.admission import Admission, AdmittedConnection, quiet_accept_errors, raise_descriptor_limit
from coordinator.config import CoordinatorConfig
from coordinator.connection import (
    CLOSE_POLICY,
    Action,
    Close,
    CoordinatorConnection,
    HandleError,
    HandleSecure,
    HandleSplit,
    HandleUpdate,
    Login,
    Send,
    SendBundle,
    State,
    refusal,
)
from coordinator.frame_cap import frame_cap
from coordinator.service import Coordinator, Session
from coordinator.tls import issue_device_certificate, peer_public_key, server_context
from device_runtime.auth import NonceBook
from device_runtime.errors import BundleError, ConfigError, FedmoeError, ProtocolError
from device_runtime.timing import log_slow_collections, log_timing
from device_runtime.tls import CA_PATH, CERTIFICATE_PATH
from device_runtime.wire import (
    FRAGMENT_BYTES,
    SECURE_FROM_DEVICE,
    SECURE_TO_DEVICE,
    Assignment,
    BundleData,
    CutGradient,
    Message,
    SmashedData,
    SplitScalars,
    SplitStep,
    Update,
    bundle_chunks,
    decode,
    encode_parts,
    fragments,
)

log = logging.getLogger("fedmoe.coord")
PRE_LOGIN_MAX_BYTES = 64 << 10  # largest frame before login: an Enroll with its profile is ~1 KiB
MAX_QUEUE = 2  # frames websockets buffers per connection before it stops reading (its default: 16)
DECODE_IN_THREAD_BYTES = 1 << 20  # frames above this are hashed and parsed in a worker thread
CHUNK_BYTES = 2 << 20  # largest BundleData chunk (bytes; at most half the frame limit; a device reuses its
# heap for frames under its 4 MiB mmap threshold, device_runtime.memory)
# Pending TCP connections the kernel queues for accept() (asyncio's default is 100; Linux caps it at
# net.core.somaxconn). Measured: 1000 devices (re)connecting at once overflowed a 100-deep queue.
LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 64  # connections accepted per event-loop iteration (coordinator.accept.deepen_backlog)
CLOSE_TOO_BIG = 1009  # websocket close code: a message exceeded the receiver's max_size
# Allocations between two collections of the youngest garbage generation (Python's default: 700). With 10,000
# connections a full collection walks millions of objects for up to a second (measured: 0.9-1.0 s, the idle
# /healthz p99 misses); at the default, a busy loop collects so often that objects living milliseconds (a
# heartbeat's frames and futures) are promoted, and enough of them soon trigger a full collection.
GC_YOUNG_THRESHOLD = 50_000


# the messages whose bytes are counted per device and round (a secure round's own messages too: its overhead)
TRAFFIC = (
    Assignment,
    BundleData,
    Update,
    SmashedData,
    CutGradient,
    SplitScalars,
    SplitStep,
    *SECURE_TO_DEVICE,
    *SECURE_FROM_DEVICE,
)


def http_routes(coord: Coordinator) -> Callable:
    """``process_request`` hook: ``GET /healthz`` -> 200 ok; with TLS also ``GET /ca.pem`` (the CA, which a
    device checks against the fingerprint in its token) and ``GET /certificate/<device_id>`` (the client
    certificate for that device's enrolled key: public material). Anything else proceeds to the websocket
    handshake."""
    cfg = coord.cfg

    def route(connection: ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if not cfg.mutual_tls:
            return None
        if request.path == CA_PATH:
            return connection.respond(HTTPStatus.OK, Path(cfg.tls_ca_cert).read_text())
        if request.path.startswith(CERTIFICATE_PATH):
            device = coord.registry.get_device(request.path[len(CERTIFICATE_PATH) :])
            if device is None or device.revoked:
                return connection.respond(HTTPStatus.NOT_FOUND, "no such device; enroll first\n")
            pem = issue_device_certificate(Path(cfg.tls_ca_cert), Path(cfg.tls_ca_key), device.id, device.public_key)
            return connection.respond(HTTPStatus.OK, pem.decode("ascii"))
        return None

    return route


class Connection:
    """One device connection's I/O: frames in and out, and the actions its :class:`CoordinatorConnection` decides.

    Args:
        coord: the coordinator (registry, bundles, signer, rounds).
        ws: the admitted websocket connection.
        nonces: challenge nonces, shared by all connections.
    """

    def __init__(self, coord: Coordinator, ws: AdmittedConnection, nonces: NonceBook):
        self.coord, self.ws = coord, ws
        self.max_size = coord.cfg.max_message_bytes
        ws.protocol.max_message_size = PRE_LOGIN_MAX_BYTES  # raised by allow_frames_for once logged in
        mutual_tls = coord.cfg.mutual_tls
        self.machine = CoordinatorConnection(
            coord.registry,
            ws.admission,
            nonces,
            coord.presence,
            address=ws.place.address,
            mutual_tls=mutual_tls,
            peer_key=peer_public_key(ws.transport.get_extra_info("ssl_object")) if mutual_tls else None,
        )
        self.session: Session | None = None  # set at login
        # (update_id, frame bytes) of the last Assignment sent, unless a BundleData frame followed it
        self.assignment_frame: tuple[str, int] | None = None
        self.ending: asyncio.Task | None = None  # carrying out on_revoked's actions (see revoked)

    async def send(self, msg: Message, *, count: bool = True) -> int:
        """Send ``msg``; returns the frame's size (bytes), recorded as ``bytes_down`` if ``count``.
        Messages with tensors are encoded in a worker thread (100s of MiB must not stall the event loop);
        an Assignment and the secure-aggregation steps are signed for this connection's device
        (``device_runtime.signing``)."""
        device_id, signer = self.machine.device_id, self.coord.signer
        sign = signer.assignment(device_id) if signer is not None and msg.SIGNED else None
        start = time.perf_counter()
        parts = await asyncio.to_thread(encode_parts, msg, sign=sign) if msg.PAYLOAD else encode_parts(msg, sign=sign)
        size = sum(memoryview(part).nbytes for part in parts)
        encoded = time.perf_counter()
        if isinstance(msg, (Assignment, BundleData)):
            self.assignment_frame = (msg.update_id, size) if isinstance(msg, Assignment) else None
        if isinstance(msg, Assignment):
            self.allow_frames_for([msg.shape_key.id])
        # a large one as views of its arrays, 1 MiB at a time: no frame-sized copy on its way out
        await self.ws.send(fragments(parts) if size > FRAGMENT_BYTES else b"".join(parts))
        if size > DECODE_IN_THREAD_BYTES and not isinstance(msg, BundleData):  # a bundle: send_bundle's line
            log_timing(log, "encode", encoded - start, type=msg.TYPE, bytes=size)
            log_timing(log, "send", time.perf_counter() - encoded, type=msg.TYPE, bytes=size)
        if count and device_id is not None and isinstance(msg, TRAFFIC):
            self.coord.count_bytes(device_id, "bytes_down", size)
        return size

    def allow_frames_for(self, shape_keys) -> None:
        """Raise this connection's frame limit to what an update to assignments of ``shape_keys`` needs
        (``coordinator.frame_cap``); it never shrinks within a connection."""
        cap = frame_cap(self.coord.bundles, shape_keys, self.max_size)
        self.ws.protocol.max_message_size = max(self.ws.protocol.max_message_size, cap)

    async def recv(self) -> Message:
        """The next decoded message. Raises ProtocolError (bad frame) or ConnectionClosed."""
        raw = await self.ws.recv()
        if isinstance(raw, str):
            raise ProtocolError("bad_frame", "protocol frames are binary websocket messages")
        if len(raw) > DECODE_IN_THREAD_BYTES:
            start = time.perf_counter()
            msg = await asyncio.to_thread(decode, raw, max_size=self.max_size)
            log_timing(log, "decode", time.perf_counter() - start, type=msg.TYPE, bytes=len(raw))
        else:
            msg = decode(raw, max_size=self.max_size)
        if self.machine.device_id is not None and isinstance(msg, TRAFFIC):
            self.coord.count_bytes(self.machine.device_id, "bytes_up", len(raw))
        return msg

    async def next_actions(self) -> list[Action]:
        """The connection's actions for the next frame. Raises ConnectionClosed."""
        try:
            msg = await self.recv()
        except ProtocolError as exc:
            return self.machine.on_bad_frame(exc)
        return self.machine.on_message(msg, time.monotonic())

    async def run(self) -> None:
        """Serve the connection: the handshake within ``login_timeout_s`` (seconds), then the device's session
        until the connection closes."""
        try:
            try:
                async with asyncio.timeout(self.coord.cfg.login_timeout_s):
                    await self.handshake()
            except TimeoutError:
                await self.ws.close(CLOSE_POLICY, "login deadline passed")
                return
            if self.session is not None:
                await self.coord.attach(self.session)
                await self.serve()
        except ConnectionClosed as exc:
            if self.session is not None:
                self.closed_by_peer(exc)
        finally:
            if self.session is not None:
                self.coord.detach(self.session)

    def closed_by_peer(self, exc: ConnectionClosed) -> None:
        """Close code 1009 (message too big) from the device after an Assignment: it refused the assignment."""
        if exc.rcvd is not None and exc.rcvd.code == CLOSE_TOO_BIG and self.assignment_frame is not None:
            self.coord.assignment_refused(self.session, *self.assignment_frame)

    async def handshake(self) -> None:
        """Enrollments, then the login: until the device logs in (``session`` is set) or the connection closes."""
        while self.machine.state in (State.OPEN, State.CHALLENGED):
            for action in await self.next_actions():
                await self.execute(action)

    async def serve(self) -> None:
        """The logged-in device's messages, until the connection closes. An error while one is handled is sent
        to the device as ``Error`` (``internal`` unless it is a ProtocolError) and the connection stays open."""
        while self.machine.state is State.LOGGED_IN:
            try:
                for action in await self.next_actions():
                    await self.execute(action)
            except ProtocolError as exc:
                await self.execute(refusal(exc.code, str(exc)))
            except ConnectionClosed:
                raise
            except FedmoeError as exc:
                await self.execute(refusal("internal", f"{type(exc).__name__}: {exc}"))
            except Exception as exc:  # a bug while handling a valid message: report it, keep serving
                log.exception("handling a message from %s failed", self.machine.device_id)
                await self.execute(refusal("internal", f"{type(exc).__name__}: {exc}"))

    async def execute(self, action: Action) -> None:
        """Carry out one action. Raises what the coordinator, the bundle cache or the socket raise."""
        match action:
            case Send(message):
                await self.send(message)
            case Close(code, reason):
                await self.ws.close(code, reason)
            case Login():
                await self.login(action)
            case HandleUpdate(update):
                await self.send(await self.coord.handle_update(self.session, update))
            case HandleSplit(message):
                await self.coord.handle_split(self.session, message)
            case SendBundle(shape_key_id):
                await self.send_bundle(shape_key_id)
            case HandleError(error):
                self.coord.device_error(self.session, error)
            case HandleSecure(message):
                reply = await self.coord.handle_secure(self.session, message)
                if reply is not None:
                    await self.send(reply)

    async def login(self, login: Login) -> None:
        """Close the device's older connection (one session per device: the newest wins), allow the frames its
        updates need, and start its session."""
        older = self.ws.admission.authenticated(self.ws, login.device_id)
        if older is not None:
            await older.close(CLOSE_POLICY, "replaced by a newer connection of this device")
        self.allow_frames_for(login.shape_keys)
        self.session = Session(login.device_id, login.profile, self.send, self.revoked)

    def revoked(self) -> None:
        """The registry says the device was revoked (``coordinator.presence``): send it ``Error("auth")`` and
        close, in a task of its own (a close handshake waits for the device); nothing once closing."""
        actions = self.machine.on_revoked()
        if actions:
            self.ending = asyncio.create_task(self._carry_out(actions))

    async def _carry_out(self, actions: list[Action]) -> None:
        """Execute ``actions`` in order; a connection that closed meanwhile ends them quietly."""
        with contextlib.suppress(ConnectionClosed):
            for action in actions:
                await self.execute(action)

    async def send_bundle(self, shape_key_id: str) -> None:
        """Send the bundle in BundleData chunks, counted as one ``bytes_down`` metric. Raises ProtocolError
        (``unexpected``): no such bundle."""
        try:
            files = await asyncio.to_thread(self.coord.bundles.files, shape_key_id)
        except BundleError as exc:
            raise ProtocolError("unexpected", str(exc)) from exc
        chunk = max(1, min(CHUNK_BYTES, self.max_size // 2))
        sent, start = 0, time.perf_counter()
        chunks = bundle_chunks(shape_key_id, files, chunk_bytes=chunk)  # read from disk, one chunk at a time
        try:
            while (message := await asyncio.to_thread(next, chunks, None)) is not None:
                sent += await self.send(message, count=False)
        finally:
            with contextlib.suppress(ValueError):  # cancelled while a worker thread reads: it ends with the thread
                chunks.close()
        self.coord.count_bytes(self.machine.device_id, "bytes_down", sent)  # one registry write per transfer
        log_timing(log, "send_bundle", time.perf_counter() - start, bytes=sent)


def _ssl_context(cfg: CoordinatorConfig) -> ssl.SSLContext | None:
    """The server's TLS context; None (plain ``ws://``, with a loud warning) only with ``insecure = true``.

    Raises:
        ConfigError: no TLS files and ``insecure`` is not set, or unreadable TLS files.
    """
    if cfg.tls:
        return server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca_cert or None)
    if not cfg.insecure:
        raise ConfigError(
            "no TLS certificate in the config (tls_cert, tls_key): run `fedmoe-coord init`, which "
            "creates them, or set insecure = true to serve plain ws:// on a trusted network"
        )
    log.warning(
        "INSECURE: serving plain ws:// without TLS (insecure = true): enrollment tokens, model weights "
        "and updates cross the network in the clear; a man in the middle can tamper with updates, and "
        "with bundles and assignments for devices that pinned no coordinator key at enrollment"
    )
    return None


async def serve_coordinator(
    cfg: CoordinatorConfig, stop: asyncio.Event, *, ready: Callable[[int], None] | None = None
) -> None:
    """Serve until ``stop`` is set; ``ready(port)`` is called once listening (port 0 picks a free one).

    Raises:
        ConfigError: the state directory is not initialised, the config is invalid, it names no TLS
            files and does not set ``insecure``, the registry is not readable, or the port cannot be bound.
    """
    context = _ssl_context(cfg)
    coord, nonces = Coordinator.from_config(cfg), NonceBook()
    _report_damaged_files(coord)
    admission = Admission(
        cfg.max_connections, cfg.max_unauthenticated_per_address, cfg.certified_share if cfg.mutual_tls else 0.0
    )
    loop = asyncio.get_running_loop()
    gatekeeper = Gatekeeper(admission, context, cfg.handshake_timeout_s, FirstBytes(loop))
    handler = lambda ws: Connection(coord, ws, nonces).run()  # noqa: E731
    quiet_accept_errors(loop)
    try:
        # no ssl= here: the gatekeeper starts TLS on admitted connections (coordinator.accept)
        server = await _listen(
            cfg,
            serve(
                handler,
                cfg.host,
                cfg.port,
                compression=None,
                max_size=cfg.max_message_bytes,
                max_queue=MAX_QUEUE,
                process_request=http_routes(coord),
                ping_interval=cfg.heartbeat_s,
                ping_timeout=3 * cfg.heartbeat_s,
                backlog=ACCEPT_BATCH,
                create_connection=gatekeeper.create_connection,
            ),
        )
        deepen_backlog(server.sockets, LISTEN_BACKLOG)
        try:
            if ready is not None:
                ready(server.sockets[0].getsockname()[1])
            tasks = [asyncio.create_task(coord.run_rounds(stop)), asyncio.create_task(coord.presence.run(stop))]
            try:
                await stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # what ``async with serve(...)`` does on exit
            server.close()
            await server.wait_closed()
    finally:
        gatekeeper.close()
        coord.close()


def _report_damaged_files(coord: Coordinator) -> None:
    """Log every tensor file the registry references (every model version's) that is not whole, at start
    rather than when it is first read."""
    store = coord.model.store
    for sha in store.damaged(coord.registry.referenced_shas()):
        log.error(
            "tensor file %s is truncated or damaged; restore it from a backup (model versions and updates "
            "that use it cannot be read)",
            store.path(sha),
        )


async def _listen(cfg: CoordinatorConfig, server: Server) -> Server:
    """``server`` listening. Raises ConfigError: the address cannot be bound (in use, or not this machine's)."""
    try:
        return await server
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}; stop the process using "
            "that port (`ss -ltnp`) or set another port (config `port`, or `serve --port`)"
        ) from exc


def run(cfg: CoordinatorConfig, *, ready: Callable[[int], None] | None = None) -> None:
    """Blocking entry point: serve until SIGTERM or SIGINT, then close connections and the registry.
    The soft file-descriptor limit is raised to the hard limit first (each connection holds one); the youngest
    garbage generation is collected every :data:`GC_YOUNG_THRESHOLD` allocations, and collections longer than
    0.1 s are logged (``timing phase=gc``)."""
    raise_descriptor_limit()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    log_slow_collections(log)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_coordinator(cfg, stop, ready=ready)

    asyncio.run(main())
