"""Device authentication: enrollment tokens, Ed25519 challenge-response, the device credentials file.

Scheme (no secret ever crosses the wire after enrollment, and the coordinator stores no secret):

1. Enrollment. The operator creates a token (:func:`new_enroll_token`, 256 random bits); the coordinator
   stores only ``sha256(token)`` (:func:`hash_token`) with an expiry, and the token reaches the device
   out of band. The device generates an Ed25519 key pair (:func:`generate_keypair`), sends
   ``Enroll(token, name, profile, public_key)``; the coordinator redeems the token once and stores the
   public key. The device keeps ``device_id`` and its private key in a 0600 credentials file
   (:func:`save_credentials`).
2. Each connection. ``Hello(device_id)`` -> ``Challenge(nonce)`` with a fresh 32-byte nonce
   (:class:`NonceBook`: single use, expiring) -> ``Auth(signature)``, the Ed25519 signature of
   :func:`challenge_message` (a domain tag, the device id and the nonce) -> the coordinator checks it with
   the stored public key (:func:`verify_challenge`) and consumes the nonce.

Threat model, honestly:

* Database leak: public keys and token hashes only. They do not let anyone authenticate as a device
  or redeem an outstanding token (tokens carry 256 bits of entropy, so an unsalted sha256 is enough).
* Passive eavesdropper: sees nonces and signatures, which cannot be replayed (each nonce is single
  use). Without TLS it does see enrollment tokens and model weights: a token sniffed before its use can
  be redeemed first. Serve ``wss://`` or enroll on a trusted network.
* Active man-in-the-middle without TLS: the signature binds neither the coordinator's identity nor the
  channel, so a relay can authenticate once and then tamper with the session (bundles and assignments
  excepted for a device that pinned the coordinator's CA: they are signed, ``device_runtime.signing``).
  TLS is required against an active attacker; this scheme authenticates devices, it does not secure the
  channel.
* Stolen device or credentials file: the thief is that device until the operator revokes it.
* Not covered here: an authenticated device sending poisoned updates (aggregation-side validation).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_runtime.errors import AuthError, ConfigError
from device_runtime.files import atomic_write

DEVICE_NAME_RULE = "[A-Za-z0-9][A-Za-z0-9_.-]*, at most 100 characters"


def check_device_name(name: str) -> str:
    """``name`` if a device may enroll under it (:data:`DEVICE_NAME_RULE`: it is safe in file names, shell
    words and systemd unit names).

    Raises:
        ConfigError: it breaks the rule.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", name):
        raise ConfigError(f"device name {name!r} must match {DEVICE_NAME_RULE}; pick another name")
    return name


TOKEN_BYTES = 32
NONCE_BYTES = 32
_DOMAIN = b"fedmoe-auth-v1\x00"


# ---------------------------------------------------------------- enrollment tokens


