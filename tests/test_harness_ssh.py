"""``fedmoe-android`` against a real sshd on loopback (a throwaway user stands in for a Pi) and a real coordinator.

1. deploy -> the deployed runtime (its own venv from Debian's python3, installed offline from the wheelhouse)
   completes a round; status / logs show it; stop / start; a re-deploy upgrades in place keeping the device's
   credentials, bundle cache and pending updates, and trains round 2; undeploy removes everything.
2. Bad input: an unreachable target, a wrong key, no Python, too little memory or disk, an unreachable
   coordinator, a bad token: each a one-line error naming the next step, and nothing left on the device.

The container has no systemd user session, so these tests exercise the supervisor service (see README).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import sshd
from harness_cli import finished_after, harness, ok, refused, running_coordinator
from helpers import RECORDS

pytestmark = pytest.mark.skipif(sshd.missing() is not None, reason=str(sshd.missing()))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = sshd.start(tmp_path_factory.mktemp("sshd"))
    yield started
    sshd.stop(started)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The workstation's wheelhouse cache, shared by this module's deploys (one download per test session)."""
    return tmp_path_factory.mktemp("fedmoe-cache")


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    yield from running_coordinator(tmp_path_factory)


def test_deploy_round_status_logs_stop_upgrade_undeploy(server, coordinator, cache, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 2))
    common = (server.target, "-F", str(server.ssh_config))
    root = server.home / ".fedmoe"
    out = ok(
        harness(
            cache,
            "deploy",
            *common,
            "--coordinator",
            coordinator.url,
            "--name",
            "pi-loop",
            "--config",
            str(coordinator.config),
            "--data",
            str(data),
            "--memory-mib",
            "1024",
        )
    )
    assert "deployed pi-loop" in out and "supervisor service" in out and "enrolled now" in out, out
    assert (root / "venv" / "bin" / "python").exists() and not (root / "incoming").exists()
    assert (root / "home" / "credentials.json").stat().st_uid == server.home.stat().st_uid
    assert oct((root / "home" / "credentials.json").stat().st_mode & 0o777) == "0o600"

    first, devices = finished_after(coordinator.cfg, 0)  # rounds keep running (num_rounds 0) while it is up
    assert [d.name for d in devices] == ["pi-loop"]
    status = json.loads(ok(harness(cache, "status", *common, "--json")))
    assert status["running"] and status["name"] == "pi-loop" and status["extra"] == "device"
    assert status["backend"] == "ort-training" and "ort-training" in status["backends"]
    assert status["last_round"] >= first and 0 < status["last_peak_rss_mib"] < 1024
    logs = ok(harness(cache, "logs", *common, "-n", "20000"))  # rounds keep running: the login scrolls up
    assert "authenticated as" in logs and f"round {first}: loss" in logs

    ok(harness(cache, "stop", *common))
    stopped = json.loads(ok(harness(cache, "status", *common, "--json")))
    assert not stopped["running"]
    assert not (root / "supervisor.pid").exists()
    credentials = hashlib.sha256((root / "home" / "credentials.json").read_bytes()).hexdigest()
    bundles = sorted(p.name for p in (root / "home" / "state" / "bundles").iterdir())
    assert bundles, "round 1 cached no bundle"
    sentinel = root / "home" / "state" / "updates" / "sentinel.txt"
    sentinel.write_text("pending")

    out = ok(
        harness(
            cache,
            "deploy",
            *common,
            "--coordinator",
            coordinator.url,
            "--name",
            "pi-loop",
            "--config",
            str(coordinator.config),
            "--memory-mib",
            "1024",
        )
    )
    assert "upgraded pi-loop" in out and "credentials kept" in out, out
    assert hashlib.sha256((root / "home" / "credentials.json").read_bytes()).hexdigest() == credentials
    assert sorted(p.name for p in (root / "home" / "state" / "bundles").iterdir()) == bundles
    assert sentinel.read_text() == "pending" and (root / "data.jsonl").exists()
    later, devices = finished_after(coordinator.cfg, stopped["last_round"])  # trained by the upgraded runtime
    assert [d.name for d in devices] == ["pi-loop"]  # the same device: no second enrollment
    assert json.loads(ok(harness(cache, "status", *common, "--json")))["last_round"] >= later

    ok(harness(cache, "stop", *common))
    ok(harness(cache, "start", *common))
    assert json.loads(ok(harness(cache, "status", *common, "--json")))["running"]
    out = ok(harness(cache, "undeploy", *common, "--yes"))
    assert f"fedmoe-coord devices revoke {devices[0].id}" in out, out
    assert not root.exists()
    refused(harness(cache, "status", *common), "nothing is deployed", "fedmoe-android deploy")


