"""The device's connection to the coordinator (asyncio, websockets 17): enrollment, then a long-running
loop that authenticates, serves assignments and reconnects.

Per connection (protocol in ``device_runtime.wire``)::

    Hello -> Challenge -> Auth -> AuthOk        (Ed25519 challenge-response, ``device_runtime.auth``)
    re-send every pending Update from disk      (same update_id: the coordinator counts it once)
    Assignment [-> BundleRequest <- BundleData...] -> train -> Update <- Ack     Heartbeat every heartbeat_s

Reactions to messages live in ``device_runtime.session`` (no I/O); this module does the I/O: the
websocket (``compression=None``: deflate cuts tensor throughput 8x, ``docs/stack.md``; ``max_size``
from config), TLS (``wss://`` verified against the CA pinned at enrollment, then mutual TLS:
``device_runtime.tls``), the bundle cache, training in a worker thread and the on-disk store of
unacknowledged updates (``device_runtime.update_store``).

Failures: a lost connection, a refused connection or a malformed frame never ends :meth:`DeviceClient.run`;
it reconnects after an exponential backoff with jitter (``base_s * 2**attempt`` capped at ``max_s``, times
a uniform factor in [0.5, 1]). A rejected authentication (:class:`AuthError`) or protocol version
(:class:`ConfigError`) does end it: retrying cannot help. :meth:`DeviceClient.stop` (SIGTERM) abandons
training after the current step and closes the connection; pending updates and cached bundles stay on
disk for the next start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import random
import shutil
import signal
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from device_runtime.auth import Credentials, check_device_name, generate_keypair, save_credentials, sign_challenge
from device_runtime.backends import select_backend
from device_runtime.bundle import Bundle
from device_runtime.bundle_cache import BundleCache
from device_runtime.data import DEFAULT_TEMPLATE
from device_runtime.errors import (
    AuthError,
    BundleError,
    BundleIntegrityError,
    BundleSignatureError,
    ConfigError,
    DataError,
    FedmoeError,
    ProtocolError,
)
from device_runtime.fit_round import fit_assignment
from device_runtime.memory import release_memory
from device_runtime.secure_rounds import SecureRounds
from device_runtime.session import Acked, Action, DeviceSession, InstallBundle, Report, Secure, Send, SplitReply, Train
from device_runtime.signing import Verifier
from device_runtime.slots import Ticket, ticket, training_slot
from device_runtime.timing import log_timing, timed
from device_runtime.tls import client_context, fetch_client_certificate, fetch_pinned_ca, split_token, write_client_pem
from device_runtime.trainer_cache import TrainerCache
from device_runtime.units import MIB
from device_runtime.update_store import UpdateStore
from device_runtime.wire import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    Assignment,
    Auth,
    AuthOk,
    Challenge,
    Enroll,
    EnrollOk,
    Error,
    Heartbeat,
    Hello,
    Message,
    Update,
    decode,
    encode,
    encode_parts,
    expect,
    fragments,
    frame_payload,
)

log = logging.getLogger("fedmoe.device")
_M = TypeVar("_M", bound=Message)
HANDSHAKE_TIMEOUT_S = 30.0
CLIENT_PEM = "client.pem"  # beside the credentials file: the client certificate and key (mode 0600)
_JITTER = random.Random()


def default_home() -> Path:
    """The device's state directory: ``$FEDMOE_DEVICE_HOME``, else ``~/.fedmoe-device``."""
    return Path(os.environ.get("FEDMOE_DEVICE_HOME", "~/.fedmoe-device")).expanduser()


def _connect(url: str, context: ssl.SSLContext | None, max_size: int, **kwargs: Any) -> connect:
    return connect(url, ssl=context, compression=None, max_size=max_size, open_timeout=HANDSHAKE_TIMEOUT_S, **kwargs)


async def _recv(
    ws: ClientConnection, max_size: int, verify: Callable[[bytes, bytes | None], None] | None = None
) -> Message:
    """The next decoded frame (``verify``: see ``wire.decode``). Raises ProtocolError (malformed, or refused by
    ``verify``) or ConnectionClosed."""
    raw = await ws.recv()
    if isinstance(raw, str):
        raise ProtocolError("bad_frame", "protocol frames are binary websocket messages")
    return decode(raw, max_size=max_size, verify=verify)