def new_enroll_token() -> str:
    """A fresh enrollment token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """Hex sha256 of a token: the only form in which the coordinator stores it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- Ed25519 challenge-response


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as raw bytes: ``(private_key[32], public_key[32])``."""
    key = Ed25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def public_key_of(private_key: bytes) -> bytes:
    """The raw 32-byte public key of a raw 32-byte private key.

    Raises:
        AuthError: ``private_key`` is not 32 bytes.
    """
    return _private(private_key).public_key().public_bytes_raw()


def challenge_message(nonce: bytes, device_id: str) -> bytes:
    """The bytes a device signs: domain tag, length-prefixed UTF-8 device id, nonce."""
    ident = device_id.encode("utf-8")
    return _DOMAIN + len(ident).to_bytes(2, "big") + ident + nonce


def sign_challenge(private_key: bytes, nonce: bytes, device_id: str) -> bytes:
    """Device side: the 64-byte Ed25519 signature answering ``Challenge(nonce)``."""
    return _private(private_key).sign(challenge_message(nonce, device_id))


# Ed25519 (RFC 8032 section 5.1): field prime, curve constant d, prime group order L.
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_L = 2**252 + 27742317777372353535851937790883648493
_IDENTITY = (0, 1)


def check_public_key(raw: bytes) -> None:
    """Refuse an Ed25519 public key that does not identify one private key holder.

    The key must be 32 bytes, a canonical encoding (y < p) of a point on the curve (RFC 8032 section
    5.1.3), not of small order (for the 8 torsion points, the all-zero key among them, one fixed signature
    verifies for every challenge: anyone could log in as that device), and in the prime-order subgroup
    (every key :func:`generate_keypair` makes is; libsodium's ``crypto_core_ed25519_is_valid_point`` rule).
    About 7 ms of pure-Python arithmetic, done once per enrollment.

    Raises:
        AuthError: naming which of the rules fails.
    """
    if len(raw) != 32:
        raise AuthError("an Ed25519 public key is 32 raw bytes")
    point = _decode_point(raw)
    if _multiply(point, 8) == _IDENTITY:
        raise AuthError("Ed25519 public key of small order (a signature for it can be forged); generate a new key pair")
    if _multiply(point, _L) != _IDENTITY:
        raise AuthError("Ed25519 public key outside the prime-order subgroup; generate a new key pair")


def _decode_point(raw: bytes) -> tuple[int, int]:
    """RFC 8032 section 5.1.3: 32 bytes -> affine (x, y). Raises AuthError if not a curve point."""
    y, sign = int.from_bytes(raw, "little") & ((1 << 255) - 1), raw[31] >> 7
    if y >= _P:
        raise AuthError("Ed25519 public key is not canonically encoded")
    xx = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(xx, (_P + 3) // 8, _P)
    if (x * x - xx) % _P:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if (x * x - xx) % _P or (x == 0 and sign):
        raise AuthError("Ed25519 public key is not a point of the curve")
    return (_P - x if x & 1 != sign else x), y


_Extended = tuple[int, int, int, int]  # a point in extended coordinates (X, Y, Z, T)


def _add(a: _Extended, b: _Extended) -> _Extended:
    """RFC 8032 section 5.1.4 addition in extended coordinates (X, Y, Z, T): complete, no inversions."""
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    e, h = (y1 + x1) * (y2 + x2) - (y1 - x1) * (y2 - x2), (y1 + x1) * (y2 + x2) + (y1 - x1) * (y2 - x2)
    f, g = 2 * z1 * z2 - 2 * _D * t1 * t2, 2 * z1 * z2 + 2 * _D * t1 * t2
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _multiply(point: tuple[int, int], scalar: int) -> tuple[int, int]:
    """``scalar * point`` (double and add), back in affine coordinates."""
    x, y = point
    base, result = (x, y, 1, x * y % _P), (0, 1, 1, 0)
    for bit in bin(scalar)[2:]:
        result = _add(result, result)
        if bit == "1":
            result = _add(result, base)
    rx, ry, rz, _ = result
    inverse = pow(rz, _P - 2, _P)
    return rx * inverse % _P, ry * inverse % _P


def verify_challenge(public_key: bytes, nonce: bytes, device_id: str, signature: bytes) -> None:
    """Coordinator side: check a device's answer to a challenge.

    Raises:
        AuthError: the public key is malformed or the signature does not verify.
    """
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, challenge_message(nonce, device_id))
    except (InvalidSignature, ValueError) as exc:
        raise AuthError(f"device {device_id}: challenge signature does not verify") from exc


def _private(raw: bytes) -> Ed25519PrivateKey:
    try:
        return Ed25519PrivateKey.from_private_bytes(raw)
    except ValueError as exc:
        raise AuthError("an Ed25519 private key is 32 raw bytes") from exc


class NonceBook:
    """Coordinator side: issues challenge nonces and accepts each one once, before it expires.

    Args:
        ttl_s: seconds a nonce stays valid.
        max_pending: outstanding nonces kept; beyond it the oldest are dropped (bounds memory under a
            flood of unanswered ``Hello`` messages).
        clock: monotonic time source (seconds).
    """

    def __init__(self, *, ttl_s: float = 60.0, max_pending: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_pending, self._clock = ttl_s, max_pending, clock
        self._pending: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self) -> bytes:
        """A fresh random nonce of ``NONCE_BYTES`` bytes."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        with self._lock:
            self._pending[nonce] = self._clock() + self.ttl_s
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
        return nonce

    def consume(self, nonce: bytes) -> None:
        """Spend a nonce.

        Raises:
            AuthError: the nonce was never issued, was already used, or expired.
        """
        with self._lock:
            expires = self._pending.pop(nonce, None)
        if expires is None:
            raise AuthError("unknown or already used challenge nonce; reconnect for a new challenge")
        if self._clock() > expires:
            raise AuthError(f"challenge expired (answer within {self.ttl_s:g} s); reconnect")


# ---------------------------------------------------------------- credentials file (device)


@dataclass(frozen=True)
class Credentials:
    """What a device keeps after enrollment.

    Attributes:
        device_id: id assigned by the coordinator. private_key: raw 32-byte Ed25519 private key.
        coordinator_url: where the device enrolled (``ws://`` / ``wss://``).
        ca_cert: the coordinator's CA certificate (PEM) pinned at enrollment ("" = none: ws:// or a --cafile).
        client_pem: path of the client certificate + key file for mutual TLS ("" = none), see
            ``device_runtime.tls``.
    """

    device_id: str
    private_key: bytes
    coordinator_url: str = ""
    ca_cert: str = ""
    client_pem: str = ""

    @property
    def public_key(self) -> bytes:
        return public_key_of(self.private_key)


def save_credentials(path: str | Path, creds: Credentials) -> None:
    """Write ``creds`` as JSON, atomically, readable by the owner only (mode 0600).

    The parent directory is created with mode 0700 if missing.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = json.dumps(
        {
            "device_id": creds.device_id,
            "private_key": base64.b64encode(creds.private_key).decode("ascii"),
            "coordinator_url": creds.coordinator_url,
            "ca_cert": creds.ca_cert,
            "client_pem": creds.client_pem,
        }
    ).encode()
    atomic_write(path, body, mode=0o600)


def load_credentials(path: str | Path) -> Credentials:
    """Read a credentials file written by :func:`save_credentials`.

    Raises:
        AuthError: the file is missing, malformed, not owned by this user, or readable or writable by
            group / others (POSIX only: fix with ``chmod 600 <path>``).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise AuthError(
            f"cannot open credentials {path} ({exc.strerror}); "
            "run `fedmoe-device enroll URL --token TOKEN --name NAME` first"
        ) from exc
    with os.fdopen(fd, "rb") as handle:
        _check_private(path, os.fstat(handle.fileno()))
        raw = handle.read(1 << 16)
    try:
        data = json.loads(raw)
        return Credentials(
            device_id=str(data["device_id"]),
            private_key=base64.b64decode(data["private_key"], validate=True),
            coordinator_url=str(data.get("coordinator_url", "")),
            ca_cert=str(data.get("ca_cert", "")),
            client_pem=str(data.get("client_pem", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise AuthError(f"credentials file {path} is malformed ({exc!r}); enroll again") from exc


def _check_private(path: Path, st: os.stat_result) -> None:
    if os.name != "posix":
        return
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthError(
            f"credentials {path} are accessible by other users "
            f"(mode {stat.S_IMODE(st.st_mode):o}); run `chmod 600 {path}`"
        )
    if st.st_uid != os.getuid():
        raise AuthError(f"credentials {path} belong to uid {st.st_uid}, not this user")
