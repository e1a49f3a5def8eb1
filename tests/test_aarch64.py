"""The device runtime on aarch64, for real: Debian trixie's arm64 Python 3.13 under qemu user-mode
emulation, the ``device-lite`` wheels for aarch64 installed offline from a wheelhouse, enrolls with a real
coordinator on loopback and completes one zeroth-order round on a tiny bundle, uploading seeds and scalars.

Needs ``.ci/setup.d/30-aarch64.sh`` (debootstrap; trixie's static qemu-user 10 in ``/opt/qemu-user-10``:
bookworm's qemu 7.2 crashes in ``import onnxruntime``). Built once and cached under ``$FEDMOE_CACHE/aarch64``
(no binfmt_misc, no chroot):

- ``root``: ``debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 trixie`` and every
  downloaded .deb unpacked with ``dpkg-deb -x`` (the second stage would need to exec arm64 binaries);
- ``wheels``: ``pip download --only-binary=:all: --platform manylinux_*_aarch64 --python-version 3.13``
  (this resolution checks every ``Requires-Python`` against 3.13);
- ``root/opt/fedmoe-site``: those exact wheels unpacked by the host's pip for the aarch64 / cp313 tags
  (pip under emulation takes minutes).

The device runs as ``qemu-aarch64 -L root root/usr/bin/python3.13 -m device_runtime.cli`` with a clean
environment (``env -i``-style) so nothing of the host's Python leaks in. Time: first run ~2 min of
downloads and unpacking, then ~1-2 min per run (emulated imports and compute are 10-300x slower).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the coordinator exports the bundle
from apt_sources import debian_mirror  # noqa: E402
from helpers import REPO, build_lock, lite_requirements, one_round_federation, run_cli_device_round  # noqa: E402

pytestmark = pytest.mark.slow
QEMU = Path(os.environ.get("FEDMOE_QEMU_AARCH64", "/opt/qemu-user-10/usr/bin/qemu-aarch64"))
SUITE = "trixie"
PYTHON = "usr/bin/python3.13"
SITE = "opt/fedmoe-site"
PLATFORMS = ("manylinux_2_39_aarch64", "manylinux_2_28_aarch64", "manylinux2014_aarch64")
TAGS = [arg for p in PLATFORMS for arg in ("--platform", p)] + [
    "--python-version",
    "3.13",
    "--implementation",
    "cp",
    "--abi",
    "cp313",
    "--abi",
    "abi3",
    "--abi",
    "none",
    "--only-binary=:all:",
]
COORD_MIB = 4.0


def _run(*args, timeout: float = 900) -> None:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args[:3]} failed: {out.stderr[-3000:]}"


def _arm64_root(cache: Path) -> Path:
    """The unpacked trixie arm64 root with python3.13 (built once)."""
    root = cache / "root"
    if not (root / ".complete").exists():
        if shutil.which("debootstrap") is None:
            pytest.skip("debootstrap is missing: run .ci/setup.d/30-aarch64.sh")
        shutil.rmtree(root, ignore_errors=True)
        _run(
            "debootstrap",
            "--arch=arm64",
            "--foreign",
            "--variant=minbase",
            "--include=python3",
            SUITE,
            root,
            debian_mirror(),
        )
        for deb in sorted((root / "var/cache/apt/archives").glob("*.deb")):
            _run("dpkg-deb", "-x", deb, root)
            deb.unlink()
        (root / ".complete").touch()
    return root


def _site(cache: Path, root: Path) -> None:
    """``root/opt/fedmoe-site``: the device-lite wheels for aarch64 / cp313, from the cached wheelhouse."""
    requirements = lite_requirements()
    key = hashlib.sha256(json.dumps(requirements).encode()).hexdigest()[:12]
    wheels, site = cache / f"wheels-{key}", root / SITE
    if not (wheels / ".complete").exists():
        shutil.rmtree(wheels, ignore_errors=True)
        _run("python", "-m", "pip", "download", "-q", *TAGS, "-d", wheels, *requirements)
        (wheels / ".complete").write_text("\n".join(requirements))
    marker = site / ".complete"
    if not marker.exists() or marker.read_text() != key:
        shutil.rmtree(site, ignore_errors=True)
        # exactly the wheels resolved above for 3.13 (so --ignore-requires-python only skips re-checking
        # them against the host's 3.11); tags are still checked against TAGS
        _run(
            "python",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--ignore-requires-python",
            *TAGS,
            "--target",
            site,
            *sorted(wheels.glob("*.whl")),
        )
        marker.write_text(key)


@pytest.fixture(scope="session")
def arm64_python() -> list[str]:
    """The command running the emulated aarch64 Python 3.13 with the device-lite wheels."""
    from export.loading import cache_dir

    if not QEMU.is_file():
        pytest.skip(f"{QEMU} is missing: run .ci/setup.d/30-aarch64.sh (trixie's qemu-user 10)")
    cache = cache_dir() / "aarch64"
    with build_lock(cache):
        root = _arm64_root(cache)
        _site(cache, root)
    return [str(QEMU), "-L", str(root), str(root / PYTHON)]


def arm64_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: the emulated site + this tree, nothing of the host's Python configuration."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": f"/{SITE}:{REPO}",
        "PYTHONNOUSERSITE": "1",
        **extra,
    }


def test_emulated_python_is_aarch64_313_with_only_the_zo_backend(arm64_python, tmp_path):
    code = (
        "import platform, sys, onnxruntime; from device_runtime.backends import available_backends; "
        "print(platform.machine(), sys.version_info[:2], onnxruntime.__version__ != '', available_backends())"
    )
    out = subprocess.run(
        [*arm64_python, "-c", code], env=arm64_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split(" ", 1) == ["aarch64", "(3, 13) True ('zo', 'split')\n"]


def test_emulated_aarch64_device_completes_a_zeroth_order_round(arm64_python, tmp_path):
    fit = {"batch_size": 2, "seq_len": 8, "local_steps": 2, "learning_rate": 1e-2, "zo_seeds": 16}  # seeds + scalars
    with one_round_federation(tmp_path, max_message_mib=COORD_MIB, fit=fit, deadline_s=900) as (
        server,
        registry,
        data,
        memory,
    ):
        env = arm64_env(
            tmp_path,
            FEDMOE_DEVICE_HOME=str(tmp_path / "device"),
            FEDMOE_ENROLL_TOKEN=registry.create_enroll_token("pi-arm64", 3600),
        )
        round_, update, log = run_cli_device_round(
            [*arm64_python, "-m", "device_runtime.cli"],
            env,
            server.url,
            registry,
            name="pi-arm64",
            memory_mib=memory,
            max_message_mib=COORD_MIB,
            data=data,
            timeout_s=600,
        )
        (device,) = registry.list_devices()
        assert device.profile["arch"] == "aarch64" and device.profile["backend"] == "zo"
        assert update.meta["metrics"]["zeroth_order"] == 1.0 and update.meta["metrics"]["steps"] == 2.0
        assert registry.latest_model_version().version == 1 and round_.metrics["num_clients"] == 1