# ---------------------------------------------------------------- bad input: a clear error, nothing left behind


def deploy_args(server, coordinator_url: str, *extra: str, ssh_config: Path | None = None) -> tuple[str, ...]:
    return (
        "deploy",
        server.target,
        "-F",
        str(ssh_config or server.ssh_config),
        "--coordinator",
        coordinator_url,
        "--name",
        "pi-bad",
        "--device-data",
        "/nonexistent.jsonl",
        *extra,
    )


def nothing_left(server) -> None:
    assert not (server.home / ".fedmoe").exists()


def test_unreachable_target(server, cache):
    port = sshd.free_port()
    result = harness(
        cache,
        "deploy",
        f"ssh:{server.user}@127.0.0.1:{port}",
        "-F",
        str(server.ssh_config),
        "--coordinator",
        "ws://127.0.0.1:1",
        "--name",
        "pi-bad",
    )
    refused(result, f"cannot reach {server.user}@127.0.0.1 port {port}", "Connection refused", "ssh server runs")


def test_wrong_key(server, cache, tmp_path):
    config = tmp_path / "ssh_config"
    other = sshd.keypair(tmp_path / "other_key")
    config.write_text(server.ssh_config.read_text().replace(str(server.ssh_config.parent / "id_ed25519"), str(other)))
    refused(
        harness(cache, *deploy_args(server, "ws://127.0.0.1:1", ssh_config=config)),
        "refused the ssh key",
        "ssh-copy-id",
        "--identity",
    )
    nothing_left(server)


def test_no_python(server, cache):
    refused(
        harness(cache, *deploy_args(server, "ws://127.0.0.1:1", "--python", "python3.99")),
        "has no 'python3.99' on its PATH",
        "install Python >= 3.11",
        "--python",
    )
    nothing_left(server)


def test_unreachable_coordinator(server, cache):
    url = f"ws://127.0.0.1:{sshd.free_port()}"
    refused(
        harness(cache, *deploy_args(server, url)),
        f"cannot reach the coordinator at {url}",
        "ConnectionRefusedError",
        "`fedmoe-coord serve` runs",
    )
    nothing_left(server)


def test_too_little_memory(server, coordinator, cache):
    refused(
        harness(cache, *deploy_args(server, coordinator.url, "--memory-mib", "100000000")),
        "MiB of memory available",
        "the runtime needs 100000000 MiB",
        "lower --memory-mib",
    )
    nothing_left(server)


def test_too_little_disk(server, coordinator, cache):
    small = server.home / "small"  # a 16 MiB file system in the user's home
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)]).returncode != 0:
        small.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        os.chown(small, server.home.stat().st_uid, server.home.stat().st_gid)
        text = refused(
            harness(cache, *deploy_args(server, coordinator.url, "--remote-dir", f"{small}/fedmoe")),
            "MiB free under",
            "free disk space there or pick another --remote-dir",
        )
        assert "has 16 MiB free" in text, text
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
        small.rmdir()


def test_failed_enrollment_removes_the_install(server, coordinator, cache):
    """The token is refused after the venv was installed: the fresh deployment is removed entirely."""
    result = harness(cache, *deploy_args(server, coordinator.url), "--token", "not-a-token")
    refused(result, "enrolling pi-bad with the coordinator", "AuthError")
    nothing_left(server)
