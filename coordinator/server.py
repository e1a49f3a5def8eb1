"""The coordinator's websocket server (websockets 17, asyncio): enrollment, authentication, bundle
transfer, updates and heartbeats over ``device_runtime.wire`` frames.

Per connection (see the protocol module docstring)::

    [Enroll -> EnrollOk]*  Hello -> Challenge -> Auth -> AuthOk   then any of:
    BundleRequest -> BundleData...   Update -> Ack   Heartbeat   EvaluateRes   Error

A Heartbeat refreshes the device's ``last_seen`` at most every ``LAST_SEEN_EVERY_S``; a bundle transfer is
counted as one ``bytes_down`` metric (registry writes are commits on the event loop). A malformed message
gets ``Error(code)`` and the connection stays open (at most ``MAX_BAD_BEFORE_AUTH`` before authentication).
Authentication failures get ``Error("auth")`` and the connection is closed.
A frame above :data:`PRE_LOGIN_MAX_BYTES` before login, and after it above what an update to the device's
assignments needs (``coordinator.frame_cap``, never above ``max_message_mib``), is refused by websockets itself
(close code 1009). Admission control (``coordinator.admission``): connection caps, one session per
device, a login deadline (``login_timeout_s``), at most :data:`MAX_PRE_LOGIN_MESSAGES` messages before login,
a per-device message rate, and at most :data:`MAX_QUEUE` frames buffered per connection. A device that closes
with 1009 right after an Assignment refused it as too big: the coordinator rejects that assignment instead
of re-sending it on every reconnect. An ``Error`` from a device ends its part in the current round (see
``Coordinator.device_error``). ``GET /healthz`` answers 200 ``ok``. SIGTERM / SIGINT stop the server
cleanly (:func:`run`).
"""

from __future__ import annotations

import asyncio
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
from coordinator.frame_cap import frame_cap
from coordinator.service import Coordinator, Session
from coordinator.tls import issue_device_certificate, peer_public_key, server_context
from device_runtime.auth import NonceBook, verify_challenge
from device_runtime.errors import AuthError, BundleError, ConfigError, FedmoeError, ProtocolError
from device_runtime.tls import CA_PATH, CERTIFICATE_PATH
from device_runtime.wire import (
    PROTOCOL_VERSION,
    Assignment,
    Auth,
    AuthOk,
    BundleData,
    BundleRequest,
    Challenge,
    Enroll,
    EnrollOk,
    Error,
    Heartbeat,
    Hello,
    Message,
    Update,
    bundle_chunks,
    decode,
    encode,
)

log = logging.getLogger("fedmoe.coord")
MAX_BAD_BEFORE_AUTH = 3
MAX_PRE_LOGIN_MESSAGES = 16  # Enroll / Hello / Auth messages one connection may send before it is logged in
PRE_LOGIN_MAX_BYTES = 64 << 10  # largest frame before login: an Enroll with its profile is ~1 KiB
MAX_QUEUE = 2  # frames websockets buffers per connection before it stops reading (its default: 16)
DECODE_IN_THREAD_BYTES = 1 << 20  # frames above this are hashed and parsed in a worker thread
CLOSE_POLICY = 1008  # websocket close code: policy violation
CHUNK_BYTES = 4 << 20
# A Heartbeat refreshes the device's ``last_seen`` at most this often (seconds): each refresh is a registry
# commit (an fsync) on the event loop. Measured (bench/bench_connections.py, 1000 devices heartbeating every
# 10 s): one commit per Heartbeat took 53% of the loop's time.
LAST_SEEN_EVERY_S = 60.0
# A Heartbeat re-checks in the registry whether the device was revoked at most this often (seconds); every
# other message checks it at once. Heartbeats are the one frequent message: a SELECT for each was a registry
# query per device every heartbeat_s on the event loop, and a heartbeat changes nothing a revoked device could use.
REVOCATION_CHECK_S = 10.0
# Pending TCP connections the kernel queues for accept() (asyncio's default is 100; Linux caps it at
# net.core.somaxconn). Measured: 1000 devices (re)connecting at once overflowed a 100-deep queue.
LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 64  # connections accepted per event-loop iteration (coordinator.accept.deepen_backlog)
CLOSE_TOO_BIG = 1009  # websocket close code: a message exceeded the receiver's max_size


