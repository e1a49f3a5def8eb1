"""A logged-in device's frame limit is sized from its assignments (issue 19, item 4), on a real server."""

from __future__ import annotations

from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from coordinator.frame_cap import HEADER_ROOM
from device_runtime.bundle import Manifest
from device_runtime.wire import Ack, AuthOk

pytest.importorskip("torch")
from helpers import ServerThread, fake_update, initialised_coordinator, two_expert_memory  # noqa: E402
from test_server import MAX_MIB, enroll, first_assignment, login, recv, send, ws  # noqa: E402

OVER_CAP = HEADER_ROOM + (512 << 10)  # above any frame a device of the tiny model may need, below MAX_MIB


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    cfg = initialised_coordinator(root, root / "state", max_message_mib=MAX_MIB)
    server = ServerThread(cfg)
    yield server, cfg, {"memory_mib": two_expert_memory(root / "checkpoint")}
    server.stop()


def closed_code(conn) -> int | None:
    try:
        while True:
            conn.recv(timeout=10)
    except ConnectionClosed as exc:
        return None if exc.rcvd is None else exc.rcvd.code


def test_a_device_without_an_assignment_cannot_send_a_large_frame(setup):
    """Old code accepted any frame up to max_message_mib (4 MiB here; 256 MiB by default) once logged in."""
    server, cfg, _ = setup
    profile = {"memory_mib": 10}  # too little for any assignment
    device_id, private, _ = enroll(server, cfg, "idle", profile)
    with ws(server) as conn:
        assert isinstance(login(conn, device_id, private, profile), AuthOk)
        assert OVER_CAP < MAX_MIB * 2**20
        conn.send(b"\0" * OVER_CAP)
        assert closed_code(conn) == 1009


def test_an_assigned_device_sends_its_update_and_no_more(setup):
    server, cfg, profile = setup
    device_id, private, _ = enroll(server, cfg, "assigned", profile)
    with ws(server) as conn:
        assignment = first_assignment(conn, device_id, private, profile)
        manifest = Manifest.from_json(
            (Path(cfg.state_dir) / "bundles" / assignment.shape_key.id / "manifest.json").read_text()
        )
        send(conn, fake_update(assignment, manifest))
        while not isinstance(reply := recv(conn), Ack):
            pass
        assert reply.accepted, reply.reason
        conn.send(b"\0" * OVER_CAP)
        assert closed_code(conn) == 1009
    with ws(server) as conn:  # a later connection may re-send it (a lost Ack): the limit comes from the registry
        assert isinstance(login(conn, device_id, private, profile), AuthOk)
        send(conn, fake_update(assignment, manifest))
        while not isinstance(reply := recv(conn), Ack):
            pass
        assert reply.update_id == assignment.update_id
