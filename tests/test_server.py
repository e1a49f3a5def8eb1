"""The coordinator's websocket server, for real: a server on port 0 in a background thread, real
websocket clients speaking the protocol, a tiny random Mixtral checkpoint, a real bundle export. The protocol
decisions of a connection (enrollment, authentication, rate, revocation, dispatch) are tested without a server in
``test_connection.py``; these tests check that the server carries them out."""

from __future__ import annotations

import json
import os
import struct
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from coordinator.config import load_config, save_config
from coordinator.federation import tensor_store
from coordinator.registry import Registry
from device_runtime.auth import generate_keypair, sign_challenge
from device_runtime.wire import (
    PROTOCOL_VERSION,
    Ack,
    Assignment,
    Auth,
    AuthOk,
    BundleAssembler,
    BundleData,
    BundleRequest,
    Challenge,
    Enroll,
    EnrollOk,
    Error,
    EvalResult,
    Heartbeat,
    Hello,
    decode,
    encode,
)

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


def enroll(server, cfg, name, profile):
    """Create a token, enroll over the wire; returns ``(device_id, private_key)``."""
    registry = Registry(cfg.registry_url)
    token = registry.create_enroll_token(name, 3600)
    registry.close()
    private, public = generate_keypair()
    with ws(server) as conn:
        send(conn, Enroll(token=token, name=name, profile=profile, public_key=public))
        reply = recv(conn)
    assert isinstance(reply, EnrollOk), reply
    return reply.device_id, private, token


def login(conn, device_id, private, profile):
    send(conn, Hello(device_id=device_id, protocol_version=PROTOCOL_VERSION, profile=profile))
    challenge = recv(conn)
    assert isinstance(challenge, Challenge), challenge
    send(conn, Auth(device_id=device_id, signature=sign_challenge(private, challenge.nonce, device_id)))
    return recv(conn)


def first_assignment(conn, device_id, private, profile) -> Assignment:
    """Log in and wait for the device's assignment (the first round exports its bundle: allow 120 s)."""
    assert isinstance(login(conn, device_id, private, profile), AuthOk)
    assignment = recv(conn, timeout=120)
    assert isinstance(assignment, Assignment), assignment
    return assignment


