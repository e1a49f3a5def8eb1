"""The processes of a simulation: one ``fedmoe-coord serve`` and one ``fedmoe-device run`` per device.

Each device process runs under an operating-system memory limit equal to its budget. ``RLIMIT_AS`` counts
address space, not memory: an ORT training process with 650 MB peak RSS died under a 900 MB ``RLIMIT_AS``
(``docs/stack.md``, memory budgets), so the budget is enforced with ``RLIMIT_DATA`` (heap and private
anonymous mappings, which is where tensors live). A bundle that does not fit fails visibly: the device
process dies with a MemoryError / bad_alloc, the simulation reports its exit status. Peak RSS is the process's ``VmHWM``
(``/proc/<pid>/status``), sampled while it runs: ``wait4``'s ``ru_maxrss`` would include the parent's
resident memory at fork time, which exec carries over.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.errors import FedmoeError
from device_runtime.memory import status_kib
from device_runtime.units import MIB


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(name: str) -> list[str]:
    """The console script ``name`` if installed, else ``python -m <package>.cli``."""
    found = shutil.which(name)
    module = {"fedmoe-coord": "coordinator.cli", "fedmoe-device": "device_runtime.cli"}[name]
    return [found] if found else [sys.executable, "-m", module]


@dataclass
class Child:
    """A started process, its log file, and (after :meth:`stop`) its exit status and peak RSS (MiB)."""

    name: str
    process: subprocess.Popen
    log: Path
    returncode: int | None = None
    peak_rss_mib: float | None = None
    extra: dict = field(default_factory=dict)

    def poll(self) -> int | None:
        """Exit status if it has ended, else None (then its peak RSS is sampled)."""
        if self.returncode is None:
            self.sample_peak()
            if self.process.poll() is not None:
                self.returncode = self.process.returncode
        return self.returncode

    def sample_peak(self) -> None:
        """Update ``peak_rss_mib`` from the running process's ``VmHWM`` (a high-water mark: monotonic)."""
        hwm = status_kib("VmHWM", self.process.pid)
        if hwm is not None:  # None: exited, or no procfs
            self.peak_rss_mib = max(self.peak_rss_mib or 0.0, hwm / 1024)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; reaps the process."""
        if self.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.returncode is None:
            self.process.kill()
            self.returncode = self.process.wait()

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])


def _spawn(name: str, args: list[str], log: Path, env: dict | None = None, limit_bytes: int | None = None) -> Child:
    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))

    handle = open(log, "wb")
    process = subprocess.Popen(
        args,
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        preexec_fn=limit,
    )
    handle.close()
    return Child(name, process, log)


def start_coordinator(config: Path, log: Path) -> Child:
    """``fedmoe-coord --config CONFIG serve`` as a child process."""
    return _spawn("coordinator", [*_command("fedmoe-coord"), "--config", str(config), "serve"], log)


def wait_healthy(port: int, child: Child, timeout: float = 120.0, *, cafile: str = "") -> None:
    """Poll ``http://127.0.0.1:PORT/healthz`` (``https://``, verified against ``cafile``, when given) until it
    answers.

    Raises:
        FedmoeError: the coordinator exited or did not answer in ``timeout`` seconds (with its log tail).
    """
    deadline = time.monotonic() + timeout
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise FedmoeError(f"the coordinator exited ({child.returncode}):\n{child.tail(20)}")
        try:
            with urllib.request.urlopen(
                f"{'https' if cafile else 'http'}://127.0.0.1:{port}/healthz", timeout=2, context=context
            ) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise FedmoeError(f"the coordinator did not answer /healthz within {timeout:.0f} s:\n{child.tail(20)}")


def _backend_env(backend: str) -> dict[str, str]:
    """``$FEDMOE_DEVICE_BACKEND`` for a device given a training backend ("" = the device's own choice)."""
    return {"FEDMOE_DEVICE_BACKEND": backend} if backend else {}


def enroll_device(
    url: str, token: str, name: str, home: Path, memory_mib: int, backend: str = "", *, command: list[str] | None = None
) -> None:
    """``fedmoe-device enroll`` (a real websocket enrollment), credentials under ``home``; ``backend``: the
    training backend the device reports and uses ("" = its own choice); ``command``: how to run ``fedmoe-device``
    (default: the console script, else ``python -m device_runtime.cli``).

    Raises:
        FedmoeError: enrollment failed (with its output).
    """
    home.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [*(command or _command("fedmoe-device")), "enroll", url, "--name", name, "--memory-mib", str(memory_mib)],
        env={**os.environ, "FEDMOE_DEVICE_HOME": str(home), "FEDMOE_ENROLL_TOKEN": token, **_backend_env(backend)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise FedmoeError(f"enrolling {name} failed: {result.stdout}{result.stderr}")


def start_device(
    url: str,
    name: str,
    home: Path,
    data: Path,
    memory_mib: int,
    *,
    threads: int,
    slots: str,
    max_message_mib: float,
    backend: str = "",
    command: list[str] | None = None,
) -> Child:
    """``fedmoe-device run`` under RLIMIT_DATA = ``memory_mib`` MiB; training slots bound the concurrency;
    ``command``: as for :func:`enroll_device`."""
    args = [
        *(command or _command("fedmoe-device")),
        "run",
        url,
        "--data",
        str(data),
        "--memory-mib",
        str(memory_mib),
        "--threads",
        str(threads),
        "--max-message-mib",
        str(max_message_mib),
    ]
    env = {"FEDMOE_DEVICE_HOME": str(home), "FEDMOE_TRAINING_SLOTS": slots, **_backend_env(backend)}
    child = _spawn(name, args, home / "device.log", env, limit_bytes=memory_mib * MIB)
    child.extra["memory_mib"] = memory_mib
    return child
