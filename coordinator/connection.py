"""One device connection's protocol decisions, without I/O (in the style of websockets' sans-I/O ``Protocol``).

:class:`CoordinatorConnection` is fed the decoded messages a device sends (:meth:`~CoordinatorConnection.on_message`)
and the frames that failed to decode (:meth:`~CoordinatorConnection.on_bad_frame`), with the time ``now``
(seconds, monotonic), and answers with a list of :data:`Action` for ``coordinator.server`` to carry out in order.
It never awaits, reads a socket or a clock; the registry is reached through the :class:`DeviceDirectory` port and
the per-address and per-device limits through the :class:`Limits` port (``coordinator.admission.Admission``), the
batched ``last_seen`` writes through the :class:`LastSeen` port (``coordinator.presence.Presence``).

Per connection (see the protocol module docstring)::

    [Enroll -> EnrollOk]*  Hello -> Challenge -> Auth -> AuthOk   then any of:
    BundleRequest -> BundleData...   Update -> Ack   Heartbeat   Error

States::

    OPEN --Enroll--> OPEN (EnrollOk)          OPEN --Hello--> CHALLENGED (Challenge)
    CHALLENGED --Auth--> LOGGED_IN (Login, AuthOk)
    CHALLENGED --bad frame--> OPEN (Error)    OPEN / CHALLENGED --refused--> CLOSED (Error "auth", Close)
    OPEN / CHALLENGED --budget spent--> CLOSED (Close)
    LOGGED_IN --message--> LOGGED_IN (HandleUpdate, HandleSplit, HandleSecure, SendBundle, HandleError or
        Error "unexpected")
    LOGGED_IN --rate exceeded or revoked (a message, or on_revoked)--> CLOSED (Close)

Before login, a connection may send at most :data:`MAX_PRE_LOGIN_MESSAGES` messages (a Hello and its Auth count
as one) of which at most :data:`MAX_BAD_BEFORE_AUTH` malformed or out of place; then it is closed. Failed
enrollments are rate-limited per remote address (``Limits.may_enroll``). A Hello must speak
``PROTOCOL_VERSION`` and name an enrolled, unrevoked device whose key, with mutual TLS, is the key of the client
certificate the peer showed; its Auth must name the same device and sign the single-use challenge nonce
(``device_runtime.auth``). Authentication failures get ``Error("auth")`` and the connection is closed; other
malformed messages get ``Error(code)`` and the connection stays open.

After login, every message spends one of the device's message tokens (``Limits.take``: beyond the rate the
connection is closed), and before it is handled the registry is asked whether the device was revoked
(``fedmoe-coord devices revoke``, another process) since it logged in: before each message but a Heartbeat. An
idle device's revocation is found by the coordinator, which asks the registry for the revoked devices of all
connections at once every ``coordinator.presence.SWEEP_S`` and hands each of its connections to
:meth:`~CoordinatorConnection.on_revoked`. So a revoked device's live session ends at its next message or sweep,
whichever comes first, and its update or bundle request never counts. A Heartbeat marks the device's ``last_seen``
due (``LastSeen.seen``) at most every :data:`LAST_SEEN_EVERY_S`; the coordinator writes the due ones in one
registry call per sweep.

Error codes sent: ``auth`` (refused, then closed), ``rate`` (too many failed enrollments from the address),
``version`` (Hello of another protocol version), ``unexpected`` (a message out of place), and the codes of the
frames that failed to decode (``device_runtime.wire``); ``coordinator.server`` adds ``internal`` and the codes of
the errors raised while it carries out an action.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from device_runtime.auth import NonceBook, verify_challenge
from device_runtime.errors import AuthError, ProtocolError
from device_runtime.wire import (
    PROTOCOL_VERSION,
    SECURE_FROM_DEVICE,
    Auth,
    AuthOk,
    BundleRequest,
    Challenge,
    Enroll,
    EnrollOk,
    Error,
    Heartbeat,
    Hello,
    Message,
    SmashedData,
    SplitScalars,
    Update,
)

log = logging.getLogger("fedmoe.coord")
MAX_BAD_BEFORE_AUTH = 3  # malformed or out-of-place messages a connection may send before login
MAX_PRE_LOGIN_MESSAGES = 16  # Enroll / Hello / Auth messages one connection may send before it is logged in
CLOSE_POLICY = 1008  # websocket close code: policy violation
MAX_ERROR_CHARS = 2000  # longest ``Error.message`` sent
# A Heartbeat marks the device's ``last_seen`` due at most this often (seconds). Measured
# (bench/bench_connections.py, 1000 devices heartbeating every 10 s): one registry commit per Heartbeat took 53%
# of the event loop's time; the due ones are now written in one batch per sweep (``coordinator.presence``).
LAST_SEEN_EVERY_S = 60.0


# ---------------------------------------------------------------- ports


class DeviceRecord(Protocol):
    """An enrolled device as the registry returns it (``coordinator.registry.Device``)."""

    id: str
    public_key: bytes
    profile: dict

    @property
    def revoked(self) -> bool: ...


class DeviceDirectory(Protocol):
    """The registry calls a connection makes (``coordinator.registry.Registry`` provides them)."""

    def redeem_token(self, token: str, name: str, profile: dict, public_key: bytes) -> DeviceRecord:
        """Enroll a device with a single-use token. Raises AuthError (refused, nothing recorded)."""

    def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, revoked or not; None if unknown."""

    def touch_device(self, device_id: str, profile: dict | None = None) -> None:
        """Set the device's ``last_seen`` to now (and replace its profile if given)."""

    def device_shape_keys(self, device_id: str) -> Iterable[str]:
        """The shape keys of the bundles the device was ever assigned."""


