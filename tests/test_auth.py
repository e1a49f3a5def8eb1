"""Ed25519 challenge-response, single-use nonces, credentials file permissions."""

import os
import stat

import pytest

from device_runtime import auth
from device_runtime.errors import AuthError


def test_challenge_response_success_and_failures():
    private, public = auth.generate_keypair()
    assert len(private) == 32 and len(public) == 32 and auth.public_key_of(private) == public
    nonce = os.urandom(32)
    signature = auth.sign_challenge(private, nonce, "d-1")
    assert len(signature) == 64
    auth.verify_challenge(public, nonce, "d-1", signature)

    _, other_public = auth.generate_keypair()
    failures = [
        (other_public, nonce, "d-1", signature),  # wrong key
        (public, os.urandom(32), "d-1", signature),  # other nonce
        (public, nonce, "d-2", signature),  # signature bound to the device id
        (public, nonce, "d-1", signature[:-1] + bytes([signature[-1] ^ 1])),
        (b"short", nonce, "d-1", signature),  # malformed public key
    ]
    for args in failures:
        with pytest.raises(AuthError):
            auth.verify_challenge(*args)


def test_challenge_message_is_unambiguous():
    nonce = b"\x00" * 32
    assert auth.challenge_message(nonce, "ab") != auth.challenge_message(nonce, "a")
    assert auth.challenge_message(nonce, "ab").startswith(b"fedmoe-auth-v1\x00\x00\x02ab")


def test_nonce_single_use_and_expiry():
    now = [100.0]
    book = auth.NonceBook(ttl_s=10, max_pending=3, clock=lambda: now[0])
    first, second = book.issue(), book.issue()
    assert len(first) == 32 and first != second
    book.consume(first)
    with pytest.raises(AuthError, match="already used"):
        book.consume(first)  # replay
    with pytest.raises(AuthError):
        book.consume(os.urandom(32))  # never issued
    now[0] = 110.5
    with pytest.raises(AuthError, match="expired"):
        book.consume(second)
    oldest = book.issue()
    for _ in range(3):
        book.issue()
    with pytest.raises(AuthError):
        book.consume(oldest)  # evicted beyond max_pending


def test_enroll_tokens_random_and_hashed():
    tokens = {auth.new_enroll_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) == 43 for t in tokens)
    assert auth.hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_credentials_file_round_trip_mode_0600(tmp_path):
    private, _ = auth.generate_keypair()
    creds = auth.Credentials(device_id="d-9", private_key=private, coordinator_url="wss://coord:8765")
    path = tmp_path / "cfg" / "credentials.json"
    old_umask = os.umask(0)  # even a permissive umask must not widen the file mode
    try:
        auth.save_credentials(path, creds)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.load_credentials(path) == creds
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]  # no temp file left


def test_credentials_refused_when_readable_by_others(tmp_path):
    path = tmp_path / "credentials.json"
    auth.save_credentials(path, auth.Credentials(device_id="d", private_key=auth.generate_keypair()[0]))
    os.chmod(path, 0o644)
    with pytest.raises(AuthError, match="chmod 600"):
        auth.load_credentials(path)
    os.chmod(path, 0o600)
    path.write_text("{not json")
    with pytest.raises(AuthError, match="malformed"):
        auth.load_credentials(path)
    with pytest.raises(AuthError, match="enroll"):
        auth.load_credentials(tmp_path / "missing.json")
