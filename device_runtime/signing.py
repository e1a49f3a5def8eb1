"""The coordinator's signatures on what it pushes to a device: bundle manifests and assignments.

Key: the coordinator's CA key (ECDSA P-256, made by ``fedmoe-coord init``, ``coordinator.tls``) signs, with
ECDSA over SHA-256; a device verifies with the CA certificate it pinned at enrollment by the fingerprint in
its token (``device_runtime.tls``). No further key is delivered or trusted: the pin that authenticates the
server's TLS certificate also authenticates its bundles and assignments, over ``wss://`` or plain ``ws://``.

What is signed, each kind behind its own domain tag (a signature of one kind is never valid as another,
nor as a certificate or TLS signature of the same key, whose signed bytes start with a DER SEQUENCE byte):

* A bundle: ``manifest.sig`` beside ``manifest.json`` holds the DER signature of ``MANIFEST_DOMAIN +
  manifest.json``. The manifest lists every other file's sha256, so the one signature covers the bundle
  (the shape key inside it is checked against the one requested).
* An assignment: the frame header's ``"signature"`` (base64 of the DER signature) over ``ASSIGNMENT_DOMAIN
  + len16(device_id) + device_id + canonical header``. The canonical header (:func:`canonical_header`) is
  every header key but ``signature`` (round_id, update_id, model_version, shape key, expert ids, config and
  the payload's size and sha256, which pins every tensor); ``device_id`` is the receiving device's, so a
  signature replayed to another device, or moved to another round, does not verify.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_runtime.errors import BundleSignatureError, ConfigError, ProtocolError

MANIFEST_SIG = "manifest.sig"
MANIFEST_DOMAIN = b"fedmoe-manifest-v1\x00"
ASSIGNMENT_DOMAIN = b"fedmoe-assignment-v1\x00"
MAX_SIGNATURE_BYTES = 80  # a DER ECDSA P-256 signature is 70-72 bytes
_ECDSA = ec.ECDSA(hashes.SHA256())
REENROL = "enroll this device again with a token from `fedmoe-coord enroll`"


def canonical_header(header: Mapping[str, Any]) -> bytes:
    """The signed form of a frame header: JSON with sorted keys, no spaces, ASCII only.

    Raises:
        ProtocolError("bad_header"): a value JSON cannot hold (inf, NaN, nesting too deep).
    """
    try:
        return json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError("bad_header", f"header cannot be put in canonical form: {exc}") from exc


def assignment_message(device_id: str, header: bytes) -> bytes:
    """The bytes signed for an assignment to ``device_id`` whose canonical header is ``header``."""
    ident = device_id.encode("utf-8")
    return ASSIGNMENT_DOMAIN + len(ident).to_bytes(2, "big") + ident + header


class Signer:
    """Coordinator side: signs with the CA's ECDSA P-256 private key."""

    def __init__(self, key: ec.EllipticCurvePrivateKey):
        self.key = key

    @classmethod
    def load(cls, path: str | Path) -> Signer:
        """The signer of the CA key file (PEM, unencrypted) ``path``.

        Raises:
            ConfigError: unreadable, or not an ECDSA key.
        """
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load the CA key {path}, which signs bundles and assignments: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"the CA key {path} is not an ECDSA key (as `fedmoe-coord init` makes)")
        return cls(key)

    def manifest(self, manifest: bytes) -> bytes:
        """The DER signature of ``manifest.json``'s bytes (the content of ``manifest.sig``)."""
        return self.key.sign(MANIFEST_DOMAIN + manifest, _ECDSA)

    def assignment(self, device_id: str) -> Callable[[bytes], bytes]:
        """The ``sign`` hook of ``wire.encode`` for assignments to ``device_id``."""
        return lambda header: self.key.sign(assignment_message(device_id, header), _ECDSA)


class Verifier:
    """Device side: verifies against the public key of the pinned CA certificate."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey):
        self.public_key = public_key

    @classmethod
    def from_certificate(cls, pem: bytes) -> Verifier:
        """The verifier of a pinned CA certificate (PEM).

        Raises:
            ConfigError: not a PEM certificate of an ECDSA key.
        """
        try:
            key = x509.load_pem_x509_certificate(pem).public_key()
        except ValueError as exc:
            raise ConfigError(f"the CA certificate pinned at enrollment is unreadable ({exc}); {REENROL}") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError(f"the CA pinned at enrollment has no ECDSA key to verify signatures with; {REENROL}")
        return cls(key)

    def manifest(self, manifest: bytes, signature: bytes | None) -> None:
        """Check ``manifest.sig`` (``signature``; None: absent) against ``manifest.json``'s bytes.

        Raises:
            BundleSignatureError: unsigned, or the signature does not verify (manifest or a file tampered).
        """
        if signature is None:
            raise BundleSignatureError(
                f"unsigned bundle refused: it has no {MANIFEST_SIG}, and this device verifies "
                "bundles against the coordinator key pinned at enrollment"
            )
        if not self._valid(signature, MANIFEST_DOMAIN + manifest):
            raise BundleSignatureError(
                "bundle manifest signature does not verify against the coordinator key "
                "pinned at enrollment: the bundle was tampered with or is not from it"
            )

    def assignment(self, device_id: str) -> Callable[[bytes, bytes | None], None]:
        """The ``verify`` hook of ``wire.decode`` for assignments to ``device_id``.

        The hook raises ProtocolError("bad_signature"): unsigned, or signed for another device, round,
        header or payload."""

        def verify(header: bytes, signature: bytes | None) -> None:
            if signature is None:
                raise ProtocolError(
                    "bad_signature",
                    "unsigned assignment refused: this device verifies assignments "
                    "against the coordinator key pinned at enrollment",
                )
            if not self._valid(signature, assignment_message(device_id, header)):
                raise ProtocolError(
                    "bad_signature",
                    f"signature does not verify for {device_id} against the "
                    "coordinator key pinned at enrollment: header or tensors "
                    "tampered with, or signed for another device",
                )

        return verify

    def _valid(self, signature: bytes, data: bytes) -> bool:
        try:
            self.public_key.verify(signature, data, _ECDSA)
        except InvalidSignature:
            return False
        return True


def encode_signature(signature: bytes) -> str:
    """A signature as it travels in a JSON header: base64."""
    return base64.b64encode(signature).decode("ascii")


def decode_signature(value: object) -> bytes | None:
    """A header's ``signature`` value back to bytes (None: absent).

    Raises:
        ProtocolError("bad_signature"): not base64 of at most ``MAX_SIGNATURE_BYTES`` bytes.
    """
    if value is None:
        return None
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or not 0 < len(raw) <= MAX_SIGNATURE_BYTES:
        raise ProtocolError("bad_signature", f"signature is not base64 of 1 to {MAX_SIGNATURE_BYTES} bytes")
    return raw
