"""How many concurrent device connections one coordinator holds on loopback: a load generator for the coordinator.

The coordinator is real: ``fedmoe-coord serve`` as its own process (``coordinator.simulation.processes``), over a
tiny seeded Mixtral (``tests/helpers.py``: 2 layers, 4 experts, hidden 16) so the run is about connections, not
tensors. The devices are real ``device_runtime.client.DeviceClient`` objects speaking the real protocol (one-time
token enrollment, Ed25519 challenge-response, heartbeats, bundle transfer, update upload, reconnect with backoff),
run as asyncio tasks in this one process. Only their training is a stand-in: :func:`stand_in_fit` replaces
``device_runtime.client._fit_in_slot`` (DeviceClient has no trainer argument) and returns the assignment's
trainable tensors shifted, with valid routing statistics (``tests/helpers.fake_update``), without ONNX Runtime.
Nor do they collect garbage after each update (``release_memory``), which a device process does for its one client.

The coordinator serves wss:// with mutual TLS, as ``fedmoe-coord init`` sets it up (``--insecure``: plain ws://, for
comparison with older numbers): every device enrolls with a token pinned to the coordinator's CA, fetches its client
certificate, and connects with it. The registry is SQLite in the state directory, or (``--registry postgresql``) a
fresh database on the PostgreSQL server of ``--database-url`` (default: ``$FEDMOE_TEST_POSTGRES_URL`` or
``/etc/fedmoe-test-postgres-url``, which ``.ci/setup.d/20-postgresql.sh`` writes), dropped afterwards.

This process raises its own file-descriptor limits (soft and, as root, hard) to hold every client socket; the
coordinator inherits them (the product itself only raises its soft limit to the hard one: ``ulimit -Hn`` must
exceed ``max_connections``). The load generator's own TLS connections read into 16 KiB buffers instead of
asyncio's 256 KiB (:data:`CLIENT_SSL_BUFFER`; only in this process), so 10,000 clients fit beside the coordinator.

Phases:

1. idle: the coordinator runs with ``min_fit_clients = idle + 1`` so that no round can start; ``--idle`` devices
   enroll over the websocket, then connect, authenticate and heartbeat for ``--idle-seconds``.
2. rounds: the coordinator is stopped (SIGTERM) and restarted with ``min_fit_clients = max_fit_clients =
   --active`` and ``num_rounds = --rounds``; the devices reconnect on their own backoff; each round selects
   ``--active`` of them (Assignment, BundleRequest / BundleData on a device's first round, Update, Ack), the
   others stay connected and idle. ``/healthz`` probes count as ``reconnect`` until every device is back (the
   first round runs amid the others' handshakes), then as ``rounds``.

Printed: the file-descriptor limits, connections requested / established (coordinator-side socket table) / still
established after the idle period, client reconnects, the coordinator's RSS (``/proc/<pid>/status`` VmRSS) with 0
and with all connections, after the reconnect and after the rounds (with its peak, ``VmHWM``, and what is resident
by kind of mapping), ``/healthz`` latency (the coordinator's event-loop responsiveness, probed from a process
of its own: ``healthz_probe.py``), per-round wall time, assignments, accepted updates and bytes, the registry cost
of one presence sweep, and every warning or error of either side, grouped.

Run (about 3 minutes on 2 busy cores)::

    python bench/bench_connections.py --idle 1000 --active 50 --rounds 3
    python bench/bench_connections.py --idle 10000 --active 500 --rounds 3 --registry postgresql

Exit status 1 when fewer connections than requested were established or survived the idle period, or fewer
than ``--rounds`` rounds aggregated ``--active`` accepted updates each.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import bisect
import dataclasses
import logging
import os
import re
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import config_with, fake_update, initialised_coordinator  # noqa: E402

import device_runtime.client as device_client  # noqa: E402
from coordinator.admission import raise_descriptor_limit  # noqa: E402
from coordinator.config import CoordinatorConfig, save_config  # noqa: E402
from coordinator.connection import LAST_SEEN_EVERY_S  # noqa: E402
from coordinator.presence import SWEEP_S  # noqa: E402
from coordinator.registry import Registry  # noqa: E402
from coordinator.simulation.processes import Child, free_port, start_coordinator, wait_healthy  # noqa: E402
from coordinator.tls import local_url, pinned_token, with_new_authority  # noqa: E402
from device_runtime.client import DeviceClient, enroll  # noqa: E402
from device_runtime.wire import Update  # noqa: E402

CLIENT_SSL_BUFFER = 16 << 10  # bytes each of this process's TLS connections reads into (asyncio: 256 KiB)
PROFILE = {
    "memory_total_mib": 4096,
    "memory_available_mib": 2048,
    "memory_mib": 2048,
    "cores": 1,
    "arch": "x86_64",
    "os": "Linux",
    "backends": ["ort-training"],
    "gflops": 10.0,
}


# ---------------------------------------------------------------- process facts


def nofile_of(pid: int) -> str:
    """``soft/hard`` open-files limit of process ``pid`` (``/proc/<pid>/limits``)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident set size of ``pid`` in MiB (``VmRSS`` of ``/proc/<pid>/status``; ``VmHWM``: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def resident_by_kind(pid: int) -> dict[str, float]:
    """MiB resident per kind of mapping of ``pid`` (``/proc/<pid>/smaps``): ``heap`` (the main malloc arena),
    ``anonymous`` (thread arenas, large blocks malloc maps on their own, thread stacks) and ``files`` (code,
    libraries such as torch's)."""
    kinds: Counter[str] = Counter()
    kind = "files"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            path = fields[5] if len(fields) > 5 else ""
            kind = "heap" if path == "[heap]" else "anonymous" if not path or path.startswith("[") else "files"
        elif fields[0] == "Rss:":
            kinds[kind] += int(fields[1]) / 1024
    return dict(kinds)


def established(port: int) -> int:
    """Server-side TCP sockets in state ESTABLISHED on local ``port`` (``/proc/net/tcp``): connections held."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[1].endswith(f":{port:04X}") and row.split()[3] == "01")


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (``ListenOverflows`` in
    ``/proc/net/netstat``; machine-wide, so take differences)."""
    header, values = [
        line.split() for line in Path("/proc/net/netstat").read_text().splitlines() if line.startswith("TcpExt:")
    ]
    return int(values[header.index("ListenOverflows")])


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class HealthProbe:
    """``bench/healthz_probe.py`` in a process of its own, GETting ``/healthz`` every ``period_s`` seconds: the
    latencies (seconds, inf = failed) per phase label (set ``phase``) are in ``samples`` once stopped."""

    def __init__(self, port: int, workdir: Path, period_s: float = 0.5, *, cafile: str = ""):
        self.out = workdir / "healthz-probes.txt"
        self.out.unlink(missing_ok=True)
        url = f"{'https' if cafile else 'http'}://127.0.0.1:{port}/healthz"
        command = [sys.executable, str(ROOT / "bench" / "healthz_probe.py"), "--url", url, "--out", str(self.out)]
        command += ["--cafile", cafile, "--period-s", str(period_s)]
        self.process = subprocess.Popen(command)
        self.phases: list[tuple[float, str]] = [(time.monotonic(), "start")]  # (monotonic start, label)
        self.samples: dict[str, list[float]] = {}

    @property
    def phase(self) -> str:
        return self.phases[-1][1]

    @phase.setter
    def phase(self, label: str) -> None:
        self.phases.append((time.monotonic(), label))

    def stop(self) -> None:
        """End the probe process and sort its probes into the phases they started in."""
        self.process.terminate()
        self.process.wait(timeout=30)
        starts = [start for start, _ in self.phases]
        for line in self.out.read_text().splitlines():
            started, latency = (float(field) for field in line.split())
            label = self.phases[max(0, bisect.bisect_right(starts, started) - 1)][1]
            self.samples.setdefault(label, []).append(latency)


# ---------------------------------------------------------------- the load generator's devices


def stand_in_fit(_queued, bundle, assignment, data_file, **_ignored) -> Update:
    """The load generator's trainer in place of ``_fit_in_slot`` (its first argument, the slot ticket, unused):
    ``fake_update`` (trainable tensors shifted, valid routing statistics) plus the metrics ``DeviceClient`` logs.
    No training happens: this bench loads the coordinator only."""
    update = fake_update(assignment, bundle.manifest)
    return dataclasses.replace(update, metrics={**update.metrics, "steps": 1.0, "peak_rss_mb": 0.0})


class WarningCounter(logging.Handler):
    """Counts this process's WARNING+ log records by message shape (ids and numbers blanked) in ``counts``."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[normalise(record.getMessage())] += 1


def normalise(text: str) -> str:
    """A log message with device / update ids and numbers blanked, cut to 160 characters."""
    text = re.sub(r"\b(d-[0-9a-f]{16}|r\d+-d-[0-9a-f]{16}-[0-9a-f]{8}|dev-\d+)\b", "<id>", text)
    return re.sub(r"\d+(\.\d+)?", "N", text)[:160]


async def enroll_all(url: str, names: list[str], tokens: list[str], home: Path, concurrency: int):
    """Enroll every device over the websocket (``enroll``), ``concurrency`` at a time.

    Returns ``(credentials or exception per device, seconds)``."""
    gate = asyncio.Semaphore(concurrency)

    async def one(name: str, token: str):
        async with gate:
            return await enroll(url, token, name, credentials_path=home / name / "credentials.json", profile=PROFILE)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(n, t) for n, t in zip(names, tokens)), return_exceptions=True)
    return results, time.perf_counter() - start


class Fleet:
    """``DeviceClient`` tasks sharing this process's event loop."""

    def __init__(self, url: str, credentials: list, home: Path, heartbeat_s: float):
        data = home / "unused.jsonl"  # the stand-in trainer reads no data; the client only keeps the path
        data.write_text("")
        self.clients = [
            DeviceClient(
                url, c, data, cache_dir=home / c.device_id, profile=PROFILE, heartbeat_s=heartbeat_s, threads=1
            )
            for c in credentials
        ]
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(c.run()) for c in self.clients]

    async def wait_connected(self, count: int, timeout_s: float) -> list[float]:
        """Seconds until each client had authenticated ``count`` times in total (inf: not within the timeout)."""
        start, reached = time.perf_counter(), [float("inf")] * len(self.clients)
        while time.perf_counter() - start < timeout_s:
            now = time.perf_counter() - start
            for i, client in enumerate(self.clients):
                if reached[i] == float("inf") and client.connections >= count:
                    reached[i] = now
            if all(r < float("inf") for r in reached):
                break
            await asyncio.sleep(0.1)
        return reached

    def reconnects(self, expected: int) -> int:
        """Authentications beyond ``expected`` per client, summed (each one a dropped connection)."""
        return sum(max(0, c.connections - expected) for c in self.clients)

    def ended(self) -> list[BaseException | None]:
        return [t.exception() if not t.cancelled() else None for t in self.tasks if t.done()]

    async def stop(self) -> None:
        for client in self.clients:
            client.stop()
        await asyncio.wait(self.tasks, timeout=30)


