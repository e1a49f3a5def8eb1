"""Device processes placed on a Ray cluster (``fedmoe-coord simulate --ray-address ADDR``).

Without ``--ray-address`` the simulation starts every ``fedmoe-device run`` on this machine
(``coordinator.simulation.processes``). With it, each device gets one Ray actor, :class:`DeviceHost`, placed by Ray
on some node of the cluster (``SPREAD``, ``num_cpus`` = ``cpus_per_device`` and Ray's logical ``memory`` resource =
the device's budget, so a node holds only the budgets it has room for). The actor does on its node what the local
pool does here: it enrolls the device over the websocket with its one-time token (credentials stay in a device home
on that node) and starts the same ``fedmoe-device run`` process under ``RLIMIT_DATA`` = its budget, which talks to
the coordinator over real websockets with mutual TLS. The coordinator, its registry and its state stay in the
simulating process's machine. This differs from Flower's simulation engine, which runs ClientApps inside Ray
actors (virtual clients sharing a worker process, messages passed in memory): here every device is its own OS
process with its own memory limit and its own TLS connection.

What travels to a node: fedmoe's own packages (``device_runtime`` and ``coordinator``, as Ray ``py_modules``, so
a node needs only the device's third-party dependencies, ``fedmoe[device]``, and the same Ray and Python as the
driver), the coordinator's URL, the device's pinned one-time token (``TOKEN.CA_FINGERPRINT``), its budget and
backend, and its data shard (the JSONL bytes). Nothing comes back but the process's state, its peak RSS and, when
it stops, its log (written to ``<run>/devices/<name>/device.log`` here). Training slots (``--slots``) are per
machine: a directory under the node's temp dir named after the run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.simulation.processes import Child, enroll_device, start_device
from device_runtime.errors import ConfigError, FedmoeError
from device_runtime.units import MIB

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PLACE_TIMEOUT_S = 120.0  # how long a device's actor may wait for a node with room before the run fails
CALL_TIMEOUT_S = 60.0  # one call to a started actor (poll, stop)


@dataclass(frozen=True)
class RayOptions:
    """Where the device processes run (``simulate --ray-address`` and its companions).

    Attributes:
        address: the Ray cluster (``ray.init(address=...)``: ``HOST:PORT`` of its GCS, or ``auto``).
        cpus_per_device: Ray CPUs each device's actor reserves (fractions allowed: training slots, not Ray,
            bound how many train at once on a node).
        coordinator_host: the coordinator's address as the nodes reach it; loopback (the default) serves on
            127.0.0.1 and works only when every node is this machine; any other address serves on every
            interface and goes into the server certificate.
    """

    address: str
    cpus_per_device: float = 1.0
    coordinator_host: str = "127.0.0.1"

    @property
    def listen_host(self) -> str:
        """Where the coordinator listens: loopback for a loopback URL, every interface otherwise."""
        return "127.0.0.1" if self.coordinator_host in LOOPBACK else "0.0.0.0"


def _device_command() -> list[str]:
    """``fedmoe-device`` as this actor imported it (the shipped ``py_modules``), never a console script that may
    belong to another installation on the node."""
    return [sys.executable, "-m", "device_runtime.cli"]


class DeviceHost:
    """One device on one Ray node: its home, its enrollment and its ``fedmoe-device run`` process
    (:mod:`coordinator.simulation.processes`). Made a Ray actor by :func:`start_devices`."""

    def __init__(self, name: str, run_id: str):
        import device_runtime

        self.name, self.run_id = name, run_id
        self.home = Path(tempfile.mkdtemp(prefix=f"fedmoe-{run_id}-{name}-"))
        self.child: Child | None = None
        # the device process imports the same fedmoe code as this actor (Ray's py_modules directory)
        package_root = str(Path(device_runtime.__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)

    def where(self) -> dict[str, str]:
        """The node this actor runs on: Ray node id, host name, the device's home."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "home": str(self.home),
        }

    def start(
        self,
        url: str,
        token: str,
        data: bytes,
        memory_mib: int,
        *,
        backend: str,
        slots: int,
        max_message_mib: float,
    ) -> int:
        """Enroll over the websocket, then start ``fedmoe-device run`` under its memory limit; returns its pid.

        Raises:
            FedmoeError: enrollment failed (with its output).
        """
        shard = self.home / "data.jsonl"
        shard.write_bytes(data)
        command = _device_command()
        enroll_device(url, token, self.name, self.home, memory_mib, backend, command=command)
        slot_dir = Path(tempfile.gettempdir()) / f"fedmoe-slots-{self.run_id}"
        self.child = start_device(
            url,
            self.name,
            self.home,
            shard,
            memory_mib,
            threads=1,
            slots=f"{slot_dir}:{slots}",
            max_message_mib=max_message_mib,
            backend=backend,
            command=command,
        )
        return self.child.process.pid

    def poll(self) -> tuple[int | None, float | None]:
        """``(exit status or None while it runs, peak RSS MiB so far)``."""
        assert self.child is not None
        return self.child.poll(), self.child.peak_rss_mib

    def tail(self, lines: int) -> str:
        return "" if self.child is None else self.child.tail(lines)

    def stop(self) -> tuple[int | None, float | None, bytes]:
        """SIGTERM (then SIGKILL) the device process; ``(exit status, peak RSS MiB, its log)``; removes its home."""
        if self.child is None:
            return None, None, b""
        self.child.stop()
        log = self.child.log.read_bytes() if self.child.log.exists() else b""
        shutil.rmtree(self.home, ignore_errors=True)
        return self.child.returncode, self.child.peak_rss_mib, log


