"""A device with only the ``device-lite`` extra, in its own venv (plain onnxruntime; no onnxruntime-training,
no torch): it enrolls with a real coordinator on loopback, trains forward-only (zeroth-order) and its update
is aggregated into the next global model version.

The venv is built once per requirement set from a wheel cache under ``$FEDMOE_CACHE/device-lite``
(``pip download`` fills it the first time, so CI needs PyPI once; later runs are offline and reuse the
venv: about 1 s). The device runs ``python -m device_runtime.cli`` from this tree via ``PYTHONPATH``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the coordinator exports the bundles
from helpers import REPO, build_lock, lite_requirements, one_round_federation, run_cli_device_round  # noqa: E402

COORD_MIB = 4.0


def _pip(python: Path | str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="session")
def lite_python() -> Path:
    """The interpreter of a venv holding exactly ``lite_requirements()`` (built once, then reused)."""
    from export.loading import cache_dir

    requirements = lite_requirements()
    root = cache_dir() / "device-lite"
    key = hashlib.sha256(json.dumps([requirements, sys.version]).encode()).hexdigest()[:12]
    venv, wheels = root / f"venv-{key}", root / "wheels"
    python = venv / "bin" / "python"
    with build_lock(root):
        if not (venv / "complete").exists():
            _build_venv(venv, wheels, requirements)
    return python


def _build_venv(venv: Path, wheels: Path, requirements: list[str]) -> None:
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    offline = _pip(python, "install", "--no-index", "--find-links", str(wheels), *requirements)
    if offline.returncode != 0:  # first run: fill the wheel cache
        fetched = _pip(sys.executable, "download", "--only-binary=:all:", "-d", str(wheels), *requirements)
        assert fetched.returncode == 0, fetched.stderr
        installed = _pip(python, "install", "--no-index", "--find-links", str(wheels), *requirements)
        assert installed.returncode == 0, installed.stderr
    (venv / "complete").write_text("\n".join(requirements))


def lite_env(**extra: str) -> dict[str, str]:
    """A clean environment for the venv: this tree on PYTHONPATH, nothing of the shared env's."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    return {**keep, "PYTHONPATH": str(REPO), **extra}


def test_lite_venv_has_plain_onnxruntime_and_neither_training_nor_torch(lite_python):
    code = (
        "import importlib.util as u, onnxruntime, device_runtime.cli, device_runtime.client; "
        "from device_runtime.backends import available_backends; "
        "print(available_backends(), u.find_spec('torch') is None, "
        "(__import__('pathlib').Path(onnxruntime.__file__).parent / 'training').exists())"
    )
    out = subprocess.run([str(lite_python), "-c", code], env=lite_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["('zo',", "'split')", "True", "False"]


def test_lite_device_enrolls_trains_forward_only_and_its_update_is_aggregated(lite_python, tmp_path):
    from coordinator.federation import tensor_store

    fit = {"batch_size": 2, "seq_len": 8, "local_steps": 4, "learning_rate": 1e-2}
    with one_round_federation(tmp_path, max_message_mib=COORD_MIB, fit=fit) as (server, registry, data, memory):
        env = lite_env(
            FEDMOE_DEVICE_HOME=str(tmp_path / "device"),
            FEDMOE_ENROLL_TOKEN=registry.create_enroll_token("pi-lite", 3600),
        )
        _, update, _ = run_cli_device_round(
            [str(lite_python), "-m", "device_runtime.cli"],
            env,
            server.url,
            registry,
            name="pi-lite",
            memory_mib=memory,
            max_message_mib=COORD_MIB,
            data=data,
            timeout_s=120,
        )
        (registered,) = registry.list_devices()
        assert registered.profile["backends"] == ["zo", "split"] and registered.profile["backend"] == "zo"
        assert update.meta["metrics"]["zeroth_order"] == 1.0 and update.meta["metrics"]["steps"] == 4.0
        assert_aggregated(tensor_store(server.cfg), registry, update)


def assert_aggregated(store, registry, update) -> None:
    """Version 1 differs from version 0 exactly in the MoE rows of the update's trained experts (layer 0)."""
    v0 = store.load(registry.get_model_version(0).tensor_sha256)
    v1 = store.load(registry.latest_model_version().tensor_sha256)
    changed = sorted(n for n in v0 if not np.array_equal(v0[n], v1[n]))
    assert changed and all(".mlp.experts." in n or n.endswith(".mlp.gate.weight") for n in changed), changed
    trained = update.meta["trained_experts"][0]
    experts = "model.layers.0.mlp.experts.down_proj"
    assert trained and all(np.array_equal(v0[experts][e], v1[experts][e]) == (e not in trained) for e in range(4))