def _expect(msg: Message, kind: type[_M]) -> _M:
    """``expect`` for the handshake: a peer ``Error("auth")`` is an AuthError, ``"version"`` a ConfigError."""
    try:
        return expect(msg, kind)
    except ProtocolError as exc:
        if exc.code == "auth":
            raise AuthError(f"coordinator refused: {exc}") from exc
        if exc.code == "version":
            raise ConfigError(f"{exc}; upgrade fedmoe on this device") from exc
        raise


def device_profile(
    memory_mib: int | None = None, *, benchmark_seconds: float = 0.3, backend: str | None = None
) -> dict[str, Any]:
    """This device's profile for Enroll / Hello; ``memory_mib`` (the budget the coordinator plans with)
    defaults to the memory available now (MiB); ``backend`` overrides the training backend's choice.

    Raises:
        ConfigError: ``backend`` is unknown or not installed here.
    """
    from device_runtime.profile import collect_profile

    profile = collect_profile(benchmark_seconds=benchmark_seconds, backend=backend).to_dict()
    profile["memory_mib"] = int(memory_mib if memory_mib is not None else profile["memory_available_mib"])
    return profile


async def enroll(
    url: str,
    token: str,
    name: str,
    *,
    credentials_path: str | Path,
    cafile: str | Path | None = None,
    profile: dict[str, Any] | None = None,
    max_message_mib: float = 16.0,
) -> Credentials:
    """Enroll this device once: generate an Ed25519 key pair, redeem ``token``, store the credentials.

    With a token ``SECRET.FINGERPRINT`` (``fedmoe-coord enroll`` on a TLS coordinator) the device first pins
    the coordinator's CA by that fingerprint, enrolls over TLS verified against it, and fetches the client
    certificate issued for its key: later connections are mutual TLS (``device_runtime.tls``).

    Args:
        url: coordinator URL (``ws://`` or ``wss://``). token: single-use enrollment token.
        name: device name (``[A-Za-z0-9][A-Za-z0-9_.-]*``, at most 100 characters).
        credentials_path: where the credentials JSON is written (mode 0600), with ``client.pem`` beside it.
        cafile: CA certificate (PEM) that signed the coordinator's TLS certificate (instead of a fingerprint).
        profile: device profile (default: measured, see :func:`device_profile`).

    Raises:
        AuthError: the coordinator refused the token, or is not the one the token's fingerprint names.
        ConfigError: bad URL, name or CA file, or a fingerprint with a ws:// URL.
        ProtocolError / OSError / websockets errors: the exchange failed (nothing is written).
    """
    check_device_name(name)
    secret, fingerprint = split_token(token)
    if fingerprint is not None and not url.startswith("wss://"):
        raise ConfigError(f"this token is for a TLS coordinator (it ends in a CA fingerprint): use wss://, not {url}")
    ca_pem = None if fingerprint is None else await asyncio.to_thread(fetch_pinned_ca, url, fingerprint)
    context = client_context(url, cafile=cafile, ca_pem=ca_pem)
    if profile is None:
        profile = await asyncio.to_thread(device_profile)
    private_key, public_key = generate_keypair()
    max_size = int(max_message_mib * MIB)
    async with _connect(url, context, max_size) as ws:
        await ws.send(encode(Enroll(token=secret, name=name, profile=profile, public_key=public_key)))
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            ok = _expect(await _recv(ws, max_size), EnrollOk)
    creds = Credentials(device_id=ok.device_id, private_key=private_key, coordinator_url=url)
    if ca_pem is not None and context is not None:  # a pinned CA means wss://: a context
        certificate = await asyncio.to_thread(fetch_client_certificate, url, context, ok.device_id, public_key)
        client_pem = Path(credentials_path).resolve().parent / CLIENT_PEM
        write_client_pem(client_pem, certificate, private_key)
        creds = replace(creds, ca_cert=ca_pem.decode("ascii"), client_pem=str(client_pem))
    save_credentials(credentials_path, creds)
    log.info("enrolled as %s; credentials in %s", ok.device_id, credentials_path)
    return creds


