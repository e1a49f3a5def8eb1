"""Everything a device installs, built on the workstation: a wheel of fedmoe itself and a wheelhouse of its
dependencies for the target's platform, so the device needs no index (only the coordinator) to install.

The wheelhouse is ``pip download --only-binary=:all: --platform <tags> --python-version X.Y --implementation
cp`` of the requirements of one extra of the fedmoe wheel (read from the wheel's own metadata, so they never
drift from ``pyproject.toml``), plus pip itself (the device's venv is created ``--without-pip`` and pip runs from
its wheel: Debian's python3 needs no python3-venv package then). It is cached under
``$FEDMOE_CACHE/wheelhouses/<key>``, the key hashing the requirements, tags and Python version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement

from android_harness.errors import DeployError

_SOURCES = ("pyproject.toml", "README.md", "coordinator", "device_runtime", "export", "android_harness")
# manylinux_2_17 (= manylinux2014) is the oldest tag current wheels use; Raspberry Pi OS bookworm has glibc 2.36.
_OLDEST_GLIBC_MINOR = 17


@dataclass(frozen=True)
class Platform:
    """What a wheel must match: ``python`` "3.11", ``arch`` "x86_64" / "aarch64", ``glibc`` "2.36"."""

    python: str
    arch: str
    glibc: str

    def tags(self) -> list[str]:
        """pip ``--platform`` tags, newest first: ``manylinux_2_<m>_<arch>`` down to 2_17, manylinux2014."""
        major, minor = (int(x) for x in self.glibc.split(".")[:2])
        if major != 2 or minor < _OLDEST_GLIBC_MINOR:
            raise DeployError(
                f"glibc {self.glibc} is older than 2.17: no current wheels run there; upgrade the "
                "device's OS (Raspberry Pi OS bookworm has glibc 2.36)"
            )
        return [f"manylinux_2_{m}_{self.arch}" for m in range(minor, _OLDEST_GLIBC_MINOR - 1, -1)] + [
            f"manylinux2014_{self.arch}"
        ]


def source_root() -> Path:
    """The fedmoe checkout this harness runs from (it holds ``pyproject.toml``).

    Raises:
        DeployError: the harness is installed without its sources.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise DeployError(
            f"no pyproject.toml above {Path(__file__).parent}; run fedmoe-android from a fedmoe "
            "checkout (pip install -e .)"
        )
    return root


def build_runtime_wheel(out_dir: Path) -> Path:
    """Build ``fedmoe-<version>-py3-none-any.whl`` from :func:`source_root` into ``out_dir`` (a copy of the
    sources is built, so the checkout gets no ``build/`` or ``*.egg-info``).

    Raises:
        DeployError: the build failed (with pip's output).
    """
    root = source_root()
    with tempfile.TemporaryDirectory(prefix="fedmoe-src-") as tmp:
        for name in _SOURCES:
            src = root / name
            if src.is_dir():
                shutil.copytree(src, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.is_file():
                shutil.copy2(src, Path(tmp) / name)
        _pip(
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(out_dir),
            tmp,
            what="building the fedmoe wheel",
        )
    wheels = sorted(out_dir.glob("fedmoe-*.whl"))
    if len(wheels) != 1:
        raise DeployError(f"expected one fedmoe wheel in {out_dir}, found {[w.name for w in wheels]}")
    return wheels[0]


def wheel_metadata(wheel: Path) -> dict:
    """``{"version": str, "extras": [...], "requires": [Requires-Dist lines]}`` of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(archive.read(name).decode())
    return {
        "version": meta["Version"],
        "extras": meta.get_all("Provides-Extra") or [],
        "requires": meta.get_all("Requires-Dist") or [],
    }


def extra_requirements(wheel: Path, extra: str, platform: Platform) -> list[str]:
    """Requirement strings (markers dropped) that ``fedmoe[extra]`` installs on ``platform``: the base
    dependencies plus the extra's, following ``fedmoe[other]`` self-references.

    Raises:
        DeployError: the wheel has no such extra.
    """
    meta = wheel_metadata(wheel)
    if extra not in meta["extras"]:
        raise DeployError(f"fedmoe {meta['version']} has no extra {extra!r} (it has {', '.join(meta['extras'])})")
    env = {
        "python_version": platform.python,
        "python_full_version": platform.python + ".0",
        "platform_machine": platform.arch,
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
    }
    wanted, seen, out = [extra], set(), []
    while wanted:
        current = wanted.pop()
        if current in seen:
            continue
        seen.add(current)
        for line in meta["requires"]:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": current}):
                continue
            if req.name == "fedmoe":
                wanted.extend(req.extras)
                continue
            text = f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{req.specifier}"
            if text not in out:
                out.append(text)
    return sorted(out)


def wheelhouse(requirements: list[str], platform: Platform, cache: Path) -> Path:
    """A directory of wheels satisfying ``requirements`` (and pip) on ``platform``, downloaded once.

    Raises:
        DeployError: some requirement has no wheel for the platform (pip's last error line in the message).
    """
    tags = platform.tags()
    key = hashlib.sha256(json.dumps([requirements, tags, platform.python]).encode()).hexdigest()[:16]
    final = cache / "wheelhouses" / f"cp{platform.python.replace('.', '')}-{platform.arch}-{key}"
    if (final / "requirements.json").is_file():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _pip(
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--dest",
            str(tmp),
            *(f"--platform={t}" for t in tags),
            f"--python-version={platform.python}",
            "--implementation=cp",
            "pip",
            *requirements,
            what=f"downloading wheels for Python {platform.python} on {platform.arch}",
        )
        (tmp / "requirements.json").write_text(json.dumps(requirements))
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _pip(*args: str, what: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        raise DeployError(f"{what} failed: {(errors or done.stderr.strip().splitlines() or ['?'])[-1]}")
