"""The protocol decisions of a device connection (``coordinator.connection``), without I/O: no server, no
sockets, no torch. An in-memory device directory stands in for the registry; every test checks the exact
actions returned."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from coordinator.admission import ENROLL_FAILURE_BURST, Admission
from coordinator.connection import (
    CLOSE_POLICY,
    LAST_SEEN_EVERY_S,
    MAX_BAD_BEFORE_AUTH,
    MAX_ERROR_CHARS,
    MAX_PRE_LOGIN_MESSAGES,
    Close,
    CoordinatorConnection,
    HandleError,
    HandleUpdate,
    Login,
    Send,
    SendBundle,
    State,
    refusal,
)
from device_runtime.auth import NonceBook, generate_keypair, sign_challenge
from device_runtime.errors import AuthError, ProtocolError
from device_runtime.wire import (
    PROTOCOL_VERSION,
    Auth,
    AuthOk,
    BundleRequest,
    Challenge,
    Enroll,
    EnrollOk,
    Error,
    Heartbeat,
    Hello,
    Update,
)

ADDRESS = "192.0.2.7"
T0 = 1000.0  # ``now`` at login (seconds)
AUTH_FAILED = Close(CLOSE_POLICY, "authentication failed")
TOO_MANY = Close(CLOSE_POLICY, "too many messages before login")


@dataclass
class FakeDevice:
    id: str
    public_key: bytes
    profile: dict
    revoked: bool = False


@dataclass
class FakeDirectory:
    """The registry calls of a connection, in memory, with a log of lookups and touches; also the batched
    ``last_seen`` writes (``LastSeen``), logged in ``due``."""

    devices: dict[str, FakeDevice] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    shape_keys: dict[str, set[str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    touches: list[tuple[str, dict | None]] = field(default_factory=list)
    due: list[str] = field(default_factory=list)  # LastSeen.seen calls

    def redeem_token(self, token: str, name: str, profile: dict, public_key: bytes) -> FakeDevice:
        if token not in self.tokens:
            raise AuthError("enrollment token already used; create one with `fedmoe-coord enroll --name NAME`")
        self.tokens.remove(token)
        return self.add(f"d-{name}", public_key, profile)

    def get_device(self, device_id: str) -> FakeDevice | None:
        self.lookups.append(device_id)
        return self.devices.get(device_id)

    def touch_device(self, device_id: str, profile: dict | None = None) -> None:
        self.touches.append((device_id, profile))

    def seen(self, device_id: str) -> None:
        self.due.append(device_id)

    def device_shape_keys(self, device_id: str) -> set[str]:
        return self.shape_keys.get(device_id, set())

    def add(self, device_id: str, public_key: bytes, profile: dict) -> FakeDevice:
        self.devices[device_id] = FakeDevice(device_id, public_key, profile)
        return self.devices[device_id]


@dataclass
class FakeLimits:
    """Enrollment always allowed, ``tokens`` messages per device; records failed enrollments."""

    tokens: int = 1_000_000
    failed: list[str] = field(default_factory=list)

    def may_enroll(self, address: str) -> bool:
        return True

    def enroll_failed(self, address: str) -> None:
        self.failed.append(address)

    def take(self, device_id: str) -> bool:
        self.tokens -= 1
        return self.tokens >= 0


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def directory():
    return FakeDirectory()


@pytest.fixture
def nonces():
    return NonceBook(clock=Clock())


@pytest.fixture
def device(directory):
    """``(device_id, private_key)`` of an enrolled device with profile ``{"memory_mib": 10}``."""
    private, public = generate_keypair()
    directory.add("d-1", public, {"memory_mib": 10})
    directory.shape_keys["d-1"] = {"experts-2.2"}
    return "d-1", private


def connection(directory, nonces, limits=None, **kwargs) -> CoordinatorConnection:
    return CoordinatorConnection(directory, limits or FakeLimits(), nonces, directory, address=ADDRESS, **kwargs)


def hello(device_id, *, profile=None, version=PROTOCOL_VERSION) -> Hello:
    return Hello(device_id=device_id, protocol_version=version, profile=profile or {})


def challenge(conn, device_id, **kwargs) -> bytes:
    """Send Hello; returns the nonce of the Challenge."""
    [action] = conn.on_message(hello(device_id, **kwargs), T0)
    assert isinstance(action, Send) and isinstance(action.message, Challenge), action
    assert conn.state is State.CHALLENGED
    return action.message.nonce


def auth(private, nonce, device_id) -> Auth:
    return Auth(device_id=device_id, signature=sign_challenge(private, nonce, device_id))


def logged_in(directory, nonces, device, limits=None) -> CoordinatorConnection:
    device_id, private = device
    conn = connection(directory, nonces, limits)
    nonce = challenge(conn, device_id)
    conn.on_message(auth(private, nonce, device_id), T0)
    assert conn.state is State.LOGGED_IN
    return conn


def enroll_message(token="t", name="phone") -> Enroll:
    return Enroll(token=token, name=name, profile={"memory_mib": 10}, public_key=generate_keypair()[1])


def refused(reason: str) -> list:
    """The actions of an authentication failure."""
    return [refusal("auth", reason), AUTH_FAILED]


# ---------------------------------------------------------------- enrollment


def test_enrollment_redeems_the_token_and_the_connection_stays_open(directory, nonces):
    directory.tokens.add("good")
    conn = connection(directory, nonces)
    assert conn.on_message(enroll_message("good", "phone"), T0) == [Send(EnrollOk(device_id="d-phone"))]
    assert conn.state is State.OPEN and "d-phone" in directory.devices


def test_a_refused_enrollment_closes_and_counts_against_the_address(directory, nonces):
    limits = FakeLimits()
    conn = connection(directory, nonces, limits)
    assert conn.on_message(enroll_message("spent"), T0) == refused(
        "enrollment token already used; create one with `fedmoe-coord enroll --name NAME`"
    )
    assert conn.state is State.CLOSED and limits.failed == [ADDRESS]
    assert conn.on_message(enroll_message("spent"), T0) == []  # nothing after a Close


def test_failed_enrollments_are_rate_limited_per_address(directory, nonces):
    admission = Admission(100, 100)
    for _ in range(ENROLL_FAILURE_BURST):
        assert connection(directory, nonces, admission).on_message(enroll_message("bad"), T0)[-1] == AUTH_FAILED
    directory.tokens.add("good")  # even a good token is not tried now
    conn = connection(directory, nonces, admission)
    assert conn.on_message(enroll_message("good"), T0) == [
        refusal(
            "rate",
            "too many failed enrollments from this address; wait a minute, then "
            "enroll with a fresh token from `fedmoe-coord enroll`",
        )
    ]
    assert conn.state is State.OPEN and directory.tokens == {"good"}
    other = CoordinatorConnection(directory, admission, nonces, directory, address="192.0.2.8")
    assert other.on_message(enroll_message("good"), T0) == [Send(EnrollOk(device_id="d-phone"))]


# ---------------------------------------------------------------- the pre-login budget


def test_at_most_16_messages_before_login(directory, nonces):
    directory.tokens.update(f"t{i}" for i in range(MAX_PRE_LOGIN_MESSAGES))
    conn = connection(directory, nonces)
    for i in range(MAX_PRE_LOGIN_MESSAGES - 1):
        assert conn.on_message(enroll_message(f"t{i}", f"p{i}"), T0) == [Send(EnrollOk(device_id=f"d-p{i}"))]
    last = MAX_PRE_LOGIN_MESSAGES - 1
    assert conn.on_message(enroll_message(f"t{last}", "last"), T0) == [Send(EnrollOk(device_id="d-last")), TOO_MANY]
    assert conn.state is State.CLOSED


def test_a_bad_frame_before_login_counts_against_the_budget(directory, nonces):
    directory.tokens.update(f"t{i}" for i in range(MAX_PRE_LOGIN_MESSAGES))
    conn = connection(directory, nonces)
    conn.on_bad_frame(ProtocolError("bad_frame", "too short"))
    for i in range(MAX_PRE_LOGIN_MESSAGES - 2):
        assert conn.on_message(enroll_message(f"t{i}", f"p{i}"), T0) == [Send(EnrollOk(device_id=f"d-p{i}"))]
    assert conn.on_message(enroll_message("t15", "last"), T0) == [Send(EnrollOk(device_id="d-last")), TOO_MANY]


def test_a_hello_and_its_auth_count_as_one_message(directory, nonces, device):
    device_id, private = device
    directory.tokens.update(f"t{i}" for i in range(MAX_PRE_LOGIN_MESSAGES))
    conn = connection(directory, nonces)
    for i in range(MAX_PRE_LOGIN_MESSAGES - 1):
        conn.on_message(enroll_message(f"t{i}", f"p{i}"), T0)
    nonce = challenge(conn, device_id)  # the 16th
    assert conn.on_message(auth(private, nonce, device_id), T0)[-1] == Send(AuthOk())


def test_three_bad_messages_before_login_close_the_connection(directory, nonces, device):
    conn = connection(directory, nonces)
    assert conn.on_bad_frame(ProtocolError("bad_frame", "too short")) == [refusal("bad_frame", "too short")]
    assert conn.on_message(BundleRequest(shape_key_id="experts-2.2"), T0) == [
        refusal("unexpected", "bundle_request before authentication; send hello first")
    ]
    assert conn.on_message(hello(device[0], version=PROTOCOL_VERSION + 1), T0) == [
        refusal("version", f"device speaks v{PROTOCOL_VERSION + 1}, coordinator v{PROTOCOL_VERSION}"),
        TOO_MANY,
    ]
    assert conn.state is State.CLOSED and conn.bad_before_auth == MAX_BAD_BEFORE_AUTH


def test_a_bad_frame_in_place_of_the_auth_counts_with_its_hello_and_needs_a_new_hello(directory, nonces, device):
    device_id, private = device
    conn = connection(directory, nonces)
    nonce = challenge(conn, device_id)
    assert conn.on_bad_frame(ProtocolError("bad_header", "not JSON")) == [refusal("bad_header", "not JSON")]
    assert (conn.state, conn.pre_login_messages, conn.bad_before_auth) == (State.OPEN, 1, 1)
    assert conn.on_message(auth(private, nonce, device_id), T0) == [
        refusal("unexpected", "auth before authentication; send hello first")
    ]


def test_a_version_mismatch_is_an_error_and_the_connection_stays_open(directory, nonces, device):
    conn = connection(directory, nonces)
    assert conn.on_message(hello(device[0], version=2), T0) == [
        refusal("version", f"device speaks v2, coordinator v{PROTOCOL_VERSION}")
    ]
    assert conn.state is State.OPEN and directory.lookups == []


# ---------------------------------------------------------------- authentication


def test_login_touches_the_device_and_returns_its_session(directory, nonces, device):
    device_id, private = device
    conn = connection(directory, nonces)
    nonce = challenge(conn, device_id, profile={"memory_mib": 20})
    assert conn.on_message(auth(private, nonce, device_id), T0) == [
        Login(device_id, {"memory_mib": 20}, frozenset({"experts-2.2"})),
        Send(AuthOk()),
    ]
    assert conn.device_id == device_id and directory.touches == [(device_id, {"memory_mib": 20})]


def test_a_hello_without_profile_logs_in_with_the_enrolled_one(directory, nonces, device):
    device_id, private = device
    conn = connection(directory, nonces)
    nonce = challenge(conn, device_id)
    assert conn.on_message(auth(private, nonce, device_id), T0)[0] == Login(
        device_id, {"memory_mib": 10}, frozenset({"experts-2.2"})
    )
    assert directory.touches == [(device_id, None)]


@pytest.mark.parametrize("revoked", [False, True])
def test_an_unknown_or_revoked_device_is_refused(directory, nonces, device, revoked):
    device_id = device[0] if revoked else "d-nobody"
    directory.devices[device[0]].revoked = True
    conn = connection(directory, nonces)
    assert conn.on_message(hello(device_id), T0) == refused(f"device {device_id} is unknown or revoked; enroll again")
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("peer", ["other", None])
def test_with_mutual_tls_the_peer_certificate_must_hold_the_enrolled_key(directory, nonces, device, peer):
    device_id, private = device
    peer_key = generate_keypair()[1] if peer else None
    conn = connection(directory, nonces, mutual_tls=True, peer_key=peer_key)
    assert conn.on_message(hello(device_id), T0) == refused(
        f"device {device_id} must log in over mutual TLS with the client certificate issued "
        "for its key at enrollment; enroll again with this fedmoe version"
    )
    matching = connection(directory, nonces, mutual_tls=True, peer_key=directory.devices[device_id].public_key)
    challenge(matching, device_id)


def test_an_auth_for_another_device_or_another_message_is_refused(directory, nonces, device):
    device_id, private = device
    other, other_private = "d-2", generate_keypair()[0]
    directory.add(other, generate_keypair()[1], {})
    for answer in (lambda nonce: auth(other_private, nonce, other), lambda nonce: hello(device_id)):
        conn = connection(directory, nonces)
        nonce = challenge(conn, device_id)
        assert conn.on_message(answer(nonce), T0) == refused("expected auth for the device that said hello")


def test_a_wrong_signature_is_refused(directory, nonces, device):
    device_id = device[0]
    conn = connection(directory, nonces)
    nonce = challenge(conn, device_id)
    assert conn.on_message(auth(generate_keypair()[0], nonce, device_id), T0) == refused(
        f"device {device_id}: challenge signature does not verify"
    )


def test_a_nonce_works_once(directory, nonces, device):
    device_id, private = device
    first = connection(directory, nonces)
    stale = challenge(first, device_id)
    assert first.on_message(auth(private, stale, device_id), T0)[-1] == Send(AuthOk())
    with pytest.raises(AuthError, match="unknown or already used challenge nonce"):
        nonces.consume(stale)  # spent by the login
    replay = connection(directory, nonces)
    challenge(replay, device_id)  # a fresh challenge, answered with the old nonce's signature
    assert replay.on_message(auth(private, stale, device_id), T0) == refused(
        f"device {device_id}: challenge signature does not verify"
    )


def test_an_expired_nonce_is_refused(directory, device):
    device_id, private = device
    clock = Clock()
    conn = connection(directory, NonceBook(ttl_s=60.0, clock=clock))
    nonce = challenge(conn, device_id)
    clock.now += 61
    assert conn.on_message(auth(private, nonce, device_id), T0 + 61) == refused(
        "challenge expired (answer within 60 s); reconnect"
    )


# ---------------------------------------------------------------- logged in


def test_messages_are_dispatched(directory, nonces, device):
    conn = logged_in(directory, nonces, device)
    update = Update(
        update_id="r1-d-1", round_id=1, num_examples=1, num_tokens=1, metrics={}, routing={}, trained_experts=((0,),)
    )
    error = Error(code="internal", message="r1-d-1: DataError: no usable records")
    assert conn.on_message(update, T0) == [HandleUpdate(update)]
    assert conn.on_message(BundleRequest(shape_key_id="experts-2.2"), T0) == [SendBundle("experts-2.2")]
    assert conn.on_message(error, T0) == [HandleError(error)]
    assert conn.on_message(Heartbeat(), T0) == []


@pytest.mark.parametrize(
    "msg",
    [
        Hello(device_id="d-1", protocol_version=PROTOCOL_VERSION, profile={}),
        Auth(device_id="d-1", signature=bytes(64)),
        Challenge(nonce=bytes(32)),
        AuthOk(),
    ],
    ids=lambda m: m.TYPE,
)
def test_handshake_messages_after_login_are_unexpected(directory, nonces, device, msg):
    conn = logged_in(directory, nonces, device)
    assert conn.on_message(msg, T0) == [
        refusal("unexpected", f"{msg.TYPE} is not expected from an authenticated device")
    ]
    assert conn.state is State.LOGGED_IN


def test_a_bad_frame_after_login_is_an_error_and_spends_no_budget(directory, nonces, device):
    conn = logged_in(directory, nonces, device)
    for _ in range(MAX_BAD_BEFORE_AUTH + 1):
        assert conn.on_bad_frame(ProtocolError("unknown_type", "nope")) == [refusal("unknown_type", "nope")]
    assert conn.state is State.LOGGED_IN


def test_beyond_the_message_rate_the_connection_closes(directory, nonces, device):
    conn = logged_in(directory, nonces, device, FakeLimits(tokens=2))
    assert conn.on_message(Heartbeat(), T0) == conn.on_message(Heartbeat(), T0) == []
    assert conn.on_message(Heartbeat(), T0) == [Close(CLOSE_POLICY, "message rate exceeded")]
    assert conn.state is State.CLOSED and conn.on_message(Heartbeat(), T0) == []


REVOKED = [refusal("auth", "this device was revoked; enroll it again to rejoin"), Close(CLOSE_POLICY, "device revoked")]


@pytest.mark.parametrize(
    "msg", [BundleRequest(shape_key_id="experts-2.2"), Error(code="internal", message="x")], ids=lambda m: m.TYPE
)
def test_every_message_but_a_heartbeat_checks_revocation_first(directory, nonces, device, msg):
    conn = logged_in(directory, nonces, device)
    directory.lookups.clear()
    assert conn.on_message(msg, T0) != REVOKED
    directory.devices[device[0]].revoked = True
    assert conn.on_message(msg, T0) == REVOKED
    assert conn.state is State.CLOSED and directory.lookups == [device[0]] * 2


def test_heartbeats_never_query_the_registry(directory, nonces, device):
    """Old code looked the device up (revocation) at most every 10 s and wrote ``last_seen`` at most every 60 s
    per Heartbeat, one registry call each on the event loop; both are batched for all connections now
    (``coordinator.presence``), so a Heartbeat of a device revoked meanwhile is answered as any other."""
    conn = logged_in(directory, nonces, device)
    directory.lookups.clear()
    directory.touches.clear()  # the login's
    directory.devices[device[0]].revoked = True
    for i in range(50):
        assert conn.on_message(Heartbeat(), T0 + i * LAST_SEEN_EVERY_S / 10) == []
    assert directory.lookups == directory.touches == [] and conn.state is State.LOGGED_IN


def test_on_revoked_closes_a_logged_in_connection_once(directory, nonces, device):
    conn = logged_in(directory, nonces, device)
    assert conn.on_revoked() == REVOKED
    assert conn.state is State.CLOSED and conn.on_revoked() == []
    assert conn.on_message(BundleRequest(shape_key_id="experts-2.2"), T0) == []  # nothing after the Close


def test_on_revoked_before_login_does_nothing(directory, nonces, device):
    """A connection that has not logged in is not the revoked device's session (its Hello is checked)."""
    conn = connection(directory, nonces)
    challenge(conn, device[0])
    assert conn.on_revoked() == [] and conn.state is State.CHALLENGED


def test_heartbeats_mark_last_seen_due_at_most_every_60_s(directory, nonces, device):
    device_id = device[0]
    conn = logged_in(directory, nonces, device)
    assert directory.touches == [(device_id, None)] and directory.due == []  # the login writes it at once
    for now in (T0 + 1, T0 + LAST_SEEN_EVERY_S - 0.01):
        conn.on_message(Heartbeat(), now)
    assert directory.due == []
    conn.on_message(Heartbeat(), T0 + LAST_SEEN_EVERY_S)
    conn.on_message(Heartbeat(), T0 + LAST_SEEN_EVERY_S + 1)
    assert directory.due == [device_id]
    conn.on_message(Heartbeat(), T0 + 2 * LAST_SEEN_EVERY_S)
    assert directory.due == [device_id] * 2 and directory.touches == [(device_id, None)]


def test_error_messages_are_cut_to_2000_characters():
    assert refusal("internal", "x" * 5000) == Send(Error(code="internal", message="x" * MAX_ERROR_CHARS))