def _client_context(
    url: str, creds: Credentials, cafile: str | Path | None, insecure: bool = False
) -> ssl.SSLContext | None:
    """TLS for :class:`DeviceClient`: the CA pinned at enrollment (or ``cafile``) and, if issued, the client
    certificate (mutual TLS); None for ``ws://``, which a device that enrolled at a TLS coordinator uses
    only if ``insecure``. Raises ConfigError (see ``device_runtime.tls.client_context``)."""
    ca_pem = creds.ca_cert.encode("ascii") if creds.ca_cert and cafile is None else None
    if ca_pem is not None and not url.startswith("wss://"):
        if not insecure:
            raise ConfigError(
                f"this device enrolled at a TLS coordinator: use wss://, not {url} (or --insecure "
                "if it now serves plain ws://: bundles and assignments are still verified)"
            )
        ca_pem = None
    return client_context(url, cafile=cafile, ca_pem=ca_pem, client_pem=creds.client_pem or None)


def _verifier(creds: Credentials) -> Verifier | None:
    """The coordinator key pinned at enrollment (its CA certificate), or None (logged once: enrolled with a
    token without a CA fingerprint, so bundles and assignments cannot be verified). Raises ConfigError."""
    if creds.ca_cert:
        return Verifier.from_certificate(creds.ca_cert.encode("ascii"))
    log.warning(
        "this device pinned no coordinator key at enrollment (its token had no CA fingerprint): bundles "
        "and assignments are NOT signature-checked; enroll with a token of a coordinator made by "
        "`fedmoe-coord init` to verify them"
    )
    return None


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: ``min(max_s, base_s * 2**attempt)`` times a uniform jitter factor in [0.5, 1] (seconds)."""

    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, attempt: int, rng: random.Random = _JITTER) -> float:
        return min(self.max_s, self.base_s * 2.0 ** min(attempt, 30)) * rng.uniform(0.5, 1.0)


class ThreadLink:
    """A split trainer's line to the coordinator (``device_runtime.split_trainer.SplitLink``): the training thread
    sends through the client's event loop and blocks until the reader task hands it the answer.

    If the connection drops meanwhile, the client re-sends the last message on the next connection (the
    coordinator answers a step it already moved past with the history the device missed).

    Args:
        loop: the client's event loop. send: the client's ``_send`` coroutine function.
        stop: set when the device stops. timeout_s: longest wait for one answer (seconds).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[Message], Any],
        stop: threading.Event,
        timeout_s: float = 900.0,
    ):
        self.loop, self.send, self.stop, self.timeout_s = loop, send, stop, timeout_s
        self.replies: queue.Queue[Message] = queue.Queue()
        self.last: Message | None = None

    def exchange(self, msg: Message) -> Message:
        """Send ``msg``; the coordinator's answer. Raises DataError: stopping, or no answer in ``timeout_s``."""
        self.last = msg
        asyncio.run_coroutine_threadsafe(self.send(msg), self.loop).result()
        waited = 0.0
        while waited < self.timeout_s:
            if self.stop.is_set():
                raise DataError("split step abandoned: the device is stopping")
            try:
                reply = self.replies.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                continue
            self.last = None
            if isinstance(reply, Error):
                raise ProtocolError(reply.code if reply.code in ERROR_CODES else "internal", reply.message)
            return reply
        raise DataError(f"no answer from the coordinator in a split step for {self.timeout_s:.0f} s")


