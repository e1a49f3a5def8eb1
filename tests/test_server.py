"""The coordinator's websocket server, for real: a server on port 0 in a background thread, real
websocket clients speaking the protocol, a tiny random Mixtral checkpoint, a real bundle export."""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from coordinator.config import load_config, save_config
from coordinator.registry import Registry
from device_runtime.auth import generate_keypair, sign_challenge
from device_runtime.protocol import (PROTOCOL_VERSION, Ack, Assignment, Auth, AuthOk, BundleAssembler, BundleData,
                                     BundleRequest, Challenge, Enrol, EnrolOk, Error, Heartbeat, Hello, decode,
                                     encode)

pytest.importorskip("torch")
from helpers import RECORDS, ServerThread, fake_update, initialised_coordinator, two_expert_memory  # noqa: E402

MAX_MIB = 4.0


@pytest.fixture(scope="module")
def initialised(tmp_path_factory):
    """``(config, memory_mib)`` of an initialised coordinator state (global state v0, calibration)."""
    root = tmp_path_factory.mktemp("coord")
    os.environ.setdefault("FEDMOE_CACHE", str(root / "cache"))
    eval_data = root / "eval.jsonl"
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = initialised_coordinator(root, root / "state", max_message_mib=MAX_MIB, eval_data=str(eval_data))
    return cfg, two_expert_memory(root / "checkpoint")


@pytest.fixture(scope="module")
def server(initialised):
    srv = ServerThread(initialised[0])
    yield srv
    srv.stop()


def ws(server):
    return connect(server.url, max_size=int(MAX_MIB * 2**20), compression=None, open_timeout=10)


def send(conn, msg):
    conn.send(encode(msg))


def recv(conn, timeout=60):
    return decode(conn.recv(timeout=timeout), max_size=int(MAX_MIB * 2**20))


def recv_ack(conn):
    """The next Ack, skipping the assignments of rounds that started meanwhile."""
    while not isinstance(msg := recv(conn), Ack):
        assert isinstance(msg, Assignment), msg
    return msg


def enrol(server, cfg, name, profile):
    """Create a token, enrol over the wire; returns ``(device_id, private_key)``."""
    registry = Registry(cfg.registry_url)
    token = registry.create_enrol_token(name, 3600)
    registry.close()
    private, public = generate_keypair()
    with ws(server) as conn:
        send(conn, Enrol(token=token, name=name, profile=profile, public_key=public))
        reply = recv(conn)
    assert isinstance(reply, EnrolOk), reply
    return reply.device_id, private, token


def login(conn, device_id, private, profile):
    send(conn, Hello(device_id=device_id, protocol_version=PROTOCOL_VERSION, profile=profile))
    challenge = recv(conn)
    assert isinstance(challenge, Challenge), challenge
    send(conn, Auth(device_id=device_id, signature=sign_challenge(private, challenge.nonce, device_id)))
    return recv(conn)