def test_healthz(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"ok\n"


def test_revoked_device_cannot_authenticate(server, initialised):
    cfg = initialised[0]
    device_id, private, _ = enroll(server, cfg, "phone-c", {"memory_mib": 10})
    registry = Registry(cfg.registry_url)
    registry.revoke_device(device_id)
    registry.close()
    with ws(server) as conn:
        send(conn, Hello(device_id=device_id, protocol_version=PROTOCOL_VERSION, profile={}))
        reply = recv(conn)
        assert isinstance(reply, Error) and reply.code == "auth" and "revoked" in reply.message


def test_malformed_and_oversized_messages(server, initialised):
    cfg = initialised[0]
    device_id, private, _ = enroll(server, cfg, "phone-d", {"memory_mib": 10})
    with ws(server) as conn:
        assert isinstance(login(conn, device_id, private, {"memory_mib": 10}), AuthOk)
        for frame, code in (
            (b"\x00\x00", "bad_frame"),
            (b"\x00\x00\x00\x02{]", "bad_header"),
            (b'\x00\x00\x00\x15{"v":%d,"type":"nope"}' % PROTOCOL_VERSION, "unknown_type"),
            (b'\x00\x00\x00\x15{"v":9,"type":"ping"}', "version"),
        ):
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


def test_round_with_bundle_transfer_and_replayed_update(server, initialised, tmp_path):
    from device_runtime.bundle import Manifest

    cfg, memory = initialised
    profile = {"memory_mib": memory, "gflops": 5.0}
    device_id, private, _ = enroll(server, cfg, "pi-1", profile)
    with ws(server) as conn:
        assignment = first_assignment(conn, device_id, private, profile)
        assert assignment.shape_key.experts_per_layer == (2, 2)
        send(conn, BundleRequest(shape_key_id=assignment.shape_key.id))
        assembler, files = BundleAssembler(assignment.shape_key.id, tmp_path / "rx", max_total_bytes=64 << 20), None
        while files is None:
            chunk = recv(conn)
            assert isinstance(chunk, BundleData)
            files = assembler.add(chunk)
        manifest = Manifest.from_json(files["manifest.json"].read_text())
        assert manifest.shape_key == assignment.shape_key
        assert {s.name for s in manifest.tensors} == set(assignment.tensors)

        assert assignment.config.eval_fraction == 0.1  # the coordinator's default asks for federated evaluation
        update = replace(
            fake_update(assignment, manifest), evaluation=EvalResult(loss=2.25, num_examples=3, num_tokens=12)
        )
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
        check_the_federated_evaluation_was_recorded(registry, assignment, device_id)
        store = tensor_store(cfg)  # keep_update_tensors is off: the aggregated update's file goes, its row stays
        assert wait_for(lambda: not store.has(updates[0].tensor_sha256)) and store.has(version.tensor_sha256)
    finally:
        registry.close()


def check_the_federated_evaluation_was_recorded(registry, assignment, device_id):
    """The device's score of the model it received: in the round's metrics (aggregate and per device, with the shape
    key it scored with) and as registry metrics, the round's and the device's own."""
    metrics = registry.get_round(assignment.round_id).metrics
    assert metrics["fed_eval_loss"] == pytest.approx(2.25)
    assert (metrics["fed_eval_num_examples"], metrics["fed_eval_num_clients"]) == (3, 1)
    assert metrics["fed_eval_devices"] == {
        device_id: {"loss": 2.25, "num_examples": 3, "num_tokens": 12.0, "shape_key": assignment.shape_key.id}
    }
    logged = {(m.name, m.device_id): m.value for m in registry.metrics(round_id=assignment.round_id)}
    assert logged[("fed_eval_loss", None)] == pytest.approx(2.25) and logged[("fed_eval_num_examples", None)] == 3
    assert logged[("fed_eval_loss", device_id)] == pytest.approx(2.25)
    assert logged[("fed_eval_num_examples", device_id)] == 3


def check_the_new_version_was_evaluated(cfg, registry, version):
    """The coordinator logged the held-out score of the new version: the evaluator's score of its state."""
    from coordinator.evaluation import Evaluator

    scores = wait_for(
        lambda: (
            {m.name: m.value for m in registry.metrics(round_id=version.round_id) if m.name.startswith("eval_")} or None
        )
    )
    expected = Evaluator.from_config(cfg).score(tensor_store(cfg).load(version.tensor_sha256))
    assert scores == pytest.approx({"eval_accuracy": expected.accuracy, "eval_loss": expected.loss}, rel=1e-6)
    initial = Evaluator.from_config(cfg).score(None)
    assert initial.loss != pytest.approx(expected.loss, rel=1e-6)  # the +1 / +0.5 shifts changed the model


def _version_after(registry, version):
    latest = registry.latest_model_version()
    return latest if latest.version > version else None


def wait_for(probe, timeout=60.0, every=0.2):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def check_only_trained_rows_changed(cfg, registry, version, assignment):

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


def test_a_restart_deletes_the_update_files_of_past_rounds_only(tmp_path):
    from coordinator.service import Coordinator
    from device_runtime.stats import RoutingStats

    cfg = initialised_coordinator(tmp_path, tmp_path / "state")
    registry, store = Registry(cfg.registry_url), tensor_store(cfg)
    try:
        device = registry.redeem_token(registry.create_enroll_token("pi", 600), "pi", {}, generate_keypair()[1])
        shas = {}
        for status in ("failed", "running"):  # a failed round's update was never aggregated, so never deleted
            round_id = registry.start_round("hfedmoe", {}).id
            shas[status] = store.put({"x": np.full(3, round_id, np.float32)})
            registry.record_update(
                update_id=f"u{round_id}",
                round_id=round_id,
                device_id=device.id,
                num_examples=1,
                num_tokens=1,
                tensor_sha256=shas[status],
                metadata={"routing": RoutingStats([2]).to_dict()},
                accepted=True,
            )
            if status == "failed":
                registry.finish_round(round_id, metrics={"reason": "0 of 1"}, status="failed")
        Coordinator.from_config(cfg).close()
        assert not store.has(shas["failed"]) and store.has(shas["running"])  # the running round resumes with it
        assert len(registry.update_shas()) == 2  # the rows stay
    finally:
        registry.close()


def test_evaluation_runs_in_a_background_priority_thread():
    import threading

    from coordinator.evaluation import BACKGROUND_NICE, background_executor

    def nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = nice()
    pool = background_executor()
    try:
        worker = pool.submit(nice).result()
    finally:
        pool.shutdown()
    assert worker == max(BACKGROUND_NICE, before) and nice() == before  # the caller's thread is untouched


def test_config_round_trip_and_errors(tmp_path, initialised):
    from device_runtime.errors import ConfigError

    cfg = initialised[0]
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg
    (tmp_path / "bad.toml").write_text('checkpoint = "m"\nport = 70000\n')
    with pytest.raises(ConfigError, match="port"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "flag.toml").write_text('checkpoint = "m"\nkeep_update_tensors = "yes"\n')
    with pytest.raises(ConfigError, match="keep_update_tensors"):
        load_config(tmp_path / "flag.toml")
    (tmp_path / "fit.toml").write_text('checkpoint = "m"\n[fit]\nbatch_size = 0\n')
    with pytest.raises(ConfigError, match=r"\[fit\]"):
        load_config(tmp_path / "fit.toml")
    (tmp_path / "unknown.toml").write_text('checkpoint = "m"\nprot = 1\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(tmp_path / "unknown.toml")


def test_invalid_update_is_rejected_recorded_once_and_the_round_retried(server, initialised):
    cfg, memory = initialised
    profile = {"memory_mib": memory, "gflops": 5.0}
    device_id, private, _ = enroll(server, cfg, "pi-2", profile)
    with ws(server) as conn:
        assignment = first_assignment(conn, device_id, private, profile)
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


def test_an_update_with_bad_evaluation_numbers_is_refused(server, initialised):
    """Federated evaluation numbers come from the network: out of the field bounds (a loss above MAX_EVAL_LOSS,
    NaN, an accuracy above 1) the frame is refused (Error bad_header) and nothing is recorded; within them but
    inconsistent with the assignment (more tokens than examples x seq_len) the update is rejected (Ack)."""
    cfg, memory = initialised
    profile = {"memory_mib": memory, "gflops": 5.0}
    device_id, private, _ = enroll(server, cfg, "pi-eval", profile)
    with ws(server) as conn:
        assignment = first_assignment(conn, device_id, private, profile)
        from device_runtime.bundle import load_bundle

        manifest = load_bundle(os.path.join(cfg.state_dir, "bundles", assignment.shape_key.id)).manifest
        update = fake_update(assignment, manifest)
        nan = encode(replace(update, evaluation=EvalResult(loss=1.25, num_examples=2, num_tokens=8)))
        (hlen,) = struct.unpack(">I", nan[:4])
        header = nan[4 : 4 + hlen].replace(b'"loss":1.25', b'"loss":NaN')
        nan = struct.pack(">I", len(header)) + header + nan[4 + hlen :]
        for bad in (
            encode(replace(update, evaluation=EvalResult(loss=5e3, num_examples=2, num_tokens=8))),
            nan,  # a JSON encoder refuses to write NaN: a hostile device writes it anyway
            encode(replace(update, evaluation=EvalResult(loss=1.0, num_examples=2, num_tokens=8, accuracy=1.5))),
            encode(replace(update, evaluation=EvalResult(loss=1.0, num_examples=0, num_tokens=0))),
        ):
            conn.send(bad)
            reply = recv(conn)
            assert isinstance(reply, Error) and reply.code == "bad_header", (bad, reply)
        registry = Registry(cfg.registry_url)
        assert registry.get_update(update.update_id) is None
        registry.close()
        tokens = 2 * assignment.config.seq_len + 1
        send(conn, replace(update, evaluation=EvalResult(loss=1.0, num_examples=2, num_tokens=tokens)))
        ack = recv_ack(conn)
        assert not ack.accepted and "evaluation num_tokens" in ack.reason


def _closed(registry, round_id):
    row = registry.get_round(round_id)
    return row if row.status != "running" else None


# ---------------------------------------------------------------- devices that cannot take their assignment


@pytest.fixture
def fresh(request, tmp_path, monkeypatch):
    """``(server, config, memory_mib)``: a coordinator of its own (round deadline 120 s, 2 attempts per round;
    an indirect parameter ``{field: value}`` overrides config fields) and an empty export cache (the first
    round's bundle export takes seconds)."""
    monkeypatch.setenv("FEDMOE_CACHE", str(tmp_path / "cache"))
    overrides = {"max_message_mib": MAX_MIB, "max_attempts": 2, **getattr(request, "param", {})}
    cfg = initialised_coordinator(tmp_path, tmp_path / "state", **overrides)
    srv = ServerThread(cfg)
    yield srv, cfg, two_expert_memory(tmp_path / "checkpoint")
    srv.stop()


def _update_rows(cfg, round_id):
    from sqlalchemy import select

    from coordinator.registry.tables import UpdateRecord as Update

    registry = Registry(cfg.registry_url)
    try:
        with registry.engine.connect() as conn:
            return conn.execute(select(Update).where(Update.round_id == round_id)).all()
    finally:
        registry.close()


def _wait_closed(cfg, round_id, timeout):
    registry = Registry(cfg.registry_url)
    try:
        return wait_for(lambda: _closed(registry, round_id), timeout=timeout)
    finally:
        registry.close()


def test_a_training_error_rejects_the_assignment_at_once_and_failed_rounds_back_off_with_an_alert(fresh, caplog):
    import logging
    import time

    from device_runtime.bundle import load_bundle

    server, cfg, memory = fresh
    caplog.set_level(logging.INFO, logger="fedmoe.coord")
    profile = {"memory_mib": memory, "gflops": 5.0}
    device_id, private, _ = enroll(server, cfg, "pi-fails", profile)
    with ws(server) as conn:
        first = first_assignment(conn, device_id, private, profile)
        sent = time.monotonic()
        send(conn, Error(code="internal", message=f"{first.update_id}: DataError: no usable records"))
        row = _wait_closed(cfg, first.round_id, timeout=20)
        assert time.monotonic() - sent < 20 < cfg.rounds.deadline_s
        assert row.status == "failed" and "0 of 1 required updates accepted (1 rejected" in row.metrics["reason"]
        [update] = _update_rows(cfg, first.round_id)
        assert (update.update_id, update.accepted, update.tensor_sha256) == (first.update_id, False, None)
        assert update.reason == f"device reported internal: {first.update_id}: DataError: no usable records"

        second = recv(conn, timeout=60)  # the round is retried with the same device
        assert isinstance(second, Assignment) and second.round_id > first.round_id
        # A late Error about the first assignment, and an 'unexpected' one, do not end the device's part:
        send(conn, Error(code="internal", message=f"{first.update_id}: OSError: disk full"))
        send(conn, Error(code="unexpected", message="evaluate is not expected by a device"))
        manifest = load_bundle(os.path.join(cfg.state_dir, "bundles", second.shape_key.id)).manifest
        send(conn, replace(fake_update(second, manifest), update_id="r999-forged"))
        assert not recv_ack(conn).accepted  # the Errors before it were handled (one connection, in order)
        assert _update_rows(cfg, second.round_id) == []
        send(conn, Error(code="bad_payload", message="bundle experts-2.2 rejected: sha256 differs"))
        assert _wait_closed(cfg, second.round_id, timeout=20).status == "failed"

        # Two failed rounds = [rounds] max_attempts: an alert, rounds back off; the device failed both assignments
        # and is excluded for backoff_s (10 s), and still served.
        wait_for(lambda: "ALERT: 2 consecutive rounds failed" in caplog.text, timeout=20)
        assert (
            f"device {device_id} failed 2 assignments in a row (last: it reported bad_payload); not selected for"
            in caplog.text
        )
        assert "rounds stopped" not in caplog.text
        with pytest.raises(TimeoutError):
            recv(conn, timeout=0.5)  # no new round
        send(conn, Heartbeat())
    test_healthz(server)


@pytest.mark.parametrize("fresh", [{"max_attempts": 3, "backoff_s": 1.0}], indirect=True)
def test_a_device_that_takes_its_assignment_and_drops_cannot_halt_the_federation(fresh, caplog):
    """Issue 19, item 2: the only selectable device (min_fit_clients = 1) logs in, takes its assignment and
    disconnects, three times. The old coordinator did not count the drops against the device and stopped all
    rounds after 3 failed ones ("rounds stopped"), so an honest device that connected next got no assignment.
    Now the dropper is excluded with back-off, the failed rounds raise an alert, and the honest device's round
    starts and counts its update, without a restart."""
    import logging

    from device_runtime.bundle import load_bundle

    server, cfg, memory = fresh
    caplog.set_level(logging.INFO, logger="fedmoe.coord")
    profile = {"memory_mib": memory, "gflops": 5.0}
    dropper, dropper_key, _ = enroll(server, cfg, "dropper", profile)
    honest, honest_key, _ = enroll(server, cfg, "honest", profile)
    dropped = []
    for _ in range(3):
        with ws(server) as conn:
            dropped.append(first_assignment(conn, dropper, dropper_key, profile).round_id)
        assert _wait_closed(cfg, dropped[-1], timeout=20).status == "failed"  # at once, not at the deadline
    assert len(set(dropped)) == 3
    wait_for(lambda: "ALERT: 3 consecutive rounds failed" in caplog.text, timeout=20)
    assert (
        f"device {dropper} failed 2 assignments in a row (last: it disconnected); not selected for 1 s" in caplog.text
    )
    assert "rounds stopped" not in caplog.text
    with ws(server) as conn:
        assignment = first_assignment(conn, honest, honest_key, profile)
        assert assignment.round_id > dropped[-1]
        manifest = load_bundle(os.path.join(cfg.state_dir, "bundles", assignment.shape_key.id)).manifest
        send(conn, fake_update(assignment, manifest))
        assert recv_ack(conn).accepted
    assert _wait_closed(cfg, assignment.round_id, timeout=20).status == "finished"


def test_an_assignment_too_big_for_the_device_is_rejected_once_not_resent(fresh):
    import time

    from websockets.exceptions import ConnectionClosedError

    server, cfg, memory = fresh
    profile = {"memory_mib": memory, "gflops": 5.0}
    device_id, private, _ = enroll(server, cfg, "pi-small-frames", profile)

    def small(max_size=4096):
        return connect(server.url, max_size=max_size, compression=None, open_timeout=10)

    with small() as conn:
        assert isinstance(login(conn, device_id, private, profile), AuthOk)
        with pytest.raises(ConnectionClosedError) as closed:
            conn.recv(timeout=120)  # the Assignment frame: refused by websockets (close code 1009)
        assert closed.value.sent.code == 1009
    registry = Registry(cfg.registry_url)
    round_id = registry.list_rounds(limit=1)[0].id
    registry.close()
    row = _wait_closed(cfg, round_id, timeout=20)
    assert row.status == "failed" and "1 rejected" in row.metrics["reason"]
    [update] = _update_rows(cfg, round_id)
    assert not update.accepted and update.reason.endswith(" MiB exceeds the device's max message size")
    assert update.reason.startswith("assignment of 0.")  # a tiny model's assignment: under 1 MiB, over 4 KiB

    with small() as conn:  # reconnected with the same profile: neither re-sent nor selected again
        assert isinstance(login(conn, device_id, private, profile), AuthOk)
        with pytest.raises(TimeoutError):
            conn.recv(timeout=2.0)
    started = time.monotonic()
    with ws(server) as conn:  # another profile (e.g. a new runtime with a larger max_size): selected again
        assert isinstance(login(conn, device_id, private, {**profile, "max_message_mib": MAX_MIB}), AuthOk)
        assignment = recv(conn, timeout=60)
        assert isinstance(assignment, Assignment) and assignment.round_id > round_id
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("fresh", [{"min_fit_clients": 2, "max_fit_clients": 2}], indirect=True)
def test_a_device_gone_while_its_assignment_is_planned_gets_it_when_it_reconnects(fresh):
    server, cfg, memory = fresh
    profile = {"memory_mib": memory, "gflops": 5.0}
    (first, first_key), (second, second_key) = sorted(
        enroll(server, cfg, name, profile)[:2] for name in ("pi-leaves", "pi-stays")
    )  # planned in this order
    registry = Registry(cfg.registry_url)
    try:
        with ws(server) as stays:
            assert isinstance(login(stays, second, second_key, profile), AuthOk)
            with ws(server) as leaves:
                assert isinstance(login(leaves, first, first_key, profile), AuthOk)
                # both are connected: a round opens
                row = wait_for(lambda: registry.list_rounds(limit=1), timeout=30, every=0.01)[0]
                assert registry.assignments(row.id) == []  # still planning: the bundle export takes seconds
            # ``first`` left while its assignment was planned; ``second`` holds the round open.
            assert isinstance(recv(stays, timeout=120), Assignment)
            assigned = {a.device_id: a.update_id for a in registry.assignments(row.id)}
            assert set(assigned) == {first, second}
            with ws(server) as back:
                assert isinstance(login(back, first, first_key, profile), AuthOk)
                resent = recv(back, timeout=30)  # the pending assignment, re-sent on reconnect
                assert isinstance(resent, Assignment)
                assert (resent.round_id, resent.update_id) == (row.id, assigned[first])
            assert registry.get_round(row.id).status == "running"
    finally:
        registry.close()


def test_a_failing_bundle_export_skips_the_device_and_rounds_go_on(fresh):
    import shutil
    from pathlib import Path

    server, cfg, memory = fresh
    profile = {"memory_mib": memory, "gflops": 5.0}
    device_id, private, _ = enroll(server, cfg, "pi-unlucky", profile)
    bundles = Path(cfg.state_dir) / "bundles"
    shutil.rmtree(bundles)
    bundles.write_text("not a directory")  # the export fails with NotADirectoryError (an OSError, not a FedmoeError)
    registry = Registry(cfg.registry_url)
    try:
        with ws(server) as conn:
            assert isinstance(login(conn, device_id, private, profile), AuthOk)
            row = wait_for(lambda: registry.list_rounds(limit=1), timeout=30)[0]
            assert _wait_closed(cfg, row.id, timeout=20).status == "failed" and registry.assignments(row.id) == []
            with pytest.raises(TimeoutError):
                recv(conn, timeout=1.0)  # skipped until it reconnects
        bundles.unlink()
        bundles.mkdir()
        with ws(server) as conn:  # the round loop survived: the next round assigns the device
            assert isinstance(login(conn, device_id, private, profile), AuthOk)
            assignment = recv(conn, timeout=60)
            assert isinstance(assignment, Assignment) and assignment.round_id > row.id
    finally:
        registry.close()
