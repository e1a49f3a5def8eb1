"""Hostile load against a real ``fedmoe-coord serve`` over wss:// with mutual TLS (issue 19, item 5), the tiny
test model on loopback: connection floods before and after the TLS handshake, while an enrolled device runs
rounds.

    python bench/bench_hostile.py            # 10,000 pre-TLS connections from 100 addresses; the idle TLS flood

Classes (each attack opens its sockets from loopback addresses 127.0.x.y, Linux routes 127/8 to lo, and holds
them ``--hold-s`` seconds, or until the device's round is done if that takes longer):

* ``pretls``   ``--pretls`` TCP connections from ``--addresses`` addresses that never send a byte, as fast as
               this process opens them or at ``--rate`` per second
* ``stalled``  the same, each sending one byte (a TLS record's first) and then nothing: a handshake stalled
               at its start
* ``tlsidle``  TLS connections with no client certificate that send nothing after the handshake: 1.5 times the
               share of ``max_connections`` such connections may hold, from as many addresses as the per-address
               cap needs

Printed per class: the server's RSS before (median of 2 s), peak, and after (``--settle-s`` after the attack
closed its sockets); how many attack sockets the server still held at the end of the hold; ``GET /healthz``
(https, no client certificate, every 0.25 s) p50, p99 and failures during the attack; and whether the
enrolled device, logging in during the attack with its client certificate (reconnecting 1 s apart, like
``DeviceClient``, at most 5 times), got an assignment and had its update acked (``accepted=True``).
Exit status 1 if any target is missed: peak under ``--max-peak-mib``, after within 10% of before, /healthz p99
under 200 ms for ``pretls``, and every round accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import bench_fuzz  # noqa: E402  (puts tests/ on the path)
from helpers import initialised_coordinator, two_expert_memory  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidHandshake  # noqa: E402

from coordinator.admission import raise_descriptor_limit  # noqa: E402
from coordinator.config import save_config  # noqa: E402
from coordinator.registry import Registry  # noqa: E402
from coordinator.simulation.processes import free_port, start_coordinator, wait_healthy  # noqa: E402
from coordinator.tls import pinned_token, with_new_authority  # noqa: E402
from device_runtime.client import enroll  # noqa: E402
from device_runtime.tls import client_context  # noqa: E402

BASELINE_S = 2.0
DEVICE_ATTEMPTS = 5
HEALTHZ_P99_MS = 200.0


@dataclass
class Result:
    name: str
    attempted: int
    held: int
    before: float
    flooded: float
    peak: float
    after: float
    healthz: list[float]
    round: str
    round_s: float

    def row(self) -> str:
        finite = sorted(x for x in self.healthz if x != float("inf")) or [float("inf")]
        return (
            f"| {self.name} | {self.attempted} | {self.held} | {self.before:.0f} | {self.flooded:.0f} | "
            f"{self.peak:.0f} | {self.after:.0f} ({100 * (self.after / self.before - 1):+.0f}%) | "
            f"{statistics.median(finite):.0f} / {self.p99():.0f} | {len(self.healthz) - len(finite)} of "
            f"{len(self.healthz)} | {self.round} in {self.round_s:.1f} s |"
        )

    def p99(self) -> float:
        """/healthz p99 (ms) during the attack, a refused probe counting as infinite."""
        ordered = sorted(self.healthz)
        return ordered[int(0.99 * (len(ordered) - 1))]


def address(i: int) -> str:
    return f"127.0.{10 + i // 250}.{i % 250 + 1}"


def flood_silent(port: int, count: int, addresses: int, first: bytes = b"", rate: float = 0.0) -> list[socket.socket]:
    """``count`` TCP connections spread over ``addresses`` addresses that send ``first`` and then nothing, at
    ``rate`` per second (0: as fast as this process can); refused ones are dropped."""
    socks, start = [], time.monotonic()
    for i in range(count):
        if rate:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(address(i % addresses), 0))
            sock.sendall(first)
            socks.append(sock)
        except OSError:
            pass
    return socks


def flood_tls(port: int, count: int, addresses: int, context: ssl.SSLContext) -> list[socket.socket]:
    """``count`` TLS connections (handshake done, no client certificate, nothing sent after it)."""
    socks = []
    for sock in flood_silent(port, count, addresses):
        try:
            socks.append(context.wrap_socket(sock, server_hostname="127.0.0.1"))
        except OSError:
            sock.close()
    return socks


def still_held(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return True
    except OSError:
        return False


class Bench:
    def __init__(self, opts, cfg, pid: int, device, mutual: ssl.SSLContext, anonymous: ssl.SSLContext):
        self.opts, self.cfg, self.pid, self.device = opts, cfg, pid, device
        self.mutual, self.anonymous = mutual, anonymous
        self.url = f"wss://127.0.0.1:{cfg.port}"

    async def phase(self, name: str, attempted: int, flood) -> Result:
        stop, rss, latency = asyncio.Event(), [], []
        sampler = asyncio.create_task(
            bench_fuzz.sample(
                self.pid, f"https://127.0.0.1:{self.cfg.port}/healthz", stop, rss, latency, context=self.anonymous
            )
        )
        await asyncio.sleep(BASELINE_S)
        before, first_probe, started = statistics.median(rss), len(latency), time.monotonic()
        socks = await asyncio.to_thread(flood)
        await asyncio.sleep(1.0)
        flooded = rss[-1]  # the attack held, before the device's round
        round_started = time.monotonic()
        verdict = await self.device_round()
        round_s = time.monotonic() - round_started
        await asyncio.sleep(max(0.0, self.opts.hold_s - (time.monotonic() - started)))
        held, during = sum(map(still_held, socks)), latency[first_probe:]
        for sock in socks:
            sock.close()
        await asyncio.sleep(self.opts.settle_s)
        stop.set()
        await sampler
        return Result(name, attempted, held, before, flooded, max(rss), rss[-1], during, verdict, round_s)

    async def device_round(self) -> str:
        """The enrolled device's round during an attack, reconnecting like ``DeviceClient`` (1 s apart, at most
        :data:`DEVICE_ATTEMPTS` connections): the verdict and how many connections it took."""
        for attempt in range(1, DEVICE_ATTEMPTS + 1):
            try:
                verdict = await bench_fuzz.final_check(self.url, self.device, self.cfg, context=self.mutual)
                return f"{verdict}, connection {attempt}"
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                verdict = f"failed ({type(exc).__name__}) {attempt} times"
                await asyncio.sleep(1.0)
        return verdict

    async def run(self) -> list[Result]:
        opts, port = self.opts, self.cfg.port
        for _ in range(opts.warmup_rounds):  # the first rounds grow the server's memory (model versions, caches)
            await bench_fuzz.final_check(self.url, self.device, self.cfg, context=self.mutual)
        share = self.cfg.max_connections - int(self.cfg.max_connections * self.cfg.certified_share)
        tls_count = share * 3 // 2
        tls_addresses = -(-tls_count // self.cfg.max_unauthenticated_per_address)
        return [
            await self.phase(
                "pretls", opts.pretls, lambda: flood_silent(port, opts.pretls, opts.addresses, rate=opts.rate)
            ),
            await self.phase(
                "stalled", opts.pretls, lambda: flood_silent(port, opts.pretls, opts.addresses, b"\x16", opts.rate)
            ),
            await self.phase("tlsidle", tls_count, lambda: flood_tls(port, tls_count, tls_addresses, self.anonymous)),
        ]


def enrolled_device(opts, cfg) -> tuple[tuple[str, bytes], ssl.SSLContext]:
    """Enroll a device over wss:// (it pins the CA and gets its client certificate): ``((id, key), context)``."""
    registry = Registry(cfg.registry_url)
    token = pinned_token(registry.create_enroll_token("honest", 3600), cfg)
    registry.close()
    creds = asyncio.run(
        enroll(
            f"wss://127.0.0.1:{cfg.port}",
            token,
            "honest",
            credentials_path=opts.workdir / "honest" / "credentials.json",
            profile=bench_fuzz.PROFILE,
        )
    )
    context = client_context(f"wss://127.0.0.1:{cfg.port}", ca_pem=creds.ca_cert.encode(), client_pem=creds.client_pem)
    return (creds.device_id, creds.private_key), context


