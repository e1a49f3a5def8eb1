"""``fedmoe-android`` over adb against a stand-in ``adb`` (tests/adb_standin.py: adb's argument conventions and exit
codes, the device a local folder laid out like Android + Termux) and a real coordinator.

What runs for real: the harness's command sequence (run-as com.termux with Termux's environment, pushes via
/data/local/tmp), Termux's package step (recorded: ``pkg`` cannot install Android packages here), the venv over
"Termux's" site-packages, on-device enrollment, the supervisor with its Termux:Boot script and wake lock, and the
deployed runtime completing a round. What cannot: Android itself (see README).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import adb_standin
import pytest
from harness_cli import finished_after, harness, ok, refused, running_coordinator
from helpers import RECORDS

SERIAL = "R5CT000TEST"
HOME = "/data/data/com.termux/files/home"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    yield from running_coordinator(tmp_path_factory)


@pytest.fixture
def phone(tmp_path, monkeypatch):
    """(the stand-in device folder, the harness's environment pointing FEDMOE_ADB at the stand-in)."""
    device, adb = adb_standin.make_device(tmp_path, SERIAL, sys.executable)
    monkeypatch.setenv("FEDMOE_ADB", str(adb))
    yield device
    pid = device / HOME.lstrip("/") / ".fedmoe" / "supervisor.pid"
    if pid.exists():  # a failed test left it running: end it by its id
        os.killpg(int(pid.read_text()), 9)


def calls(device) -> list[list[str]]:
    return [json.loads(line) for line in (device / "adb.log").read_text().splitlines()]


def coordinator_bundle(cfg, experts_per_layer: tuple[int, ...]):
    """The coordinator's own bundle of that shape (written now, as its first round would)."""
    from coordinator.planning import BundleStore
    from device_runtime.bundle import ShapeKey

    key = ShapeKey(experts_per_layer)
    BundleStore(Path(cfg.state_dir) / "bundles", cfg.checkpoint, cfg.fit).ensure(key)
    return Path(cfg.state_dir) / "bundles" / key.id


def test_deploy_to_termux_runs_a_round_then_undeploy(phone, coordinator, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 2))
    root = phone / HOME.lstrip("/") / ".fedmoe"
    bundle = coordinator_bundle(coordinator.cfg, (4, 4))  # 1024 MiB holds all 4 experts of both layers
    out = ok(
        harness(
            tmp_path / "cache",
            "deploy",
            f"adb:{SERIAL}",
            "--coordinator",
            coordinator.url,
            "--name",
            "phone-1",
            "--config",
            str(coordinator.config),
            "--data",
            str(data),
            "--memory-mib",
            "1024",
            "--bundle",
            str(bundle),
        )
    )
    assert "deployed phone-1" in out and "[device-lite]" in out and "termux-boot service" in out, out
    assert (root / "home/state/bundles" / bundle.name / "manifest.json").read_bytes() == (
        bundle / "manifest.json"
    ).read_bytes()

    # the command sequence: every call addresses the serial, shell calls run inside Termux, pushes are staged
    log = calls(phone)
    assert all(c[:2] == ["-s", SERIAL] for c in log)
    shells = [c[3] for c in log if c[2] == "shell" and c[3].startswith("run-as")]
    assert shells and all(s.startswith("run-as com.termux sh -c ") for s in shells)
    assert all("PREFIX=/data/data/com.termux/files/usr" in s and f"HOME={HOME}" in s for s in shells)
    pushes = [c for c in log if c[2] == "push"]
    assert pushes and all(c[4].startswith("/data/local/tmp/fedmoe-") for c in pushes)
    assert list((phone / "data/local/tmp").iterdir()) == []  # staged copies removed
    assert (
        (phone / "pkg.log")
        .read_text()
        .split("\n")[0]
        .startswith("install -y python python-pip python-numpy python-onnxruntime python-cryptography")
    )
    assert (phone / "wake.log").exists()  # start.sh took a wake lock
    boot = phone / HOME.lstrip("/") / ".termux" / "boot" / "fedmoe-device-phone-1"
    assert boot.read_text().startswith("#!/data/data/com.termux/files/usr/bin/sh")
    assert (root / "venv" / "pyvenv.cfg").read_text().count("include-system-site-packages = true") == 1

    first, devices = finished_after(coordinator.cfg, 0)
    assert [d.name for d in devices] == ["phone-1"]
    log = (root / "device.log").read_text()
    assert f"training {bundle.name}" in log and "verified and cached" not in log  # pre-staged: never downloaded
    status = json.loads(ok(harness(tmp_path / "cache", "status", f"adb:{SERIAL}", "--json")))
    assert status["running"] and status["extra"] == "device-lite" and status["service"] == "termux-boot"
    assert status["last_round"] >= first
    ok(harness(tmp_path / "cache", "stop", f"adb:{SERIAL}"))
    assert not (root / "supervisor.pid").exists()
    out = ok(harness(tmp_path / "cache", "undeploy", f"adb:{SERIAL}", "--yes"))
    assert "fedmoe-coord devices revoke" in out
    assert not root.exists() and not boot.exists()


def test_unknown_serial(phone, tmp_path):
    refused(harness(tmp_path, "status", "adb:NOSUCHPHONE"), "adb has no device 'NOSUCHPHONE'", "adb devices")


def test_termux_not_debuggable(phone, tmp_path):
    (phone / "not-debuggable").touch()
    refused(
        harness(tmp_path, "deploy", f"adb:{SERIAL}", "--coordinator", "ws://127.0.0.1:1", "--name", "p"),
        "package not debuggable",
        "GitHub releases",
        "adb forward tcp:8022 tcp:8022",
    )


def test_no_termux(phone, tmp_path):
    (phone / "data/data/com.termux/files/usr/bin/pkg").unlink()
    refused(
        harness(tmp_path, "deploy", f"adb:{SERIAL}", "--coordinator", "ws://127.0.0.1:1", "--name", "p"),
        "no Termux found",
        "open it once",
    )
    assert not (phone / HOME.lstrip("/") / ".fedmoe").exists()