class LastSeen(Protocol):
    """The batched ``last_seen`` writes (``coordinator.presence.Presence`` provides them)."""

    def seen(self, device_id: str) -> None:
        """Write the device's ``last_seen`` with the next batch (one registry call for every device due)."""


class Limits(Protocol):
    """Per-address and per-device limits (``coordinator.admission.Admission`` provides them)."""

    def may_enroll(self, address: str) -> bool:
        """Whether ``address`` may try an enrollment (its failed ones are rate-limited)."""

    def enroll_failed(self, address: str) -> None:
        """An enrollment from ``address`` was refused: spend one of its tries."""

    def take(self, device_id: str) -> bool:
        """Spend one of the device's message tokens; False when none is left."""


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Send:
    """Send ``message`` to the device."""

    message: Message


@dataclass(frozen=True)
class Close:
    """Close the connection with websocket close ``code`` and ``reason``; no further action follows."""

    code: int
    reason: str


@dataclass(frozen=True)
class Login:
    """The device authenticated: replace its older connection, allow frames as large as an update to
    assignments of ``shape_keys`` needs, and start its session with ``profile``."""

    device_id: str
    profile: dict
    shape_keys: frozenset[str]


@dataclass(frozen=True)
class HandleUpdate:
    """Hand ``update`` to the coordinator and send the device its Ack."""

    update: Update


@dataclass(frozen=True)
class HandleSplit:
    """Hand a split device's step message (``SmashedData`` / ``SplitScalars``) to the coordinator, which answers
    it (and the step's other devices) when the step allows."""

    message: SmashedData | SplitScalars


@dataclass(frozen=True)
class SendBundle:
    """Send the device the bundle of ``shape_key_id`` in BundleData chunks."""

    shape_key_id: str


@dataclass(frozen=True)
class HandleSecure:
    """Hand a secure-aggregation ``message`` (keys, shares, masked result, reveal) to the coordinator and send
    the device its answer, if any (an Ack for a masked result)."""

    message: Message


@dataclass(frozen=True)
class HandleError:
    """Hand the device's ``error`` (it failed its assignment, say) to the coordinator."""

    error: Error


Action = Send | Close | Login | HandleUpdate | HandleSplit | SendBundle | HandleError | HandleSecure


def refusal(code: str, message: str) -> Send:
    """Send ``Error(code, message)``, the message cut to :data:`MAX_ERROR_CHARS`."""
    return Send(Error(code=code, message=message[:MAX_ERROR_CHARS]))


# ---------------------------------------------------------------- the connection


@dataclass(frozen=True)
class Challenged:
    """A Hello answered with a Challenge: the device it named and the nonce sent."""

    hello: Hello
    device: DeviceRecord
    nonce: bytes


class State(enum.Enum):
    """Where a connection is in the protocol (the module docstring draws the transitions)."""

    OPEN = "open"  # before login: Enroll or Hello expected
    CHALLENGED = "challenged"  # a Challenge was sent: its Auth expected
    LOGGED_IN = "logged_in"
    CLOSED = "closed"  # a Close action was returned: nothing more is handled


