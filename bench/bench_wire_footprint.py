"""Footprint on a device of the wire's validation library: msgspec (chosen) against pydantic v2.

For each candidate: the wheels a device downloads (this platform and manylinux2014 aarch64, cp311) and
their total size, the installed size in a fresh venv, and the import CPU time (user + sys of a fresh
interpreter, minimum over ``--runs``, minus a bare interpreter's), both for the import alone and for the
import plus one constrained dataclass validated. CPU time, not wall time, because the machine is shared.

    python bench/bench_wire_footprint.py [--runs 25] [--workdir /tmp/fedmoe-wire-footprint]

Needs PyPI (pip download). Prints one table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

from device_runtime.units import MIB

CANDIDATES = {"msgspec": "msgspec", "pydantic": "pydantic>=2"}
IMPORT = {"msgspec": "import msgspec, msgspec.json", "pydantic": "from pydantic import TypeAdapter, Field"}
VALIDATE = {
    "msgspec": "import dataclasses, msgspec\nfrom typing import Annotated\n"
    "@dataclasses.dataclass(frozen=True)\nclass A:\n    x: Annotated[int, msgspec.Meta(ge=0)]\n"
    "    y: Annotated[str, msgspec.Meta(pattern='^[a-z]+$')]\n"
    "msgspec.convert({'x': 1, 'y': 'a'}, A)\n",
    "pydantic": "import dataclasses\nfrom typing import Annotated\nfrom pydantic import TypeAdapter, Field\n"
    "@dataclasses.dataclass(frozen=True)\nclass A:\n    x: Annotated[int, Field(ge=0)]\n"
    "    y: Annotated[str, Field(pattern='^[a-z]+$')]\n"
    "TypeAdapter(A).validate_python({'x': 1, 'y': 'a'})\n",
}


def download(requirement: str, dest: Path, *platform: str) -> list[Path]:
    """The wheels pip resolves for ``requirement`` (dependencies included) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(dest), *platform, requirement],
        check=True,
    )
    return sorted(dest.glob("*.whl"))


def cpu_ms(python: str, code: str, runs: int) -> float:
    """Minimum user + sys CPU milliseconds of ``python -c code`` over ``runs`` fresh interpreters."""
    best = float("inf")
    for _ in range(runs):
        pid = os.fork()
        if pid == 0:
            os.execv(python, [python, "-c", code])
        _, status, usage = os.wait4(pid, 0)
        if status != 0:
            raise SystemExit(f"{python} -c {code!r} failed")
        best = min(best, usage.ru_utime + usage.ru_stime)
    return best * 1000


def _tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def measure(name: str, requirement: str, work: Path, runs: int) -> dict:
    here = download(requirement, work / name / "wheels")
    arm = download(
        requirement,
        work / name / "wheels-aarch64",
        "--platform",
        "manylinux2014_aarch64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
    )
    env = work / name / "venv"
    venv.create(env, with_pip=True, clear=True)
    python = str(env / "bin" / "python")
    site = next((env / "lib").glob("python*/site-packages"))
    empty = _tree_bytes(site)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", *map(str, here)], check=True)
    installed = _tree_bytes(site) - empty
    bare = cpu_ms(python, "pass", runs)
    return {
        "name": name,
        "wheels": len(here),
        "wheel_mib": sum(p.stat().st_size for p in here) / MIB,
        "wheel_aarch64_mib": sum(p.stat().st_size for p in arm) / MIB,
        "installed_mib": installed / MIB,
        "import_ms": cpu_ms(python, IMPORT[name], runs) - bare,
        "validate_ms": cpu_ms(python, VALIDATE[name], runs) - bare,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedmoe-wire-footprint"))
    opts = parser.parse_args()
    rows = [measure(name, req, opts.workdir, opts.runs) for name, req in CANDIDATES.items()]
    print("| library | wheels | wheels MiB (here / aarch64) | installed MiB | import CPU ms | import + validate ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['wheels']} | {r['wheel_mib']:.2f} / {r['wheel_aarch64_mib']:.2f} | "
            f"{r['installed_mib']:.2f} | {r['import_ms']:.0f} | {r['validate_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