class DeviceClient:
    """A long-running device: connect, authenticate, train assignments, upload updates, reconnect.

    Args:
        url: coordinator URL (``ws://`` or ``wss://``).
        credentials: from :func:`enroll` / ``auth.load_credentials``.
        data_file: local JSONL training data.
        cache_dir: state directory: ``bundles/`` (bundle cache) and ``updates/`` (unacknowledged updates).
        cafile: CA certificate for ``wss://``. max_message_mib: largest websocket message (MiB; match the
            coordinator's). threads: ORT intra-op threads (None: one per core).
        memory_mib: the memory budget reported to the coordinator (MiB; default: memory available now).
        profile: the profile sent in Hello (default: measured once at start).
        heartbeat_s: seconds between Heartbeat messages. backoff: reconnect delays.
        cache_bundles, cache_mib: bundle cache bounds (count, MiB).
        template: prompt template of classification records.
        backend: training backend (``device_runtime.backends``; None: the first installed).
        insecure: allow a plain ``ws://`` URL although this device enrolled at a TLS coordinator (its
            bundles and assignments are still verified against the pinned key, ``device_runtime.signing``).
        reuse_trainer: keep the training session from round to round while the bundle stays the same
            (``device_runtime.trainer_cache``); False: a fresh one (fresh AdamW moments) every round.

    Raises:
        ConfigError: bad URL, TLS files, backend or pinned CA certificate.
    """

    def __init__(
        self,
        url: str,
        credentials: Credentials,
        data_file: str | Path,
        *,
        cache_dir: str | Path,
        cafile: str | Path | None = None,
        max_message_mib: float = 256.0,
        threads: int | None = None,
        memory_mib: int | None = None,
        profile: dict[str, Any] | None = None,
        heartbeat_s: float = 20.0,
        backoff: Backoff = Backoff(),
        cache_bundles: int = 4,
        cache_mib: float = 4096.0,
        template: str = DEFAULT_TEMPLATE,
        backend: str | None = None,
        insecure: bool = False,
        reuse_trainer: bool = True,
    ):
        self.context = _client_context(url, credentials, cafile, insecure)  # fails fast on a bad URL / TLS file
        verifier = _verifier(credentials)
        self.verify = None if verifier is None else verifier.assignment(credentials.device_id)
        self.backend = select_backend(backend).name  # fail fast on a backend not installed here
        self.url, self.credentials, self.data_file = url, credentials, Path(data_file)
        self.max_size, self.threads, self.memory_mib = int(max_message_mib * MIB), threads, memory_mib
        self.profile, self.heartbeat_s, self.backoff, self.template = profile, heartbeat_s, backoff, template
        root = Path(cache_dir)
        self.cache = BundleCache(
            root / "bundles", max_bundles=cache_bundles, max_bytes=int(cache_mib * MIB), verifier=verifier
        )
        self.store = UpdateStore(root / "updates")
        self.session = DeviceSession(
            cached=self.cache.ids(),
            known_updates=self.store.pending_ids(),
            max_bundle_bytes=self.cache.max_bytes,
            staging=self.cache.staging_dir,
        )
        self.trainers = TrainerCache(
            reuse=reuse_trainer, memory_limit_bytes=None if memory_mib is None else int(memory_mib * MIB)
        )
        self.secure = SecureRounds(credentials.device_id)  # secure-aggregation rounds (device_runtime.secagg)
        self._masking: set[asyncio.Task[None]] = set()
        self._tickets: dict[str, Ticket] = {}  # update_id -> its place in the training slots queue (slots.py)
        self.connections = 0  # successful authentications so far
        self._ws: ClientConnection | None = None
        self._queue: asyncio.Queue[Assignment | None] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._stop_training = threading.Event()
        self._link: ThreadLink | None = None  # the split trainer's, while a split assignment trains

    # ------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Stop: abandon training after the current step, close the connection (call from the loop's thread)."""
        self._stop_training.set()
        self._stopping.set()
        if self._ws is not None:
            asyncio.ensure_future(self._ws.close(1001, "device stopping"))

    async def run(self) -> None:
        """Serve until :meth:`stop`.

        Raises:
            AuthError: the coordinator rejected this device's key (enroll again).
            ConfigError: bad URL / CA file, or the coordinator speaks another protocol version.
        """
        if self.profile is None:
            self.profile = await asyncio.to_thread(device_profile, self.memory_mib, backend=self.backend)
        worker = asyncio.create_task(self._work())
        attempt = 0
        try:
            while not self._stopping.is_set():
                before = self.connections
                try:
                    await self._connection()
                except (OSError, ConnectionClosed, InvalidHandshake, ProtocolError, TimeoutError) as exc:
                    if self._stopping.is_set():
                        break
                    log.warning("connection to %s lost: %s: %s", self.url, type(exc).__name__, exc)
                attempt = 0 if self.connections > before else attempt + 1
                if not self._stopping.is_set():
                    await self._sleep(self.backoff.delay(attempt))
        finally:
            self._stop_training.set()
            self._queue.put_nowait(None)  # wake the worker; it ends after the current step
            await asyncio.gather(worker, return_exceptions=True)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    # ------------------------------------------------------------ one connection

    async def _connection(self) -> None:
        try:
            async with _connect(
                self.url, self.context, self.max_size, ping_interval=self.heartbeat_s, ping_timeout=3 * self.heartbeat_s
            ) as ws:
                await self._authenticate(ws)
                self.connections += 1
                if self._stopping.is_set():  # stop() came during the handshake, before there was a _ws to close
                    return
                self._ws = ws
                heartbeat = asyncio.create_task(self._heartbeat(ws))
                try:
                    await self._resend_pending(ws)
                    if self._link is not None and self._link.last is not None:  # a split step lost with the connection
                        await ws.send(encode(self._link.last))
                    await self._serve(ws)
                finally:
                    self._ws = None
                    heartbeat.cancel()
                    self.session.connection_lost()
        except InvalidURI as exc:
            raise ConfigError(f"invalid coordinator URL {self.url!r}: {exc}") from exc

    async def _authenticate(self, ws: ClientConnection) -> None:
        creds, profile = self.credentials, self.profile
        if profile is None:
            raise RuntimeError("the device profile is measured before the first connection")
        await ws.send(encode(Hello(device_id=creds.device_id, protocol_version=PROTOCOL_VERSION, profile=profile)))
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            challenge = _expect(await _recv(ws, self.max_size), Challenge)
            signature = sign_challenge(creds.private_key, challenge.nonce, creds.device_id)
            await ws.send(encode(Auth(device_id=creds.device_id, signature=signature)))
            _expect(await _recv(ws, self.max_size), AuthOk)
        log.info("authenticated as %s at %s", creds.device_id, self.url)

    async def _resend_pending(self, ws: ClientConnection) -> None:
        for update in self.store.pending():
            log.info("re-sending update %s (round %d)", update.update_id, update.round_id)
            await ws.send(fragments(encode_parts(update)))
        for masked in list(self.secure.unacked.values()):
            log.info("re-sending masked update %s (round %d)", masked.update_id, masked.round_id)
            await ws.send(fragments(encode_parts(masked)))

    async def _heartbeat(self, ws: ClientConnection) -> None:
        try:
            while True:
                await asyncio.sleep(self.heartbeat_s)
                await ws.send(encode(Heartbeat()))
        except ConnectionClosed:
            pass

    async def _serve(self, ws: ClientConnection) -> None:
        """Until the connection closes: decode each frame, let the session react, carry out its actions."""
        while True:
            try:
                msg = await _recv(ws, self.max_size, self.verify)
            except ProtocolError as exc:
                log.log(
                    logging.ERROR if exc.code == "bad_signature" else logging.WARNING,
                    "frame from the coordinator refused: %s: %s",
                    exc.code,
                    exc,
                )
                await self._apply(self.session.on_frame_error(exc))
                continue
            if isinstance(msg, Error) and self._link is not None:  # e.g. the coordinator refused our smashed data
                self._link.replies.put(msg)
            await self._apply(self.session.on_message(msg))

    # ------------------------------------------------------------ actions

    async def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                await self._send(action.message)
            elif isinstance(action, InstallBundle):
                await self._apply(await self._install(action))
            elif isinstance(action, Train):
                if action.assignment.config.split is None:  # split devices step together, outside the slots
                    self._take_ticket(action.assignment.update_id)
                self._queue.put_nowait(action.assignment)
            elif isinstance(action, Acked):
                self._acked(action)
            elif isinstance(action, SplitReply):
                if self._link is None:
                    log.warning("%s outside a split step ignored", action.message.TYPE)
                else:
                    self._link.replies.put(action.message)
            elif isinstance(action, Secure):
                await self._secure_step(action.message)
            elif isinstance(action, Report):
                log.log(logging.WARNING if action.level == "warning" else logging.INFO, "%s", action.text)

    def _take_ticket(self, update_id: str) -> None:
        """Queue ``update_id`` for a training slot now, as it arrives (``device_runtime.slots``); a slot
        directory that cannot be used is reported when training asks for the slot."""
        try:
            queued = ticket()
        except (ConfigError, OSError) as exc:
            log.warning("no place in the training slots' queue for %s: %s", update_id, exc)
            return
        if queued is not None:
            self._tickets[update_id] = queued

    async def _send(self, msg: Message) -> None:
        """Send on the current connection, if any (a lost message is recovered by the next connection)."""
        await self._send_frame(encode_parts(msg), msg.TYPE)

    async def _send_frame(self, parts: Sequence[bytes | memoryview], kind: str) -> None:
        """:meth:`_send` of an encoded ``kind`` message (its frame, or parts of it: ``wire.encode_parts``), in
        fragments of ``wire.FRAGMENT_BYTES``: nothing the size of an update is copied on its way out."""
        ws = self._ws
        if ws is None:
            return
        try:
            await ws.send(fragments(parts))
        except ConnectionClosed:
            log.info("connection closed before %s could be sent", kind)

    async def _install(self, action: InstallBundle) -> list[Action]:
        try:
            with timed(log, "install_bundle"):
                await asyncio.to_thread(self.cache.install, action.shape_key_id, action.files, digests=action.digests)
        except BundleSignatureError as exc:
            log.error("bundle %s refused: %s", action.shape_key_id, exc)
            return self.session.bundle_rejected(action.shape_key_id, "bad_signature", str(exc))
        except BundleIntegrityError as exc:
            return self.session.bundle_rejected(action.shape_key_id, "bad_payload", str(exc))
        except BundleError as exc:
            return self.session.bundle_rejected(action.shape_key_id, "bad_header", str(exc))
        finally:
            shutil.rmtree(action.directory, ignore_errors=True)
        cached = set(self.cache.ids())
        for evicted in self.session.cached - cached - {action.shape_key_id}:
            self.session.bundle_evicted(evicted)
        log.info("bundle %s verified and cached", action.shape_key_id)
        return self.session.bundle_installed(action.shape_key_id)

    async def _secure_step(self, msg: Message) -> None:
        """Answer a coordinator's secure-aggregation step; one that does not fit is refused with an Error (the
        coordinator then counts this device out of the round)."""
        try:
            reply = await asyncio.to_thread(self.secure.answer, msg)
        except ProtocolError as exc:
            log.warning("secure aggregation step %s refused: %s", msg.TYPE, exc)
            await self._send(Error(code=exc.code, message=f"{getattr(msg, 'update_id', '?')}: {exc}"[:2000]))
            return
        self.secure.arrived(msg)
        if reply is not None:
            await self._send(reply)

    async def _send_masked(
        self, update: Update, bundle: Bundle, assignment: Assignment, base: dict[str, np.ndarray]
    ) -> None:
        """Mask ``update`` once its round's inbox arrived and send it (``SecureRounds.masked``)."""
        try:
            masked = await self.secure.masked(update, bundle.manifest, assignment.expert_ids, base)
        except ProtocolError as exc:
            await self._report_failure(update.update_id, exc)
            return
        if masked is not None:
            log.info("round %d: sending masked update %s", update.round_id, update.update_id)
            await self._send(masked)

    async def _report_failure(self, update_id: str, exc: BaseException) -> None:
        """Tell the coordinator that ``update_id`` will get no Update (it rejects the assignment at once)."""
        code = exc.code if isinstance(exc, ProtocolError) else "internal"
        await self._send(Error(code=code, message=f"{update_id}: {type(exc).__name__}: {exc}"[:2000]))

    def _acked(self, ack: Acked) -> None:
        self.store.acked(ack.update_id)
        self.secure.acked(ack.update_id)
        if ack.accepted:
            log.info("update %s accepted", ack.update_id)
        else:
            log.warning("update %s rejected by the coordinator: %s", ack.update_id, ack.reason)

    # ------------------------------------------------------------ training worker

    async def _work(self) -> None:
        """Train queued assignments one at a time, in a thread; store, then send each Update."""
        while True:
            assignment = await self._queue.get()
            if assignment is None or self._stop_training.is_set():
                return
            try:
                await self._train(assignment)
            except Exception as exc:  # a bug or a full disk must not end the device: log it, serve the next round
                self.session.forget(assignment.update_id)
                log.exception("round %d: handling assignment %s failed", assignment.round_id, assignment.update_id)
                await self._report_failure(assignment.update_id, exc)  # the round need not wait for us

    async def _train(self, assignment: Assignment) -> None:
        queued = self._tickets.pop(assignment.update_id, None)
        try:
            await self._train_queued(assignment, queued)
        finally:
            if queued is not None:
                queued.close()

    async def _train_queued(self, assignment: Assignment, queued: Ticket | None) -> None:
        uid = assignment.update_id
        with timed(log, "open_bundle", round=assignment.round_id):
            bundle = await asyncio.to_thread(self.cache.get, assignment.shape_key.id)
        if bundle is None:
            self.session.forget(uid)
            log.warning("bundle %s vanished from the cache; assignment %s skipped", assignment.shape_key.id, uid)
            return
        log.info("round %d: training %s on %s", assignment.round_id, bundle.manifest.shape_key.id, self.data_file)
        extra = {} if self.memory_mib is None else {"memory_budget_mib": float(self.memory_mib)}
        split = assignment.config.split is not None
        if split:
            self._link = ThreadLink(asyncio.get_running_loop(), self._send, self._stop_training)
        secure = self.secure.expects(uid)
        base = await asyncio.to_thread(_received_trainable, bundle, assignment) if secure else {}
        try:
            update = await asyncio.to_thread(
                fit_assignment if split else functools.partial(_fit_in_slot, queued),  # split: no slot to queue for
                bundle,
                assignment,
                self.data_file,
                threads=self.threads,
                stop=self._stop_training,
                template=self.template,
                extra_metrics=extra,
                backend=self.backend,
                trainers=self.trainers,
                link=self._link,
            )
        except (FedmoeError, OSError) as exc:
            self.session.forget(uid)
            if self._stop_training.is_set() and isinstance(exc, DataError):
                log.info("training of %s abandoned (stopping)", uid)
                return
            log.error("training of %s failed: %s: %s", uid, type(exc).__name__, exc)
            await self._report_failure(uid, exc)
            return
        finally:
            self._link = None
        if secure:  # masked once the round's inbox is here; the worker goes on meanwhile
            task = asyncio.create_task(self._send_masked(update, bundle, assignment, base))
            self._masking.add(task)
            task.add_done_callback(self._masking.discard)
            return
        _log_fit_timings(update)
        start = time.perf_counter()
        frame = await asyncio.to_thread(encode, update)  # serialised once: the stored record and the frame share it
        encoded = time.perf_counter()
        await asyncio.to_thread(self.store.put, update, payload=frame_payload(frame))  # on disk before it is sent
        stored = time.perf_counter()
        update.tensors.clear()  # in the frame now: one copy fewer while it is sent
        log.info(
            "round %d: loss %.4f, %d steps, peak RSS %.0f MiB; sending update %s",
            assignment.round_id,
            update.metrics["loss"],
            int(update.metrics["steps"]),
            update.metrics["peak_rss_mb"],
            uid,
        )
        await self._send_frame([frame], update.TYPE)
        log_timing(log, "encode_update", encoded - start, round=assignment.round_id, bytes=len(frame))
        log_timing(log, "store_update", stored - encoded, round=assignment.round_id, bytes=len(frame))
        log_timing(log, "send_update", time.perf_counter() - stored, round=assignment.round_id, bytes=len(frame))
        del update, frame
        release_memory()  # the round's assignment and update (and a trainer not kept) are garbage now