class CoordinatorConnection:
    """The protocol state of one device connection (see the module docstring).

    Args:
        devices: the registry.
        limits: enrollment and message rate limits.
        last_seen: where a Heartbeat marks the device's ``last_seen`` due.
        nonces: challenge nonces, shared by all connections.
        address: the remote address (failed enrollments are counted per address).
        mutual_tls: whether a device must log in with the client certificate of its enrolled key.
        peer_key: the raw Ed25519 key of the client certificate the peer showed, if any.
    """

    def __init__(
        self,
        devices: DeviceDirectory,
        limits: Limits,
        nonces: NonceBook,
        last_seen: LastSeen,
        *,
        address: str,
        mutual_tls: bool = False,
        peer_key: bytes | None = None,
    ):
        self.devices, self.limits, self.nonces, self.last_seen = devices, limits, nonces, last_seen
        self.address, self.mutual_tls, self.peer_key = address, mutual_tls, peer_key
        self.state = State.OPEN
        self.device_id: str | None = None  # set at login
        self.pre_login_messages = self.bad_before_auth = 0
        self.challenged: Challenged | None = None  # while CHALLENGED
        self.seen_at = 0.0  # ``now`` of the login or the last Heartbeat that marked ``last_seen`` due (seconds)

    def on_message(self, msg: Message, now: float) -> list[Action]:
        """The actions answering ``msg``, received at ``now`` (seconds, monotonic); none after a Close.

        Raises:
            Whatever the :class:`DeviceDirectory` raises but AuthError (a registry failure, say).
        """
        if self.state is State.OPEN:
            return self._pre_login(msg)
        if self.state is State.CHALLENGED:
            return self._answer(msg, now)
        if self.state is State.LOGGED_IN:
            return self._serve(msg, now)
        return []

    def on_bad_frame(self, exc: ProtocolError) -> list[Action]:
        """The actions answering a frame that failed to decode with ``exc``: ``Error(exc.code)``, and before login
        it counts against the message budget (a frame in place of an Auth counts with its Hello)."""
        if self.state is State.CLOSED:
            return []
        if self.state is State.LOGGED_IN:
            return [refusal(exc.code, str(exc))]
        if self.state is State.OPEN:
            self.pre_login_messages += 1
        return self._bad(exc)

    def on_revoked(self) -> list[Action]:
        """The actions once the registry says the logged-in device was revoked (the coordinator's sweep):
        ``Error("auth")`` and Close; none before login (the Hello checks) or after a Close."""
        if self.state is not State.LOGGED_IN:
            return []
        self.state = State.CLOSED
        return [
            refusal("auth", "this device was revoked; enroll it again to rejoin"),
            Close(CLOSE_POLICY, "device revoked"),
        ]

    # ------------------------------------------------------------ before login

    def _pre_login(self, msg: Message) -> list[Action]:
        self.pre_login_messages += 1
        try:
            if isinstance(msg, Enroll):
                return [self._enroll(msg), *self._over_budget()]
            if isinstance(msg, Hello):
                return [self._challenge(msg)]
            raise ProtocolError("unexpected", f"{msg.TYPE} before authentication; send hello first")
        except ProtocolError as exc:
            return self._bad(exc)
        except AuthError as exc:
            return self._refuse(exc)

    def _enroll(self, msg: Enroll) -> Send:
        """Redeem the token. Raises AuthError (refused), ProtocolError (too many failed enrollments from this
        address)."""
        if not self.limits.may_enroll(self.address):
            raise ProtocolError(
                "rate",
                "too many failed enrollments from this address; wait a minute, then "
                "enroll with a fresh token from `fedmoe-coord enroll`",
            )
        try:
            device = self.devices.redeem_token(msg.token, msg.name, msg.profile, msg.public_key)
        except AuthError:
            self.limits.enroll_failed(self.address)
            raise
        log.info("enrolled device %s (%s)", device.id, msg.name)
        return Send(EnrollOk(device_id=device.id))

    def _challenge(self, hello: Hello) -> Send:
        """Check the Hello and issue a single-use nonce. Raises ProtocolError (version), AuthError (unknown,
        revoked, or not the key of the peer's client certificate)."""
        if hello.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError("version", f"device speaks v{hello.protocol_version}, coordinator v{PROTOCOL_VERSION}")
        device = self._enrolled(hello.device_id)
        if self.mutual_tls and self.peer_key != device.public_key:
            raise AuthError(
                f"device {device.id} must log in over mutual TLS with the client certificate issued "
                "for its key at enrollment; enroll again with this fedmoe version"
            )
        self.state, self.challenged = State.CHALLENGED, Challenged(hello, device, self.nonces.issue())
        return Send(Challenge(nonce=self.challenged.nonce))

    def _answer(self, auth: Message, now: float) -> list[Action]:
        try:
            return self._login(auth, now)
        except AuthError as exc:
            return self._refuse(exc)

    def _login(self, auth: Message, now: float) -> list[Action]:
        """Check the Auth answering the Challenge. Raises AuthError: not an Auth of the device that said hello,
        a spent or expired nonce, or a bad signature."""
        hello, device, nonce = self.challenged.hello, self.challenged.device, self.challenged.nonce
        if not isinstance(auth, Auth) or auth.device_id != device.id:
            raise AuthError("expected auth for the device that said hello")
        self.nonces.consume(nonce)
        verify_challenge(device.public_key, nonce, device.id, auth.signature)
        self.devices.touch_device(device.id, hello.profile or None)
        self.seen_at = now
        shape_keys = frozenset(self.devices.device_shape_keys(device.id))
        self.state, self.device_id, self.challenged = State.LOGGED_IN, device.id, None
        log.info("device %s authenticated", device.id)
        return [Login(device.id, hello.profile or device.profile, shape_keys), Send(AuthOk())]

    def _enrolled(self, device_id: str) -> DeviceRecord:
        """The device. Raises AuthError: unknown or revoked."""
        device = self.devices.get_device(device_id)
        if device is None or device.revoked:
            raise AuthError(f"device {device_id} is unknown or revoked; enroll again")
        return device

    def _bad(self, exc: ProtocolError) -> list[Action]:
        """A malformed or out-of-place message before login: ``Error(code)``, then back to OPEN (or closed once
        the budget is spent)."""
        self.bad_before_auth += 1
        self.state, self.challenged = State.OPEN, None
        return [refusal(exc.code, str(exc)), *self._over_budget()]

    def _over_budget(self) -> list[Action]:
        if self.bad_before_auth < MAX_BAD_BEFORE_AUTH and self.pre_login_messages < MAX_PRE_LOGIN_MESSAGES:
            return []
        self.state = State.CLOSED
        return [Close(CLOSE_POLICY, "too many messages before login")]

    def _refuse(self, exc: AuthError) -> list[Action]:
        self.state = State.CLOSED
        return [refusal("auth", str(exc)), Close(CLOSE_POLICY, "authentication failed")]

    # ------------------------------------------------------------ logged in

    def _serve(self, msg: Message, now: float) -> list[Action]:
        if not self.limits.take(self.device_id):
            log.warning("device %s exceeded the message rate; disconnecting it", self.device_id)
            self.state = State.CLOSED
            return [Close(CLOSE_POLICY, "message rate exceeded")]
        if not isinstance(msg, Heartbeat) and self._revoked():
            return self.on_revoked()
        return self._dispatch(msg, now)

    def _revoked(self) -> bool:
        """Whether the device was revoked since it logged in (one registry query)."""
        device = self.devices.get_device(self.device_id)
        return device is None or device.revoked

    def _dispatch(self, msg: Message, now: float) -> list[Action]:
        if isinstance(msg, Update):
            return [HandleUpdate(msg)]
        if isinstance(msg, (SmashedData, SplitScalars)):
            return [HandleSplit(msg)]
        if isinstance(msg, SECURE_FROM_DEVICE):
            return [HandleSecure(msg)]
        if isinstance(msg, BundleRequest):
            return [SendBundle(msg.shape_key_id)]
        if isinstance(msg, Heartbeat):
            self._heartbeat(now)
            return []
        if isinstance(msg, Error):
            return [HandleError(msg)]
        return [refusal("unexpected", f"{msg.TYPE} is not expected from an authenticated device")]

    def _heartbeat(self, now: float) -> None:
        """Mark the device's ``last_seen`` due, at most every :data:`LAST_SEEN_EVERY_S` seconds."""
        if now - self.seen_at >= LAST_SEEN_EVERY_S:
            self.last_seen.seen(self.device_id)
            self.seen_at = now
