"""What a device can do: memory, cores, platform, training backends and measured float32 throughput.

The coordinator sizes each device's expert subset (its budget) from this profile.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from device_runtime.errors import ConfigError
from device_runtime.units import MIB


@dataclass(frozen=True)
class DeviceProfile:
    """A device's resources.

    Attributes:
        memory_total_mib: physical memory, MiB. memory_available_mib: memory available now, MiB.
        cores: logical CPU cores usable by this process. arch: machine (``x86_64``, ``aarch64``).
        os: ``Linux``, ``Darwin``, ``Windows``, ... backends: training backends that run here, in
            preference order (``"ort-training"``, ``"zo"``; ``device_runtime.backends``).
        gflops: measured float32 matmul throughput, GFLOP/s.
        backend: the backend this device trains with ("" if none; profiles of older devices lack it).
    """

    memory_total_mib: int
    memory_available_mib: int
    cores: int
    arch: str
    os: str
    backends: tuple[str, ...]
    gflops: float
    backend: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["backends"] = list(self.backends)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        """Parse and validate.

        Raises:
            ConfigError: a missing field, or a negative / non-finite value.
        """
        try:
            profile = cls(
                memory_total_mib=int(data["memory_total_mib"]),
                memory_available_mib=int(data["memory_available_mib"]),
                cores=int(data["cores"]),
                arch=str(data["arch"])[:64],
                os=str(data["os"])[:64],
                backends=tuple(str(b)[:64] for b in data["backends"]),
                gflops=float(data["gflops"]),
                backend=str(data.get("backend", ""))[:64],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed device profile: {exc!r}") from exc
        if min(profile.memory_total_mib, profile.memory_available_mib, profile.cores) < 0 or not (
            0.0 <= profile.gflops < 1e7
        ):
            raise ConfigError(f"device profile out of range: {profile}")
        return profile


def memory_mib() -> tuple[int, int]:
    """``(total, available)`` physical memory in MiB (``/proc/meminfo`` on Linux, sysconf elsewhere)."""
    try:
        fields = {}
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0])  # KiB
        return fields["MemTotal"] // 1024, fields.get("MemAvailable", fields["MemFree"]) // 1024
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page // MIB
        return total, total


def usable_cores() -> int:
    """Logical cores this process may run on (affinity-aware where the OS supports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def measure_gflops(size: int = 256, seconds: float = 0.3) -> float:
    """Float32 matmul throughput in GFLOP/s: repeat a ``(size, size) @ (size, size)`` product for ~``seconds``.

    Raises:
        ConfigError: ``size`` or ``seconds`` is not positive.
    """
    if size < 1 or seconds <= 0:
        raise ConfigError(f"benchmark size and seconds must be positive, got {size}, {seconds}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up (thread pool start, page faults)
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        runs += 1
    return 2.0 * size**3 * runs / elapsed / 1e9


def collect_profile(*, benchmark_seconds: float = 0.3, backend: str | None = None) -> DeviceProfile:
    """Measure this machine; ``backend`` overrides the automatic choice (``backends.select_backend``).

    Raises:
        ConfigError: ``backend`` is unknown or not installed here.
    """
    from device_runtime.backends import available_backends, select_backend

    available = available_backends()
    chosen = select_backend(backend).name if (backend or available) else ""
    total, free = memory_mib()
    return DeviceProfile(
        memory_total_mib=total,
        memory_available_mib=free,
        cores=usable_cores(),
        arch=platform.machine(),
        os=platform.system(),
        backends=available,
        gflops=round(measure_gflops(seconds=benchmark_seconds), 2),
        backend=chosen,
    )