def report(results: list[Result], opts) -> bool:
    print(
        "\n| attack | sockets | held at end | RSS before MiB | flooded, before the round | peak | after | "
        "/healthz p50 / p99 ms | /healthz failed | enrolled device's round |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for result in results:
        print(result.row())
    ok = all(
        r.peak <= opts.max_peak_mib and r.after <= 1.1 * r.before and r.round.startswith("accepted=True")
        for r in results
    )
    return ok and results[0].p99() < HEALTHZ_P99_MS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretls", type=int, default=10_000, help="pre-TLS connections")
    parser.add_argument("--addresses", type=int, default=100, help="loopback addresses they come from")
    parser.add_argument("--rate", type=float, default=0.0, help="pre-TLS connections per second (0: at once)")
    parser.add_argument("--max-connections", type=int, default=1024, help="the server's max_connections")
    parser.add_argument("--hold-s", type=float, default=8.0, help="seconds each attack holds its sockets")
    parser.add_argument("--settle-s", type=float, default=5.0, help="seconds after the attack before 'after'")
    parser.add_argument("--warmup-rounds", type=int, default=3, help="rounds before the first attack")
    parser.add_argument("--max-peak-mib", type=float, default=300.0)
    parser.add_argument("--workdir", type=Path, default=None)
    opts = parser.parse_args()
    opts.workdir = (opts.workdir or Path(tempfile.mkdtemp(prefix="fedmoe-hostile-"))).resolve()
    os.environ.setdefault("FEDMOE_CACHE", str(opts.workdir / "cache"))
    raise_descriptor_limit()
    cfg = with_new_authority(
        initialised_coordinator(
            opts.workdir,
            opts.workdir / "state",
            port=free_port(),
            max_message_mib=16,
            deadline_s=120,
            max_connections=opts.max_connections,
            max_attempts=1_000_000,
        )
    )
    save_config(cfg, opts.workdir / "coord.toml")
    bench_fuzz.PROFILE["memory_mib"] = two_expert_memory(opts.workdir / "checkpoint")
    child = start_coordinator(opts.workdir / "coord.toml", opts.workdir / "coordinator.log")
    try:
        wait_healthy(cfg.port, child, cafile=cfg.tls_ca_cert)
        device, mutual = enrolled_device(opts, cfg)
        anonymous = client_context(f"wss://127.0.0.1:{cfg.port}", ca_pem=Path(cfg.tls_ca_cert).read_bytes())
        results = asyncio.run(Bench(opts, cfg, child.process.pid, device, mutual, anonymous).run())
    finally:
        child.stop()
    ok = report(results, opts)
    log = (opts.workdir / "coordinator.log").read_text(errors="replace")
    print(
        f"\ncoordinator log: {len(log.splitlines())} lines, {log.count('Traceback')} tracebacks "
        f"({opts.workdir / 'coordinator.log'}); load average {os.getloadavg()[0]:.2f}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
