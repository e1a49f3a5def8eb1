"""The device's side of channel security: the CA pinned by the enrollment token, and mutual TLS.

Trust on first contact, without a pre-shared file: ``fedmoe-coord enroll`` prints ``SECRET.FINGERPRINT``
(:func:`split_token`), where FINGERPRINT is the base64url sha256 of the coordinator CA's DER encoding
(:func:`certificate_fingerprint`). Before the token's secret is sent, the device fetches the CA from the
coordinator (``GET /ca.pem`` over a TLS connection that verifies nothing yet) and keeps it only if its
fingerprint matches (:func:`fetch_pinned_ca`); every later connection verifies the server against that
CA. After enrollment the device fetches the client certificate the CA issued for its own Ed25519 key
(``GET /certificate/<device_id>``, :func:`fetch_client_certificate`) and presents it on every
connection (mutual TLS): the coordinator checks that the certificate's key is the device's, which binds
the Ed25519 login to the TLS channel.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_runtime.errors import AuthError, ConfigError
from device_runtime.files import atomic_write

CA_PATH = "/ca.pem"
CERTIFICATE_PATH = "/certificate/"
MAX_PEM_BYTES = 64 << 10
TIMEOUT_S = 30.0


def certificate_fingerprint(pem: bytes) -> str:
    """Base64url (unpadded) sha256 of a PEM certificate's DER encoding: 43 characters.

    Raises:
        ConfigError: ``pem`` is not a PEM certificate.
    """
    return (
        base64.urlsafe_b64encode(hashlib.sha256(_load(pem).public_bytes(serialization.Encoding.DER)).digest())
        .rstrip(b"=")
        .decode("ascii")
    )


def split_token(token: str) -> tuple[str, str | None]:
    """``"SECRET.FINGERPRINT"`` -> ``(secret, fingerprint)``; a token without a fingerprint -> ``(token, None)``."""
    secret, _, fingerprint = token.strip().partition(".")
    return secret, fingerprint or None


def fetch_pinned_ca(url: str, fingerprint: str) -> bytes:
    """The coordinator's CA certificate (PEM), fetched from ``url`` (``wss://host:port``) and kept only if its
    fingerprint is ``fingerprint``.

    Raises:
        AuthError: the certificate served has another fingerprint (not the coordinator the token is for).
        ConfigError: the coordinator cannot be reached or serves no CA.
    """
    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    pem = _get(url, CA_PATH, unverified)
    if certificate_fingerprint(pem) != fingerprint:
        raise AuthError(
            f"the coordinator at {url} presents a CA with fingerprint {certificate_fingerprint(pem)}, "
            f"not {fingerprint} from the enrollment token: not the coordinator the token is for"
        )
    return pem


def fetch_client_certificate(url: str, context: ssl.SSLContext, device_id: str, public_key: bytes) -> bytes:
    """The client certificate (PEM) the coordinator's CA issued for ``device_id``, over a verified connection.

    Raises:
        AuthError: the certificate is not for this device's Ed25519 ``public_key`` (32 raw bytes).
        ConfigError: the coordinator cannot be reached or has no certificate for ``device_id``.
    """
    pem = _get(url, CERTIFICATE_PATH + device_id, context)
    if certificate_public_key(_load(pem)) != public_key:
        raise AuthError(f"the coordinator's certificate for {device_id} is not for this device's key; enroll again")
    return pem


def certificate_public_key(cert: x509.Certificate) -> bytes | None:
    """The raw 32-byte Ed25519 public key of ``cert``, or None for another key type."""
    try:
        return cert.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    except (ValueError, TypeError):
        return None


def write_client_pem(path: Path, certificate_pem: bytes, private_key: bytes) -> None:
    """Write the client certificate and its raw Ed25519 ``private_key`` (PKCS#8) as one PEM file, mode 0600
    (the parent directory is created with mode 0700 if missing)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(private_key).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, certificate_pem + key, mode=0o600)


def client_context(
    url: str, *, cafile: str | Path | None = None, ca_pem: bytes | None = None, client_pem: str | Path | None = None
) -> ssl.SSLContext | None:
    """TLS context for ``wss://`` URLs (None for ``ws://``): the server verified against ``ca_pem`` or
    ``cafile`` (else the system CAs), ``client_pem`` (certificate + key) presented for mutual TLS.

    Raises:
        ConfigError: not a ws:// or wss:// URL, TLS material with ws://, or unreadable TLS files.
    """
    if url.startswith("ws://"):
        if cafile is not None or ca_pem is not None:
            raise ConfigError(f"a CA needs a wss:// URL, got {url}")
        return None
    if not url.startswith("wss://"):
        raise ConfigError(f"coordinator URL must start with ws:// or wss://, got {url!r}")
    try:
        context = ssl.create_default_context(
            cafile=None if cafile is None else str(cafile), cadata=None if ca_pem is None else ca_pem.decode("ascii")
        )
        if client_pem is not None:
            context.load_cert_chain(str(client_pem))
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"cannot load TLS files (CA {cafile or 'from enrollment'}, client {client_pem}): {exc}; enroll again"
        ) from exc
    return context


def _get(url: str, path: str, context: ssl.SSLContext) -> bytes:
    parts = urlsplit(url)
    if parts.scheme != "wss":
        raise ConfigError(f"a token with a CA fingerprint needs a wss:// URL, got {url}")
    try:
        with urllib.request.urlopen(f"https://{parts.netloc}{path}", context=context, timeout=TIMEOUT_S) as reply:
            data: bytes = reply.read(MAX_PEM_BYTES + 1)
            return data[:MAX_PEM_BYTES]
    except (OSError, urllib.error.URLError) as exc:
        raise ConfigError(f"cannot fetch {path} from {url}: {exc}") from exc


def _load(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate ({exc})") from exc
