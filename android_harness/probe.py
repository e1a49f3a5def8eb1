"""Look at a target before anything is written to it: its Python, architecture, C library, free memory and
disk, service manager, an existing deployment, and whether it can reach the coordinator.

The probe is a small Python program sent on stdin to the device's own interpreter (it runs on Python 3.5+,
so an old Python is reported, not a syntax error). :func:`check_target` and :func:`check_disk` turn what it
found into a clear :class:`DeployError` naming the next step.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from urllib.parse import urlsplit

from android_harness.errors import DeployError
from android_harness.targets import Target
from android_harness.wheelhouse import Platform

MIN_PYTHON = (3, 11)
NO_PYTHON = 127  # the shell's "command not found"

_PROBE = r"""
import json, os, platform, socket, subprocess, sys
root = os.path.abspath(os.path.expanduser(ROOT))
probe = root
while not os.path.exists(probe):
    probe = os.path.dirname(probe)
st = os.statvfs(probe)
mem = {}
with open("/proc/meminfo") as f:
    for line in f:
        key, value = line.split(":", 1)
        mem[key] = int(value.split()[0]) // 1024
reach = ""
try:
    socket.create_connection((HOST, PORT), 5).close()
except (OSError, ValueError) as exc:
    reach = "{}: {}".format(type(exc).__name__, exc)
systemd = False
try:
    systemd = subprocess.call(["systemctl", "--user", "show-environment"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) == 0
except OSError:
    pass
deployed = None
try:
    with open(os.path.join(root, "deploy.json")) as f:
        deployed = json.load(f)
except (OSError, ValueError):
    pass
print(json.dumps({
    "python": "{}.{}".format(*sys.version_info[:2]), "python_path": sys.executable,
    "arch": platform.machine(), "glibc": platform.libc_ver()[1] or "",
    "root": root, "free_disk_mib": st.f_bavail * st.f_frsize // 1048576,
    "memory_total_mib": mem.get("MemTotal", 0), "memory_available_mib": mem.get("MemAvailable", mem.get("MemFree", 0)),
    "coordinator_error": reach, "systemd_user": systemd,
    "termux": "com.termux" in os.environ.get("PREFIX", ""),
    "android": os.path.exists("/system/build.prop"),
    "deployed": deployed,
    "credentials": os.path.isfile(os.path.join(root, "home", "credentials.json")),
    "root_exists": os.path.isdir(root), "root_entries": len(os.listdir(root)) if os.path.isdir(root) else 0,
}))
"""


@dataclass(frozen=True)
class TargetInfo:
    """What :func:`probe` found. Sizes in MiB; ``root`` is the absolute remote directory of the deployment;
    ``coordinator_error`` is empty when the device reached the coordinator's host and port; ``deployed`` is the
    existing deployment's ``deploy.json`` (None if none); ``credentials``: the device is already enrolled."""

    python: str
    python_path: str
    arch: str
    glibc: str
    root: str
    free_disk_mib: int
    memory_total_mib: int
    memory_available_mib: int
    coordinator_error: str
    systemd_user: bool
    termux: bool
    android: bool
    deployed: dict | None
    credentials: bool
    root_exists: bool
    root_entries: int

    @property
    def platform(self) -> Platform:
        return Platform(self.python, self.arch, self.glibc or "2.17")


def coordinator_address(url: str) -> tuple[str, int]:
    """``ws[s]://HOST:PORT`` -> (host, port). Raises DeployError on another form."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise DeployError(
            f"coordinator URL {url!r} must look like ws://HOST:PORT or wss://HOST:PORT (the address "
            "the device uses to reach `fedmoe-coord serve`)"
        )
    return parts.hostname, parts.port or (443 if parts.scheme == "wss" else 80)


def probe(target: Target, *, python: str, root: str, coordinator: str | None) -> TargetInfo:
    """Run the probe on ``target`` with the interpreter ``python`` (a name on the device's PATH or a path).

    Args:
        root: the deployment directory on the device (``~`` allowed).
        coordinator: the URL the device will use (None: do not test reachability).

    Raises:
        DeployError: the target is unreachable (see Target.run), or has no such Python.
    """
    host, port = coordinator_address(coordinator) if coordinator else ("127.0.0.1", 0)
    program = f"ROOT = {root!r}\nHOST = {host!r}\nPORT = {port!r}\n" + _PROBE
    quoted = shlex.quote(python)
    result = target.run(
        f"command -v {quoted} >/dev/null 2>&1 || exit {NO_PYTHON}; exec {quoted} -", input=program.encode(), timeout=60
    )
    if result.returncode == NO_PYTHON:
        raise DeployError(
            f"{target.spec} has no {python!r} on its PATH; install Python >= 3.11 there "
            f"({_python_hint(target)}) or pass --python with its path"
        )
    if result.returncode != 0:
        raise DeployError(f"probing {target.spec} with {python} failed: {result.stderr.strip()[-500:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    if not coordinator:
        data["coordinator_error"] = ""
    return TargetInfo(**data)


def check_target(info: TargetInfo, target: Target, *, coordinator: str, memory_mib: int) -> None:
    """Refuse a target that cannot run the runtime, before anything is written to it.

    Args:
        memory_mib: memory the runtime needs (the device's budget), MiB.

    Raises:
        DeployError: Python too old, the coordinator unreachable from the device, too little memory.
    """
    version = tuple(int(x) for x in info.python.split("."))
    if version < MIN_PYTHON:
        raise DeployError(
            f"{target.spec} runs Python {info.python} ({info.python_path}); fedmoe needs >= 3.11: "
            f"install it ({_python_hint(target)}) and pass --python with its path"
        )
    if info.coordinator_error:
        raise DeployError(
            f"{target.spec} cannot reach the coordinator at {coordinator} ({info.coordinator_error}); "
            "give --coordinator the workstation's address as the device sees it (not 127.0.0.1 "
            "unless it is the same machine), and check that `fedmoe-coord serve` runs and its port "
            "is open"
        )
    if info.memory_available_mib < memory_mib:
        raise DeployError(
            f"{target.spec} has {info.memory_available_mib} MiB of memory available (of "
            f"{info.memory_total_mib} MiB) and the runtime needs {memory_mib} MiB; stop other "
            "programs there or lower --memory-mib"
        )


def check_disk(info: TargetInfo, target: Target, *, disk_mib: int) -> None:
    """Refuse a target with less than ``disk_mib`` MiB free under the deployment directory (DeployError)."""
    if info.free_disk_mib < disk_mib:
        raise DeployError(
            f"{target.spec} has {info.free_disk_mib} MiB free under {info.root} and the install "
            f"needs {disk_mib} MiB; free disk space there or pick another --remote-dir"
        )


def _python_hint(target: Target) -> str:
    return (
        "in Termux: pkg install python"
        if target.kind == "adb"
        else "Debian / Raspberry Pi OS bookworm: sudo apt install python3"
    )