def test_healthz(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"ok\n"


def test_enrol_token_is_single_use(server, initialised):
    cfg = initialised[0]
    device_id, _, token = enrol(server, cfg, "phone-a", {"memory_mib": 10})
    assert device_id.startswith("d-")
    with ws(server) as conn:
        send(conn, Enrol(token=token, name="thief", profile={}, public_key=generate_keypair()[1]))
        reply = recv(conn)
        assert isinstance(reply, Error) and reply.code == "auth" and "already used" in reply.message
        with pytest.raises(ConnectionClosed):
            conn.recv(timeout=10)


def test_wrong_signature_is_refused_and_a_nonce_works_once(server, initialised):
    cfg = initialised[0]
    device_id, private, _ = enrol(server, cfg, "phone-b", {"memory_mib": 10})
    other_private, _ = generate_keypair()
    with ws(server) as conn:
        reply = login(conn, device_id, other_private, {"memory_mib": 10})
        assert isinstance(reply, Error) and reply.code == "auth"
    with ws(server) as conn:  # replaying an old (nonce, signature) pair fails: each nonce is single use
        send(conn, Hello(device_id=device_id, protocol_version=PROTOCOL_VERSION, profile={}))
        stale = recv(conn)
        send(conn, Auth(device_id=device_id, signature=sign_challenge(private, stale.nonce, device_id)))
        assert isinstance(recv(conn), AuthOk)
    with ws(server) as conn:
        send(conn, Hello(device_id=device_id, protocol_version=PROTOCOL_VERSION, profile={}))
        recv(conn)  # a fresh challenge; answer with the old nonce's signature
        send(conn, Auth(device_id=device_id, signature=sign_challenge(private, stale.nonce, device_id)))
        reply = recv(conn)
        assert isinstance(reply, Error) and reply.code == "auth"


def test_revoked_device_cannot_authenticate(server, initialised):
    cfg = initialised[0]
    device_id, private, _ = enrol(server, cfg, "phone-c", {"memory_mib": 10})
    registry = Registry(cfg.registry_url)
    registry.revoke_device(device_id)
    registry.close()
    with ws(server) as conn:
        send(conn, Hello(device_id=device_id, protocol_version=PROTOCOL_VERSION, profile={}))
        reply = recv(conn)
        assert isinstance(reply, Error) and reply.code == "auth" and "revoked" in reply.message


def test_malformed_and_oversized_messages(server, initialised):
    cfg = initialised[0]
    device_id, private, _ = enrol(server, cfg, "phone-d", {"memory_mib": 10})
    with ws(server) as conn:
        assert isinstance(login(conn, device_id, private, {"memory_mib": 10}), AuthOk)
        for frame, code in ((b"\x00\x00", "bad_frame"), (b"\x00\x00\x00\x02{]", "bad_header"),
                            (b'\x00\x00\x00\x15{"v":1,"type":"nope"}', "unknown_type"),
                            (b'\x00\x00\x00\x15{"v":9,"type":"ping"}', "version")):
            conn.send(frame)
            reply = recv(conn)
            assert isinstance(reply, Error) and reply.code == code, (frame, reply)
        conn.send("text frame")
        assert recv(conn).code == "bad_frame"
        send(conn, BundleRequest(shape_key_id="experts-9.9"))
        reply = recv(conn)
        assert isinstance(reply, Error) and reply.code == "unexpected"
        send(conn, Heartbeat())  # the connection is still usable
        conn.send(b"\x00" * (int(MAX_MIB * 2**20) + 1))
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(timeout=10)
        assert closed.value.rcvd.code == 1009  # message too big: closed by websockets
    test_healthz(server)  # the server survived


def test_round_with_bundle_transfer_and_replayed_update(server, initialised):
    from device_runtime.bundle import Manifest

    cfg, memory = initialised
    profile = {"memory_mib": memory, "gflops": 5.0}
    device_id, private, _ = enrol(server, cfg, "pi-1", profile)
    with ws(server) as conn:
        assert isinstance(login(conn, device_id, private, profile), AuthOk)
        assignment = recv(conn, timeout=120)  # the first round: bundle export happens now
        assert isinstance(assignment, Assignment) and assignment.shape_key.experts_per_layer == (2, 2)
        send(conn, BundleRequest(shape_key_id=assignment.shape_key.id))
        assembler, files = BundleAssembler(assignment.shape_key.id, max_total_bytes=64 << 20), None
        while files is None:
            chunk = recv(conn)
            assert isinstance(chunk, BundleData)
            files = assembler.add(chunk)
        manifest = Manifest.from_json(files["manifest.json"].decode())
        assert manifest.shape_key == assignment.shape_key
        assert {s.name for s in manifest.tensors} == set(assignment.tensors)

        update = fake_update(assignment, manifest)
        send(conn, replace(update, update_id="r999-forged"))
        ack = recv_ack(conn)
        assert not ack.accepted and "no such assignment" in ack.reason
        send(conn, update)
        first = recv_ack(conn)
        send(conn, update)  # replayed (e.g. after a lost Ack)
        second = recv_ack(conn)
        assert (first.accepted, second.accepted) == (True, True) and second.reason == "already recorded"

    registry = Registry(cfg.registry_url)
    try:
        version = wait_for(lambda: _version_after(registry, 0))
        updates = registry.accepted_updates(assignment.round_id)
        assert [u.update_id for u in updates] == [assignment.update_id]
        rounds = {r.id: r for r in registry.list_rounds()}
        assert rounds[assignment.round_id].status == "finished"
        assert rounds[assignment.round_id].metrics["num_clients"] == 1
        check_only_trained_rows_changed(cfg, registry, version, assignment)
        check_the_new_version_was_evaluated(cfg, registry, version)
    finally:
        registry.close()


def check_the_new_version_was_evaluated(cfg, registry, version):
    """The coordinator logged the held-out score of the new version: the evaluator's score of its state."""
    from coordinator.evaluation import Evaluator
    from coordinator.federation import tensor_store

    scores = wait_for(lambda: {m.name: m.value for m in registry.metrics(round_id=version.round_id)
                               if m.name.startswith("eval_")} or None)
    expected = Evaluator.from_config(cfg).score(tensor_store(cfg).load(version.tensor_sha256))
    assert scores == pytest.approx({"eval_accuracy": expected.accuracy, "eval_loss": expected.loss}, rel=1e-6)
    initial = Evaluator.from_config(cfg).score(None)
    assert initial.loss != pytest.approx(expected.loss, rel=1e-6)  # the +1 / +0.5 shifts changed the model


def _version_after(registry, version):
    latest = registry.latest_model_version()
    return latest if latest.version > version else None


def wait_for(probe, timeout=60.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def check_only_trained_rows_changed(cfg, registry, version, assignment):
    from coordinator.federation import tensor_store

    store = tensor_store(cfg)
    before = store.load(registry_version(registry, 0).tensor_sha256)
    after = store.load(version.tensor_sha256)
    for name, old in before.items():
        changed = sorted(np.flatnonzero(np.abs(after[name] - old).reshape(len(old), -1).max(axis=1) > 0))
        layer = int(name.split(".")[2])
        held = assignment.expert_ids[layer]
        if name.endswith("mlp.gate.weight"):
            assert changed == list(held), name  # router rows of the held experts only, +0.5
            np.testing.assert_allclose(after[name][list(held)], old[list(held)] + 0.5, atol=1e-6)
        elif "experts." in name:
            assert changed == [held[0]], name  # only the trained expert, +1
            np.testing.assert_allclose(after[name][held[0]], old[held[0]] + 1.0, atol=1e-6)
        else:
            assert changed == [], name


def registry_version(registry, number):
    from sqlalchemy import select

    from coordinator.registry import ModelVersion

    with registry.engine.connect() as conn:
        row = conn.execute(select(ModelVersion).where(ModelVersion.version == number)).one()
    return row


def test_config_round_trip_and_errors(tmp_path, initialised):
    from device_runtime.errors import ConfigError

    cfg = initialised[0]
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg
    (tmp_path / "bad.toml").write_text('checkpoint = "m"\nport = 70000\n')
    with pytest.raises(ConfigError, match="port"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "unknown.toml").write_text('checkpoint = "m"\nprot = 1\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(tmp_path / "unknown.toml")


def test_invalid_update_is_rejected_recorded_once_and_the_round_retried(server, initialised):
    cfg, memory = initialised
    profile = {"memory_mib": memory, "gflops": 5.0}
    device_id, private, _ = enrol(server, cfg, "pi-2", profile)
    with ws(server) as conn:
        assert isinstance(login(conn, device_id, private, profile), AuthOk)
        assignment = recv(conn, timeout=120)
        assert isinstance(assignment, Assignment)
        from device_runtime.bundle import load_bundle

        manifest = load_bundle(os.path.join(cfg.state_dir, "bundles", assignment.shape_key.id)).manifest
        update = fake_update(assignment, manifest)
        name = next(iter(update.tensors))
        poisoned = replace(update, tensors={**update.tensors, name: np.full_like(update.tensors[name], np.nan)})
        send(conn, poisoned)
        first = recv_ack(conn)
        assert not first.accepted and "NaN" in first.reason
        send(conn, update)  # a valid re-send under the same update_id does not overwrite the record
        second = recv_ack(conn)
        assert not second.accepted and second.reason == "already recorded"
    registry = Registry(cfg.registry_url)
    try:
        row = wait_for(lambda: _closed(registry, assignment.round_id))
        assert row.status == "failed" and "0 of 1" in row.metrics["reason"]
        assert registry.accepted_updates(assignment.round_id) == []
    finally:
        registry.close()


def _closed(registry, round_id):
    row = registry.get_round(round_id)
    return row if row.status != "running" else None
