"""Android (Termux) specifics: Termux's own packages instead of PyPI wheels, and an online pip for the rest.

PyPI has no Android wheels for numpy, onnxruntime, tokenizers, safetensors, msgspec or cryptography, so on
Termux the runtime's venv is created ``--system-site-packages`` over Termux's packages
(``pkg install python python-pip python-numpy python-onnxruntime python-cryptography``: plain onnxruntime, so
the ``device-lite`` extra and its forward-only backend), and pip installs the remaining requirements of that
extra on the device from PyPI: the pure-Python ones directly, and tokenizers, safetensors and msgspec built
from source (Termux's ``rust`` and ``clang``, also installed). That build needs the phone online (Termux's
mirror, PyPI, crates.io) and takes minutes on a phone; unlike the ssh path, the device is not offline here.
Only fedmoe's own wheel is pushed from the workstation.

Supported (as written, not tried on a phone: none can run here): Android 7+ with a debuggable Termux (the
APKs of Termux's GitHub releases), Termux's Python 3.12-3.14, Termux:Boot for the boot script.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from packaging.requirements import Requirement

from android_harness.errors import DeployError
from android_harness.targets import Target
from android_harness.wheelhouse import Platform, extra_requirements

q = shlex.quote
EXTRA = "device-lite"
PACKAGES = ("python", "python-pip", "python-numpy", "python-onnxruntime", "python-cryptography", "rust", "clang")
PROVIDED = frozenset({"numpy", "onnxruntime", "cryptography"})  # by the python-* packages above
NO_TERMUX = 3


def prepare(target: Target, *, say=print) -> None:
    """Check Termux is set up and install its packages (``pkg install -y``, idempotent).

    Raises:
        DeployError: no Termux prefix / ``pkg`` (install and open Termux once), or ``pkg`` failed.
    """
    result = target.run(
        f'[ -x "$PREFIX/bin/pkg" ] || exit {NO_TERMUX}; pkg install -y {" ".join(PACKAGES)}', timeout=3600
    )
    if result.returncode == NO_TERMUX:
        raise DeployError(
            f"{target.spec}: no Termux found ($PREFIX/bin/pkg); install Termux from its GitHub "
            "releases and open it once so it sets up its files"
        )
    if result.returncode != 0:
        raise DeployError(
            f"{target.spec}: `pkg install {' '.join(PACKAGES)}` failed in Termux: "
            f"{result.stderr.strip()[-400:]}; check the phone is online and run `pkg update` there"
        )
    say(f"{target.spec}: Termux packages present: {', '.join(PACKAGES)}")


def requirements(wheel: Path, platform: Platform) -> list[str]:
    """The ``device-lite`` requirements Termux's packages do not provide (pip installs them on the device)."""
    return [r for r in extra_requirements(wheel, EXTRA, platform) if Requirement(r).name not in PROVIDED]


def install_script(root: str, python: str, wheel_name: str, reqs: list[str]) -> str:
    """Make ``venv.new`` over Termux's site-packages, pip the rest from PyPI, fedmoe's wheel without deps."""
    pip = "venv.new/bin/python -m pip --disable-pip-version-check"
    return f"""set -e
cd {q(root)}
rm -rf venv.new
{q(python)} -m venv --without-pip --system-site-packages venv.new
{pip} install --quiet --no-compile {" ".join(q(r) for r in reqs)}
{pip} install --quiet --no-compile --no-deps --force-reinstall {q(f"incoming/wheels/{wheel_name}")}
venv.new/bin/python -c 'import device_runtime.cli'
"""