def _received_trainable(bundle: Bundle, assignment: Assignment) -> dict[str, np.ndarray]:
    """A float32 copy of the assignment's trainable tensors, the rows a secure update's deltas are taken from
    (``fit_assignment`` frees the assignment's own)."""
    return {n: np.array(assignment.tensors[n], np.float32) for n in bundle.manifest.trainable_names}


def _fit_in_slot(queued: Ticket | None, *args: Any, **kwargs: Any) -> Update:
    """``fit_assignment`` while holding a training slot (``$FEDMOE_TRAINING_SLOTS``, see device_runtime.slots),
    served in the order of ``queued`` (the assignment's ticket, taken when it arrived; None: now)."""
    start = time.perf_counter()
    with training_slot(queued=queued):
        log_timing(log, "slot_wait", time.perf_counter() - start)
        return fit_assignment(*args, **kwargs)


_FIT_PHASES = {
    "load": "load_seconds",
    "evaluate": "eval_seconds",
    "train": "train_seconds",
    "collect": "collect_seconds",
}


def _log_fit_timings(update: Update) -> None:
    """The phases ``fit_assignment`` measured (its metrics), as timing lines (``device_runtime.timing``)."""
    for phase, metric in _FIT_PHASES.items():
        if metric in update.metrics:
            log_timing(log, phase, update.metrics[metric], round=update.round_id)


def run_until_signal(client: DeviceClient) -> None:
    """Blocking: run ``client`` until SIGTERM / SIGINT, which stop it cleanly (see :meth:`DeviceClient.stop`)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, client.stop)
        await client.run()

    asyncio.run(main())