class RemoteChild:
    """A device process on a Ray node, seen from the simulating process with :class:`processes.Child`'s interface
    (``poll``, ``stop``, ``tail``, ``returncode``, ``peak_rss_mib``, ``extra``)."""

    def __init__(self, name: str, actor: Any, log: Path, memory_mib: int, node: dict[str, str]):
        self.name, self.actor, self.log = name, actor, log
        self.returncode: int | None = None
        self.peak_rss_mib: float | None = None
        self.extra: dict[str, Any] = {"memory_mib": memory_mib, **node}
        self._lost = ""

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            self._lost = f"its Ray actor on node {self.extra.get('node_id')} was lost: {exc}"
            self.returncode = -1 if self.returncode is None else self.returncode
            return None

    def poll(self) -> int | None:
        if self.returncode is None:
            answer = self._call("poll")
            if answer is not None:
                self.returncode, peak = answer
                self.peak_rss_mib = peak if peak is not None else self.peak_rss_mib
        return self.returncode

    def stop(self, timeout: float = 30.0) -> None:
        import ray

        if self.actor is None:
            return
        answer = self._call("stop")
        if answer is not None:
            self.returncode, peak, log = answer
            self.peak_rss_mib = peak if peak is not None else self.peak_rss_mib
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.log.write_bytes(log)
        ray.kill(self.actor)
        self.actor = None

    def tail(self, lines: int = 5) -> str:
        if self._lost:
            return self._lost
        if self.actor is None:
            text = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
            return "\n".join(text[-lines:])
        return str(self._call("tail", lines) or "")


def connect(options: RayOptions) -> None:
    """Join the Ray cluster at ``options.address`` as its driver (once per process), shipping fedmoe's packages.

    Raises:
        ConfigError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as exc:
        raise ConfigError('--ray-address needs Ray: pip install "fedmoe[ray]"') from exc
    if ray.is_initialized():
        return
    import coordinator
    import device_runtime

    modules = [str(Path(m.__file__).resolve().parent) for m in (device_runtime, coordinator)]
    ray.init(
        address=options.address,
        runtime_env={"py_modules": modules, "excludes": ["__pycache__", "*.pyc"]},
        log_to_driver=False,
        logging_level="WARNING",
    )


def disconnect() -> None:
    """Leave the Ray cluster if this process joined one (the cluster keeps running)."""
    ray = sys.modules.get("ray")  # never imported: never joined
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def start_devices(
    options: RayOptions,
    devices: list[tuple[str, int, str, Path]],
    tokens: list[str],
    url: str,
    out: Path,
    *,
    slots: int,
    max_message_mib: float,
) -> list[RemoteChild]:
    """One :class:`DeviceHost` actor per device ``(name, memory_mib, backend, data file)``, enrolled and started
    with its token against the coordinator at ``url``; their logs land in ``out / "devices" / name`` when stopped.

    Raises:
        FedmoeError: no node had room for a device within :data:`PLACE_TIMEOUT_S` (with the cluster's resources),
            or a device's enrollment failed.
    """
    import ray

    connect(options)
    actor_class = ray.remote(DeviceHost)
    run_id = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]  # names the node-side dirs of this run
    started: list[RemoteChild] = []
    try:
        for (name, memory_mib, backend, data), token in zip(devices, tokens):
            actor = actor_class.options(  # type: ignore[attr-defined]
                name=None,
                num_cpus=options.cpus_per_device,
                memory=memory_mib * MIB,
                scheduling_strategy="SPREAD",
                max_restarts=0,
            ).remote(name, run_id)
            try:
                node = ray.get(actor.where.remote(), timeout=PLACE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                ray.kill(actor)
                raise FedmoeError(
                    f"no Ray node had {options.cpus_per_device:g} CPUs and {memory_mib} MiB of memory free for "
                    f"device {name} within {PLACE_TIMEOUT_S:.0f} s (cluster: {ray.cluster_resources()}, free: "
                    f"{ray.available_resources()}); add nodes or lower --ray-cpus-per-device"
                ) from None
            child = RemoteChild(name, actor, out / "devices" / name / "device.log", memory_mib, node)
            started.append(child)
            try:
                ray.get(
                    actor.start.remote(
                        url,
                        token,
                        data.read_bytes(),
                        memory_mib,
                        backend=backend,
                        slots=slots,
                        max_message_mib=max_message_mib,
                    )
                )
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None) or exc
                raise FedmoeError(f"device {name} on Ray node {node['node_id']} ({node['host']}): {cause}") from None
    except BaseException:
        for child in started:
            child.stop()
        raise
    return started
