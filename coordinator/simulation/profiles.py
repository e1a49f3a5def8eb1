"""Simulated device profiles: memory and compute budgets, from a TOML file or the embedded default.

TOML layout (one table per kind; ``count`` devices of each kind)::

    [[device]]
    kind = "raspberry-pi"
    memory_mib = 1024      # the device's memory budget (MiB): planner budget and OS memory limit
    gflops = 5.0           # compute (GFLOP/s) the planner assumes
    count = 2
    backend = "zo"         # optional: the device's training backend ("ort-training" or "zo"; default: the
                           # first installed), e.g. zeroth-order Pis in a federation with first-order laptops
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from device_runtime.backends import BACKENDS
from device_runtime.errors import ConfigError

DEFAULT_PROFILES = """
[[device]]
kind = "raspberry-pi"
memory_mib = 1536
gflops = 5.0
count = 2

[[device]]
kind = "phone"
memory_mib = 3072
gflops = 15.0
count = 2

[[device]]
kind = "laptop"
memory_mib = 8192
gflops = 40.0
count = 1
"""


@dataclass(frozen=True)
class SimulatedDevice:
    """One simulated device: its name, kind, budget (memory in MiB, compute in GFLOP/s) and training backend
    (``device_runtime.backends`` name; "" = the device's own choice)."""

    name: str
    kind: str
    memory_mib: int
    gflops: float
    backend: str = ""


def parse_profiles(text: str, *, source: str = "profiles") -> list[SimulatedDevice]:
    """Expand the ``[[device]]`` tables into one :class:`SimulatedDevice` per simulated device.

    Raises:
        ConfigError: invalid TOML, no device, or a non-positive memory / gflops / count.
    """
    try:
        tables = tomllib.loads(text).get("device", [])
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    devices = []
    for table in tables:
        try:
            kind, memory, gflops = str(table["kind"]), int(table["memory_mib"]), float(table.get("gflops", 10.0))
            count, backend = int(table.get("count", 1)), str(table.get("backend", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: a [[device]] needs kind and memory_mib ({exc})") from exc
        if memory <= 0 or gflops <= 0 or count < 1:
            raise ConfigError(f"{source}: device {kind!r} needs memory_mib > 0, gflops > 0 and count >= 1")
        if backend and backend not in BACKENDS:
            raise ConfigError(f"{source}: device {kind!r} has backend {backend!r}; choose one of {sorted(BACKENDS)}")
        devices += [SimulatedDevice(f"{kind}-{len(devices) + i}", kind, memory, gflops, backend) for i in range(count)]
    if not devices:
        raise ConfigError(f"{source}: no [[device]] table")
    return devices


def load_profiles(path: str | Path | None, *, num_devices: int | None = None) -> list[SimulatedDevice]:
    """Devices from ``path`` (or the default mix: 2 Pis of 1.5 GiB, 2 phones of 3 GiB, 1 laptop of 8 GiB).

    With ``num_devices``, the list is cycled or cut to that many devices.
    """
    text = DEFAULT_PROFILES if path is None else Path(path).read_text()
    devices = parse_profiles(text, source=str(path or "default profiles"))
    if num_devices is None:
        return devices
    if num_devices < 1:
        raise ConfigError(f"--num-devices must be >= 1, got {num_devices}")
    cycled = [devices[i % len(devices)] for i in range(num_devices)]
    return [replace(d, name=f"{d.kind}-{i}") for i, d in enumerate(cycled)]
