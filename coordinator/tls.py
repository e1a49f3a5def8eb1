"""The coordinator's certificate authority (``cryptography``): one CA, the server certificate, and a client
certificate for each enrolled device's own Ed25519 key (see ``device_runtime.tls`` for the device's side).

``fedmoe-coord init`` calls :func:`create_authority`; the server loads :func:`server_context` (TLS 1.3,
client certificates optional at the TLS layer so a device without one can enroll; login requires one,
checked by ``coordinator.connection`` against the key ``coordinator.server`` reads with :func:`peer_public_key`).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.config import CoordinatorConfig
from device_runtime.errors import ConfigError
from device_runtime.files import atomic_write
from device_runtime.tls import certificate_fingerprint, certificate_public_key

VALID_DAYS = 3650


@dataclass(frozen=True)
class Authority:
    """PEM file paths: the CA's certificate and key, the server's certificate and key."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def authority_files(directory: str | Path) -> Authority:
    """Where :func:`create_authority` writes into ``directory``."""
    directory = Path(directory)
    return Authority(directory / "ca.pem", directory / "ca.key", directory / "server.pem", directory / "server.key")


def create_authority(files: Authority, hosts: list[str]) -> Authority:
    """Write a new CA (ECDSA P-256) and a server certificate for ``hosts`` (plus this machine's name,
    ``localhost`` and the loopback addresses) to ``files``; keys get mode 0600, the directory 0700.

    Raises:
        ConfigError: a CA exists there already (never overwritten: enrolled devices pinned it).
    """
    if files.ca_cert.exists():
        raise ConfigError(f"{files.ca_cert} exists; enrolled devices trust it, so it is never replaced")
    files.ca_cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedmoe coordinator CA")
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        _builder(_name("fedmoe coordinator"), ca_name, server_key.public_key())
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_key_usage(), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    atomic_write(files.ca_key, _key_pem(ca_key), mode=0o600)
    atomic_write(files.server_key, _key_pem(server_key), mode=0o600)
    atomic_write(files.server_cert, server.public_bytes(serialization.Encoding.PEM), mode=0o644)
    atomic_write(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return files


def with_new_authority(cfg: CoordinatorConfig, hosts: list[str] = ()) -> CoordinatorConfig:
    """``cfg`` serving wss:// with mutual TLS: a new CA and server certificate in ``state_dir/tls``
    (see :func:`create_authority`; ``cfg.host`` and ``hosts`` are in the server certificate)."""
    files = create_authority(authority_files(Path(cfg.state_dir) / "tls"), [cfg.host, *hosts])
    return dataclasses.replace(
        cfg,
        tls_cert=str(files.server_cert),
        tls_key=str(files.server_key),
        tls_ca_cert=str(files.ca_cert),
        tls_ca_key=str(files.ca_key),
        insecure=False,
    )


def pinned_token(token: str, cfg: CoordinatorConfig) -> str:
    """``token`` as handed to a device: with mutual TLS, ``TOKEN.FINGERPRINT`` of the CA (``device_runtime.tls``)."""
    return f"{token}.{certificate_fingerprint(Path(cfg.tls_ca_cert).read_bytes())}" if cfg.mutual_tls else token


def local_url(cfg: CoordinatorConfig, port: int | None = None) -> str:
    """The coordinator's URL on this machine: ``wss://127.0.0.1:PORT`` with TLS, ``ws://`` without."""
    return f"{'wss' if cfg.tls else 'ws'}://127.0.0.1:{cfg.port if port is None else port}"


def issue_device_certificate(ca_cert: Path, ca_key: Path, device_id: str, public_key: bytes) -> bytes:
    """A client certificate (PEM) for ``device_id``'s raw 32-byte Ed25519 ``public_key``, signed by the CA."""
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    cert = (
        _builder(_name(device_id), ca.subject, Ed25519PublicKey.from_public_bytes(public_key))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_key_usage(), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def server_context(cert: str, key: str, ca_cert: str) -> ssl.SSLContext:
    """TLS 1.3 server context: ``cert``/``key``; client certificates verified against ``ca_cert`` when sent.

    Raises:
        ConfigError: a file is missing or not a matching certificate and key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(cert, key)
        context.load_verify_locations(ca_cert)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files {cert}, {key}, {ca_cert}: {exc}") from exc
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def peer_public_key(ssl_object: ssl.SSLObject | None) -> bytes | None:
    """The raw Ed25519 key of the client certificate the peer presented (verified by the CA), if any."""
    der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
    return None if der is None else certificate_public_key(x509.load_der_x509_certificate(der))


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def _key_usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn(), *hosts} - {"", "0.0.0.0", "::"}
    out: list[x509.GeneralName] = []
    for name in sorted(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