# ---------------------------------------------------------------- the coordinator


class Coord:
    """``fedmoe-coord serve`` on a fixed port, restartable with another config."""

    def __init__(self, cfg: CoordinatorConfig, workdir: Path):
        self.cfg, self.workdir, self.runs, self.child = cfg, workdir, 0, None

    def start(self, **changes) -> Child:
        self.cfg = config_with(self.cfg, **changes)  # [rounds] fields too
        self.runs += 1
        config = self.workdir / f"coord-{self.runs}.toml"
        save_config(self.cfg, config)
        self.child = start_coordinator(config, self.workdir / f"coordinator-{self.runs}.log")
        wait_healthy(self.cfg.port, self.child, cafile=self.cfg.tls_ca_cert)
        return self.child

    def stop(self) -> float:
        """SIGTERM and wait; returns the seconds it took."""
        start = time.perf_counter()
        self.child.stop(timeout=60)
        return time.perf_counter() - start

    def log_problems(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for run in range(1, self.runs + 1):
            for line in (self.workdir / f"coordinator-{run}.log").read_text(errors="replace").splitlines():
                match = re.search(r" (WARNING|ERROR|CRITICAL) (.*)", line)
                if match or "Traceback" in line:
                    counts[normalise(match.group(0) if match else line)] += 1
        return counts


def registry_sweep_cost(cfg: CoordinatorConfig, device_ids: list[str]) -> dict:
    """Seconds of the registry calls of one presence sweep (``coordinator.presence``, every ``SWEEP_S``) with
    ``device_ids`` connected: the revoked query and the ``last_seen`` write of the devices due in one ``SWEEP_S``
    (each every ``LAST_SEEN_EVERY_S``); and, for comparison, the per-Heartbeat calls the sweep replaced
    (``get_device``, ``touch_device``: mean of up to 200)."""
    registry = Registry(cfg.registry_url)
    sample = device_ids[:200]
    due = device_ids[: max(1, round(len(device_ids) * SWEEP_S / LAST_SEEN_EVERY_S))]
    try:
        revoked_s = timed_call(registry.revoked_device_ids)
        touch_many_s = timed_call(registry.touch_devices, due)
        get_s = timed_call(lambda: [registry.get_device(d) for d in sample]) / max(1, len(sample))
        touch_s = timed_call(lambda: [registry.touch_device(d) for d in sample]) / max(1, len(sample))
    finally:
        registry.close()
    return {
        "revoked_s": revoked_s,
        "due": len(due),
        "touch_devices_s": touch_many_s,
        "get_s": get_s,
        "touch_s": touch_s,
    }


def timed_call(function, *args) -> float:
    """Seconds ``function(*args)`` took."""
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def round_rows(cfg: CoordinatorConfig) -> list[dict]:
    """Per round: status, wall seconds, assignments, accepted updates, bytes down / up (from the registry)."""
    registry = Registry(cfg.registry_url)
    try:
        rows = []
        for r in sorted(registry.list_rounds(limit=1000), key=lambda r: r.id):
            moved = Counter()
            for m in registry.metrics(round_id=r.id):
                if m.device_id is not None:
                    moved[m.name] += m.value
            wall = (r.finished_at - r.started_at).total_seconds() if r.finished_at else float("nan")
            rows.append(
                {
                    "round": r.id,
                    "status": r.status,
                    "wall_s": wall,
                    "assigned": len(registry.assignments(r.id)),
                    "accepted": len(registry.accepted_updates(r.id)),
                    "mib_down": moved["bytes_down"] / (1 << 20),
                    "mib_up": moved["bytes_up"] / (1 << 20),
                }
            )
        return rows
    finally:
        registry.close()


async def wait_rounds(cfg: CoordinatorConfig, rounds: int, timeout_s: float) -> None:
    """Until ``rounds`` rounds finished, ``[rounds] max_attempts`` failed, or ``timeout_s`` passed."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        rows = await asyncio.to_thread(round_rows, cfg)
        finished = sum(r["status"] == "finished" for r in rows)
        failed = sum(r["status"] == "failed" for r in rows)
        if finished >= rounds or failed >= cfg.rounds.max_attempts:
            return
        await asyncio.sleep(1.0)


# ---------------------------------------------------------------- the run


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank; failed probes, inf, count as the slowest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))] if ordered else float("nan")


def _seconds(values: list[float]) -> str:
    done = sorted(v for v in values if v < float("inf"))
    if not done:
        return "none"
    p95 = done[min(len(done) - 1, int(0.95 * len(done)))]
    return f"median {statistics.median(done):.2f} s, p95 {p95:.2f} s, last {done[-1]:.2f} s"


async def idle_phase(opts, coord: Coord, tokens: list[str], out: dict, probe: HealthProbe) -> Fleet:
    pid, port, url = coord.child.process.pid, coord.cfg.port, local_url(coord.cfg)
    out["coordinator_nofile"] = nofile_of(pid)
    out["rss_0"] = rss_mib(pid)
    print(
        f"coordinator pid {pid}, RLIMIT_NOFILE {out['coordinator_nofile']}, RSS {out['rss_0']:.1f} MiB "
        f"with 0 connections, {open_fds(pid)} fds",
        flush=True,
    )
    names = [f"dev-{i:05d}" for i in range(opts.idle)]
    probe.phase, overflows = "enroll", listen_overflows()
    results, seconds = await enroll_all(url, names, tokens, opts.workdir / "devices", opts.enroll_concurrency)
    credentials = [r for r in results if not isinstance(r, BaseException)]
    out["enroll_errors"] = Counter(
        normalise(f"{type(r).__name__}: {r}") for r in results if isinstance(r, BaseException)
    )
    print(
        f"enrolled {len(credentials)} of {len(names)} over the websocket in {seconds:.1f} s "
        f"({opts.enroll_concurrency} at a time)",
        flush=True,
    )
    fleet = Fleet(url, credentials, opts.workdir / "devices", opts.heartbeat_s)
    probe.phase = "connect"
    start = time.perf_counter()
    fleet.start()
    reached = await fleet.wait_connected(1, opts.connect_timeout)
    out["established"] = established(port)
    print(
        f"connect: {sum(r < float('inf') for r in reached)} of {len(credentials)} authenticated "
        f"({_seconds(reached)}; {time.perf_counter() - start:.1f} s); coordinator holds {out['established']} "
        f"established sockets, {open_fds(pid)} fds, RSS {rss_mib(pid):.1f} MiB; listen-queue overflows "
        f"during enrollment and connect: {listen_overflows() - overflows}",
        flush=True,
    )
    probe.phase = "idle"
    profiler = None
    if opts.py_spy:  # where the idle coordinator's time goes (collapsed stacks, one line per stack and its samples)
        profile = opts.workdir / "idle-profile.txt"
        profiler = await asyncio.create_subprocess_exec(
            "py-spy", "record", "--pid", str(pid), "--duration", str(int(opts.idle_seconds)), "--format", "raw",
            "--nonblocking", "--output", str(profile), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    await asyncio.sleep(opts.idle_seconds)
    if profiler is not None:
        await profiler.wait()
        print(f"py-spy profile of the idle coordinator: {profile} (exit {profiler.returncode})", flush=True)
    out["alive"], out["rss_n"], out["idle_reconnects"] = established(port), rss_mib(pid), fleet.reconnects(1)
    print(
        f"after {opts.idle_seconds:.0f} s idle (heartbeat every {opts.heartbeat_s:g} s): {out['alive']} "
        f"established, {out['idle_reconnects']} client reconnects, RSS {out['rss_n']:.1f} MiB "
        f"({(out['rss_n'] - out['rss_0']) * 1024 / max(1, out['alive']):.1f} KiB per connection)",
        flush=True,
    )
    return fleet


async def rounds_phase(opts, coord: Coord, fleet: Fleet, out: dict, probe: HealthProbe) -> None:
    probe.phase = "restart"
    stop_s = await asyncio.to_thread(coord.stop)
    print(
        f"coordinator stopped with {len(fleet.clients)} connections in {stop_s:.1f} s; restarting with "
        f"min_fit_clients = max_fit_clients = {opts.active}, num_rounds = {opts.rounds}",
        flush=True,
    )
    await asyncio.to_thread(
        coord.start, min_fit_clients=opts.active, max_fit_clients=opts.active, num_rounds=opts.rounds
    )
    pid, start, overflows = coord.child.process.pid, time.perf_counter(), listen_overflows()
    probe.phase = "reconnect"  # the first round starts once --active devices are back, amid the others' handshakes
    reached = await fleet.wait_connected(2, opts.connect_timeout)
    probe.phase = "rounds"
    print(
        f"reconnect after restart: {sum(r < float('inf') for r in reached)} of {len(fleet.clients)} "
        f"re-authenticated ({_seconds(reached)} after /healthz answered); listen-queue overflows "
        f"{listen_overflows() - overflows}; coordinator RSS {rss_mib(pid):.1f} MiB",
        flush=True,
    )
    await wait_rounds(coord.cfg, opts.rounds, opts.round_timeout - (time.perf_counter() - start))
    out["rounds"] = await asyncio.to_thread(round_rows, coord.cfg)
    out["rss_rounds"], out["alive_rounds"] = rss_mib(pid), established(coord.cfg.port)
    out["peak_rounds"] = rss_mib(pid, "VmHWM")  # of the restarted coordinator: reconnects and rounds
    kinds = ", ".join(f"{kind} {mib:.0f}" for kind, mib in sorted(resident_by_kind(pid).items()))
    print(f"coordinator resident MiB by mapping after the rounds: {kinds}", flush=True)
    print(
        f"after the rounds: {out['alive_rounds']} established, RSS {out['rss_rounds']:.1f} MiB (peak since the "
        f"restart {out['peak_rounds']:.1f} MiB), "
        f"{fleet.reconnects(2)} client reconnects",
        flush=True,
    )


def _latency(samples: list[float]) -> str:
    """``median / p99`` of probe latencies (seconds) in ms."""
    return f"{1e3 * statistics.median(samples):.0f} / {1e3 * quantile(samples, 0.99):.0f}"


def _print_summary(opts, out: dict, probe: HealthProbe, coord: Coord, device_problems: Counter) -> None:
    print("\nround | status | wall s | assigned | accepted | MiB down | MiB up")
    for r in out.get("rounds", []):
        print(
            f"{r['round']} | {r['status']} | {r['wall_s']:.2f} | {r['assigned']} | {r['accepted']} | "
            f"{r['mib_down']:.2f} | {r['mib_up']:.2f}"
        )
    print(
        "\n/healthz latency per phase (ms): "
        + "; ".join(
            f"{phase}: n={len(v)} median {1e3 * statistics.median(v):.0f} p99 {1e3 * quantile(v, 0.99):.0f} "
            f"max {1e3 * max(v):.0f} failed {sum(x == float('inf') for x in v)}"
            for phase, v in probe.samples.items()
        )
    )
    idle, rounds = (probe.samples.get(phase, [float("nan")]) for phase in ("idle", "rounds"))
    walls = ", ".join(f"{r['wall_s']:.1f}" for r in out.get("rounds", []))
    print(
        "\nsummary row: | registry | TLS | idle | active | established after idle | RSS MiB 0 / idle / after rounds "
        "(peak) | /healthz idle median / p99 ms | /healthz rounds median / p99 ms | round s |"
    )
    print(
        f"| {opts.registry} | {'plain ws' if opts.insecure else 'mutual TLS'} | {opts.idle} | {opts.active} | "
        f"{out.get('alive', 0)} | {out.get('rss_0', 0):.0f} / {out.get('rss_n', 0):.0f} / "
        f"{out.get('rss_rounds', 0):.0f} ({out.get('peak_rounds', 0):.0f}) | {_latency(idle)} | {_latency(rounds)} "
        f"| {walls} |"
    )
    cost = out["registry"]
    print(
        f"registry on the coordinator's event loop, one presence sweep every {SWEEP_S:g} s: revoked_device_ids "
        f"{1e3 * cost['revoked_s']:.1f} ms + touch_devices of {cost['due']} due {1e3 * cost['touch_devices_s']:.1f} ms "
        f"(it replaced, per Heartbeat, a get_device {1e3 * cost['get_s']:.2f} ms at most every 10 s and a "
        f"touch_device {1e3 * cost['touch_s']:.2f} ms at most every {LAST_SEEN_EVERY_S:g} s)"
    )
    for title, counts in (
        ("enrollment errors", out["enroll_errors"]),
        ("device-side warnings", device_problems),
        ("coordinator warnings / errors", coord.log_problems()),
    ):
        print(f"\n{title}: {sum(counts.values())}")
        for text, n in counts.most_common(12):
            print(f"  {n:5d} x {text}")


def _failures(opts, out: dict) -> list[str]:
    bad = [
        f"{name}: {out[key]} of {opts.idle}"
        for name, key in (("established", "established"), ("alive after idle", "alive"))
        if out.get(key, 0) < opts.idle
    ]
    full = [r for r in out.get("rounds", []) if r["status"] == "finished" and r["accepted"] >= opts.active]
    return bad + ([] if len(full) >= opts.rounds else [f"{len(full)} of {opts.rounds} full rounds"])


async def run(opts, cfg: CoordinatorConfig, tokens: list[str], device_problems: Counter) -> int:
    device_client._fit_in_slot = stand_in_fit  # the load generator does not train (module docstring)
    # A device process runs one client and collects its garbage (gc.collect, malloc_trim) after each update; this
    # process runs them all, where one full collection takes about a second with 10,000 clients: 500 updates
    # stalled its loop for minutes, the clients' pongs came late and the coordinator closed them (measured).
    device_client.release_memory = lambda: None
    coord, out = Coord(cfg, opts.workdir), {}
    await asyncio.to_thread(coord.start)
    probe, fleet = HealthProbe(cfg.port, opts.workdir, cafile=cfg.tls_ca_cert), None
    try:
        fleet = await idle_phase(opts, coord, tokens, out, probe)
        await rounds_phase(opts, coord, fleet, out, probe)
        out["ended_clients"] = fleet.ended()
    finally:
        probe.stop()
        if fleet is not None:
            await fleet.stop()
        await asyncio.to_thread(coord.stop)
    out["device_ids"] = [c.credentials.device_id for c in fleet.clients]
    out["registry"] = registry_sweep_cost(coord.cfg, out["device_ids"])
    _print_summary(opts, out, probe, coord, device_problems)
    failures = _failures(opts, out) + [f"client task ended: {e!r}" for e in out["ended_clients"]]
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


def raise_file_limits(needed: int) -> tuple[int, int]:
    """This process's RLIMIT_NOFILE, soft and (as root) hard, raised to at least ``needed``; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError):
            pass  # not root: the hard limit stays; the run reports how many connections it held
    return raise_descriptor_limit()


def postgres_database(base: str) -> tuple[str, str]:
    """A new, empty database on the PostgreSQL server of URL ``base``: ``(its URL, its name)``."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = f"fedmoe_bench_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return make_url(base).set(database=name).render_as_string(hide_password=False), name


def drop_database(base: str, name: str) -> None:
    from sqlalchemy import create_engine

    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


def default_postgres_url() -> str:
    url_file = Path("/etc/fedmoe-test-postgres-url")
    return os.environ.get("FEDMOE_TEST_POSTGRES_URL") or (url_file.read_text().strip() if url_file.exists() else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=1000, help="devices to enroll and keep connected")
    parser.add_argument("--active", type=int, default=50, help="devices selected per round (min = max fit clients)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="how long all devices stay connected idle")
    parser.add_argument(
        "--heartbeat-s",
        type=float,
        default=10.0,
        help="device Heartbeat interval and the coordinator's websocket ping interval (seconds)",
    )
    parser.add_argument("--enroll-concurrency", type=int, default=100)
    parser.add_argument(
        "--connect-timeout", type=float, default=None, help="seconds for all devices to authenticate [90, +30 per 1000]"
    )
    parser.add_argument("--round-timeout", type=float, default=120.0, help="seconds for all rounds after restart")
    parser.add_argument("--registry", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--database-url",
        default=None,
        help="with --registry postgresql: a server URL (postgresql+psycopg://USER:PW@HOST:PORT/DB) on which a fresh "
        "database is created and dropped  [$FEDMOE_TEST_POSTGRES_URL or /etc/fedmoe-test-postgres-url]",
    )
    parser.add_argument("--insecure", action="store_true", help="plain ws:// without TLS (older numbers' setting)")
    parser.add_argument("--py-spy", action="store_true", help="profile the coordinator during the idle phase (py-spy)")
    parser.add_argument("--workdir", type=Path, help="state, configs, logs, device homes (default: a new temp dir)")
    opts = parser.parse_args()
    if opts.connect_timeout is None:
        opts.connect_timeout = 90.0 + 30.0 * opts.idle / 1000
    opts.workdir = (opts.workdir or Path(tempfile.mkdtemp(prefix="fedmoe-conn-"))).resolve()
    opts.workdir.mkdir(parents=True, exist_ok=True)
    soft, hard = raise_file_limits(2 * opts.idle + 1024)  # the clients' sockets here, the coordinator's there
    asyncio.sslproto.SSLProtocol.max_size = CLIENT_SSL_BUFFER  # this process's (clients') TLS read buffers only
    print(f"workdir {opts.workdir}; this process RLIMIT_NOFILE {soft}/{hard} (inherited by the coordinator)")
    base, database = "", ""
    if opts.registry == "postgresql":
        base = opts.database_url or default_postgres_url()
        if not base:
            parser.error("--registry postgresql needs --database-url (or run .ci/setup.d/20-postgresql.sh)")
        url, database = postgres_database(base)
        print(f"registry: PostgreSQL database {database} (dropped at the end)")
    try:
        cfg = initialised_coordinator(
            opts.workdir,
            opts.workdir / "state",
            port=free_port(),
            num_rounds=opts.rounds,
            min_fit_clients=opts.idle + 1,
            max_fit_clients=opts.idle + 1,
            heartbeat_s=opts.heartbeat_s,
            deadline_s=opts.round_timeout,
            database_url=url if database else "",
            # every simulated device connects from 127.0.0.1, all at once
            max_unauthenticated_per_address=opts.idle + 1,
            max_connections=opts.idle + 256,  # the devices, the /healthz probe, enrollment's side requests
        )
        if not opts.insecure:
            cfg = with_new_authority(cfg)
        registry = Registry(cfg.registry_url)
        start = time.perf_counter()
        tokens = [pinned_token(registry.create_enroll_token(f"dev-{i:05d}", 3600), cfg) for i in range(opts.idle)]
        registry.close()
        print(f"{len(tokens)} one-time enrollment tokens in {time.perf_counter() - start:.1f} s")
        counter = WarningCounter()
        logging.getLogger().addHandler(counter)
        device_problems = counter.counts
        return asyncio.run(run(opts, cfg, tokens, device_problems))
    finally:
        if database:
            drop_database(base, database)


if __name__ == "__main__":
    sys.exit(main())
