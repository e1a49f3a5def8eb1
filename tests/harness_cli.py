"""What the harness tests share: ``fedmoe-android`` as a subprocess, its outcomes, and a real coordinator."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ServerThread, initialised_coordinator

ROUND_TIMEOUT_S = 240.0


def harness(cache: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``fedmoe-android ARGS`` as a subprocess (its own FEDMOE_CACHE)."""
    return subprocess.run(
        [sys.executable, "-m", "android_harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "FEDMOE_CACHE": str(cache), "COLUMNS": "200"},
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def refused(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """A one-line DeployError (no traceback) containing every phrase."""
    text = result.stdout + result.stderr
    assert result.returncode == 1, text
    assert "Traceback" not in text and "error:" in text, text
    for phrase in phrases:
        assert phrase in " ".join(text.split()), text
    return text


def running_coordinator(tmp_path_factory):
    """A module fixture's body: a real coordinator (HFedMoE, one client per round, rounds until stopped) in a
    thread, with ``.config`` (its TOML, for the harness's --config), ``.cfg`` and ``.url``."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime.training")
    from coordinator.config import save_config

    root = tmp_path_factory.mktemp("coordinator")
    cfg = initialised_coordinator(root, root / "state", num_rounds=0, deadline_s=ROUND_TIMEOUT_S)
    config = root / "fedmoe-coord.toml"
    save_config(cfg, config)
    thread = ServerThread(cfg)
    thread.config = config
    thread.cfg = cfg
    yield thread
    thread.stop()


def finished_after(cfg, after: int):
    """(the first finished round with an id > ``after``, the enrolled devices), waiting for it."""
    from coordinator.registry import Registry

    registry = Registry(cfg.registry_url)
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            rounds = sorted(r.id for r in registry.list_rounds() if r.status == "finished" and r.id > after)
            if rounds:
                return rounds[0], registry.list_devices()
            time.sleep(0.5)
    finally:
        registry.close()
    raise AssertionError(f"no round after {after} finished in {ROUND_TIMEOUT_S:.0f} s")