TRAFFIC = (Assignment, BundleData, Update)  # the messages whose bytes are counted per device and round


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
    """One device connection: framing, the handshake, and message dispatch."""

    def __init__(self, coord: Coordinator, ws: AdmittedConnection, nonces: NonceBook):
        self.coord, self.ws, self.nonces = coord, ws, nonces
        self.max_size = coord.cfg.max_message_bytes
        ws.protocol.max_message_size = PRE_LOGIN_MAX_BYTES  # raised by allow_frames_for once logged in
        self.device_id: str | None = None  # set once authenticated: bytes moved are counted per device
        self.last_seen = 0.0  # time.monotonic() of the last ``last_seen`` write
        self.revocation_checked = 0.0  # time.monotonic() of the last revocation check (login is one)
        # (update_id, frame bytes) of the last Assignment sent, unless a BundleData frame followed it
        self.assignment_frame: tuple[str, int] | None = None

    async def send(self, msg: Message, *, count: bool = True) -> int:
        """Send ``msg``; returns the frame's size (bytes), recorded as ``bytes_down`` if ``count``.
        Messages with tensors are encoded in a worker thread (100s of MiB must not stall the event loop);
        an Assignment is signed for this connection's device (``device_runtime.signing``)."""
        signer = self.coord.signer
        sign = signer.assignment(self.device_id) if signer is not None and msg.SIGNED else None
        frame = await asyncio.to_thread(encode, msg, sign=sign) if msg.PAYLOAD else encode(msg)
        if isinstance(msg, (Assignment, BundleData)):
            self.assignment_frame = (msg.update_id, len(frame)) if isinstance(msg, Assignment) else None
        if isinstance(msg, Assignment):
            self.allow_frames_for([msg.shape_key.id])
        await self.ws.send(frame)
        if count and self.device_id is not None and isinstance(msg, TRAFFIC):
            self.coord.count_bytes(self.device_id, "bytes_down", len(frame))
        return len(frame)

    def allow_frames_for(self, shape_keys) -> None:
        """Raise this connection's frame limit to what an update to assignments of ``shape_keys`` needs
        (``coordinator.frame_cap``); it never shrinks within a connection."""
        cap = frame_cap(self.coord.bundles, shape_keys, self.max_size)
        self.ws.protocol.max_message_size = max(self.ws.protocol.max_message_size, cap)

    async def error(self, code: str, message: str) -> None:
        await self.send(Error(code=code, message=message[:2000]))

    async def recv(self) -> Message:
        """The next decoded message. Raises ProtocolError (bad frame) or ConnectionClosed."""
        raw = await self.ws.recv()
        if isinstance(raw, str):
            raise ProtocolError("bad_frame", "protocol frames are binary websocket messages")
        if len(raw) > DECODE_IN_THREAD_BYTES:
            msg = await asyncio.to_thread(decode, raw, max_size=self.max_size)
        else:
            msg = decode(raw, max_size=self.max_size)
        if self.device_id is not None and isinstance(msg, TRAFFIC):
            self.coord.count_bytes(self.device_id, "bytes_up", len(raw))
        return msg

    async def run(self) -> None:
        session = None
        try:
            try:
                async with asyncio.timeout(self.coord.cfg.login_timeout_s):
                    session = await self.handshake()
            except TimeoutError:
                await self.ws.close(CLOSE_POLICY, "login deadline passed")
                return
            if session is not None:
                await self.coord.attach(session)
                await self.serve(session)
        except ConnectionClosed as exc:
            if session is not None:
                self.closed_by_peer(session, exc)
        finally:
            if session is not None:
                self.coord.detach(session)

    def closed_by_peer(self, session: Session, exc: ConnectionClosed) -> None:
        """Close code 1009 (message too big) from the device after an Assignment: it refused the assignment."""
        if exc.rcvd is not None and exc.rcvd.code == CLOSE_TOO_BIG and self.assignment_frame is not None:
            self.coord.assignment_refused(session, *self.assignment_frame)

    # ------------------------------------------------------------ handshake

    async def handshake(self) -> Session | None:
        """Enrollments, then Hello / Challenge / Auth. Returns the session, or None (connection closed)."""
        bad = 0
        for _ in range(MAX_PRE_LOGIN_MESSAGES):
            if bad >= MAX_BAD_BEFORE_AUTH:
                break
            try:
                msg = await self.recv()
                if isinstance(msg, Enroll):
                    await self.enroll(msg)
                elif isinstance(msg, Hello):
                    return await self.authenticate(msg)
                else:
                    raise ProtocolError("unexpected", f"{msg.TYPE} before authentication; send hello first")
            except ProtocolError as exc:
                bad += 1
                await self.error(exc.code, str(exc))
            except AuthError as exc:
                await self.error("auth", str(exc))
                await self.ws.close(CLOSE_POLICY, "authentication failed")
                return None
        await self.ws.close(CLOSE_POLICY, "too many messages before login")
        return None

    async def enroll(self, msg: Enroll) -> None:
        """Redeem the token. Raises AuthError (refused), ProtocolError (too many failed enrollments from this
        address, ``coordinator.admission``)."""
        admission, address = self.ws.admission, self.ws.place.address
        if not admission.may_enroll(address):
            raise ProtocolError(
                "rate",
                "too many failed enrollments from this address; wait a minute, then "
                "enroll with a fresh token from `fedmoe-coord enroll`",
            )
        try:
            device = self.coord.registry.redeem_token(msg.token, msg.name, msg.profile, msg.public_key)
        except AuthError:
            admission.enroll_failed(address)
            raise
        log.info("enrolled device %s (%s)", device.id, msg.name)
        await self.send(EnrollOk(device_id=device.id))

    async def authenticate(self, hello: Hello) -> Session:
        """Challenge-response with a single-use nonce. Raises AuthError or ProtocolError."""
        if hello.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError("version", f"device speaks v{hello.protocol_version}, coordinator v{PROTOCOL_VERSION}")
        device = self.coord.registry.get_device(hello.device_id)
        if device is None or device.revoked:
            raise AuthError(f"device {hello.device_id} is unknown or revoked; enroll again")
        if (
            self.coord.cfg.mutual_tls
            and peer_public_key(self.ws.transport.get_extra_info("ssl_object")) != device.public_key
        ):
            raise AuthError(
                f"device {device.id} must log in over mutual TLS with the client certificate issued "
                "for its key at enrollment; enroll again with this fedmoe version"
            )
        nonce = self.nonces.issue()
        await self.send(Challenge(nonce=nonce))
        auth = await self.recv()
        if not isinstance(auth, Auth) or auth.device_id != device.id:
            raise AuthError("expected auth for the device that said hello")
        self.nonces.consume(nonce)
        verify_challenge(device.public_key, nonce, device.id, auth.signature)
        self.coord.registry.touch_device(device.id, hello.profile or None)
        self.last_seen = self.revocation_checked = time.monotonic()
        older = self.ws.admission.authenticated(self.ws, device.id)
        if older is not None:  # one session per device: the newest wins
            await older.close(CLOSE_POLICY, "replaced by a newer connection of this device")
        self.allow_frames_for(self.coord.registry.device_shape_keys(device.id))
        await self.send(AuthOk())
        log.info("device %s authenticated", device.id)
        self.device_id = device.id
        return Session(device.id, hello.profile or device.profile, self.send)

    # ------------------------------------------------------------ authenticated messages

    async def serve(self, session: Session) -> None:
        while True:
            try:
                msg = await self.recv()
                if not self.ws.admission.take(session.device_id):
                    log.warning("device %s exceeded the message rate; disconnecting it", session.device_id)
                    await self.ws.close(CLOSE_POLICY, "message rate exceeded")
                    return
                if self.revoked(session, msg):
                    await self.error("auth", "this device was revoked; enroll it again to rejoin")
                    await self.ws.close(CLOSE_POLICY, "device revoked")
                    return
                await self.dispatch(session, msg)
            except ProtocolError as exc:
                await self.error(exc.code, str(exc))
            except ConnectionClosed:
                raise
            except FedmoeError as exc:
                await self.error("internal", f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug while handling a valid message: report it, keep serving
                log.exception("handling a message from %s failed", session.device_id)
                await self.error("internal", f"{type(exc).__name__}: {exc}")

    def revoked(self, session: Session, msg: Message) -> bool:
        """Whether the device was revoked (``fedmoe-coord devices revoke``, another process) since it logged in:
        checked in the registry before each message it sends but a Heartbeat, which checks at most every
        :data:`REVOCATION_CHECK_S`. So a revoked device's live session ends at its next message (an idle one
        within a heartbeat interval plus that), and its update, bundle request or result never counts."""
        now = time.monotonic()
        if isinstance(msg, Heartbeat) and now - self.revocation_checked < REVOCATION_CHECK_S:
            return False
        self.revocation_checked = now
        device = self.coord.registry.get_device(session.device_id)
        return device is None or device.revoked

    async def dispatch(self, session: Session, msg: Message) -> None:
        if isinstance(msg, Update):
            await self.send(await self.coord.handle_update(session, msg))
        elif isinstance(msg, BundleRequest):
            await self.send_bundle(msg.shape_key_id)
        elif isinstance(msg, Heartbeat):
            if time.monotonic() - self.last_seen >= LAST_SEEN_EVERY_S:
                self.coord.registry.touch_device(session.device_id)
                self.last_seen = time.monotonic()
        elif isinstance(msg, Error):
            self.coord.device_error(session, msg)
        else:
            raise ProtocolError("unexpected", f"{msg.TYPE} is not expected from an authenticated device")

    async def send_bundle(self, shape_key_id: str) -> None:
        try:
            files = await asyncio.to_thread(self.coord.bundles.files, shape_key_id)
        except BundleError as exc:
            raise ProtocolError("unexpected", str(exc)) from exc
        chunk = max(1, min(CHUNK_BYTES, self.max_size // 2))
        sent = 0
        for message in bundle_chunks(shape_key_id, files, chunk_bytes=chunk):
            sent += await self.send(message, count=False)
        self.coord.count_bytes(self.device_id, "bytes_down", sent)  # one registry write per transfer


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
            rounds = asyncio.create_task(coord.run_rounds(stop))
            try:
                await stop.wait()
            finally:
                rounds.cancel()
                await asyncio.gather(rounds, return_exceptions=True)
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
    The soft file-descriptor limit is raised to the hard limit first (each connection holds one)."""
    raise_descriptor_limit()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_coordinator(cfg, stop, ready=ready)

    asyncio.run(main())
