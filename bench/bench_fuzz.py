"""A bounded fuzz campaign against a real ``fedmoe-coord serve`` (issue 10, item 6): malformed, oversized and
tampered messages before and after login, on real websockets over loopback, with the tiny test model.

    python bench/bench_fuzz.py --messages 100000

Classes (each message is one websocket frame; a connection is reopened whenever the server closes it):

* ``random``       random bytes (1 B .. 4 KiB), before login
* ``mutated``      a valid Hello / Enroll frame with bit flips, truncation or inserted bytes, before login
* ``text``         text frames, before login
* ``oversized``    a 1 MiB frame before login (the pre-login limit is 64 KiB)
* ``forged_enroll`` Enroll with an unknown token, a small-order key or an all-zero key
* ``unexpected``   a well-formed BundleRequest / Heartbeat before login
* ``tampered``     after login: an Update with its tensor payload bit-flipped (its sha256 no longer matches),
                   NaN / huge tensors, a forged update_id, an absurd num_examples; a BundleRequest for an
                   unknown bundle
* ``flood``        after login: Heartbeats beyond the rate limit (the server
                   disconnects)

Outcomes per frame: the server's ``Error(code)`` reply, an ``Ack`` (accepted or rejected), the close code when
the server closed the connection, or ``no reply`` (nothing within 2 s, 10 ms for the flood, while the connection
stayed open). The
server's RSS is sampled every 0.5 s (psutil), ``GET /healthz`` latency every 0.25 s, and at the end a real
device logs in and its update is accepted (the server still works). The server runs with ``insecure`` (plain
ws://) to spend the CPU on the server's parsing, not on TLS; the admission and decoding paths are the same.
Exit status 1 if the server died, grew more than ``--max-growth-mib``, or the final device was not served.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import fake_update, initialised_coordinator, two_expert_memory  # noqa: E402

from coordinator.config import save_config  # noqa: E402
from coordinator.registry import Registry  # noqa: E402
from coordinator.simulation.processes import free_port, start_coordinator, wait_healthy  # noqa: E402
from device_runtime.auth import generate_keypair, sign_challenge  # noqa: E402
from device_runtime.bundle import Manifest  # noqa: E402
from device_runtime.units import MIB  # noqa: E402
from device_runtime.wire import (  # noqa: E402
    PROTOCOL_VERSION,
    Ack,
    Assignment,
    Auth,
    AuthOk,
    BundleRequest,
    Challenge,  # noqa: E402
    Enroll,
    Error,
    Heartbeat,
    Hello,
    decode,
    encode,
)

REPLY_TIMEOUT_S = 2.0
SILENT_TIMEOUT_S = 0.01  # a Heartbeat gets no reply: do not wait for one
SMALL_ORDER_KEY = bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000000")
PROFILE: dict = {}  # the good device's: a budget for two experts per layer
PRE_LOGIN = ("random", "mutated", "text", "oversized", "forged_enroll", "unexpected")
POST_LOGIN = ("tampered", "flood")


def mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    kind = rng.randrange(3)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(len(data)) :]
    else:
        pos = rng.randrange(len(data) + 1)
        data[pos:pos] = rng.randbytes(rng.randint(1, 64))
    return bytes(data)


class Campaign:
    def __init__(self, url: str, rng: random.Random, assignment: Assignment | None, manifest, creds):
        self.url, self.rng = url, rng
        self.assignment, self.manifest, self.creds = assignment, manifest, creds
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.sent: Counter = Counter()

    def frame(self, cls: str):
        rng = self.rng
        if cls == "random":
            return rng.randbytes(rng.randint(1, 4096))
        if cls == "mutated":
            base = encode(
                Hello(
                    device_id=f"d-{rng.randrange(1 << 32):08x}",
                    protocol_version=PROTOCOL_VERSION,
                    profile={"memory_mib": 512},
                )
            )
            return mutate(base, rng)
        if cls == "text":
            return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randint(1, 200)))
        if cls == "oversized":
            return b"\x00" * MIB
        if cls == "forged_enroll":
            key = rng.choice([SMALL_ORDER_KEY, bytes(32), generate_keypair()[1]])
            return encode(Enroll(token=rng.randbytes(32).hex()[:43], name="fuzz", profile={}, public_key=key))
        if cls == "unexpected":
            return encode(
                rng.choice(
                    [
                        BundleRequest(shape_key_id="experts-2.2"),
                        Heartbeat(),
                    ]
                )
            )
        if cls == "tampered":
            update = fake_update(self.assignment, self.manifest)
            choice = rng.randrange(5)
            if choice == 0:  # bit flips in the tensor payload: its sha256 no longer matches
                raw = bytearray(encode(update))
                raw[-rng.randint(1, 1000)] ^= 0xFF
                return bytes(raw)
            if choice == 1:
                name = next(iter(update.tensors))
                bad = update.tensors[name].copy()
                bad.flat[0] = rng.choice([float("nan"), float("inf"), 1e30])
                return encode(replace(update, tensors={**update.tensors, name: bad}))
            if choice == 2:
                return encode(replace(update, update_id=f"r{rng.randrange(1 << 20)}-forged"))
            if choice == 3:
                return encode(replace(update, num_examples=rng.choice([0, -1, 2**62])))
            return encode(BundleRequest(shape_key_id=f"experts-{rng.randrange(9)}.9"))
        return encode(Heartbeat())

    async def worker(self, classes: tuple[str, ...], budget: int) -> None:
        while self.sent[classes] < budget:
            try:
                async with connect(self.url, max_size=64 * MIB, compression=None, open_timeout=10) as ws:
                    if classes == POST_LOGIN and not await self.login(ws):
                        continue
                    while self.sent[classes] < budget:
                        cls = self.rng.choice(classes)
                        self.sent[classes] += 1
                        try:
                            frame = self.frame(cls)
                        except Exception as exc:  # noqa: BLE001 - the encoder refused our own garbage
                            self.outcomes[cls][f"not encodable: {type(exc).__name__}"] += 1
                            continue
                        outcome = await self.exchange(
                            ws, frame, SILENT_TIMEOUT_S if cls == "flood" else REPLY_TIMEOUT_S
                        )
                        self.outcomes[cls][outcome] += 1
                        if outcome.startswith("closed"):
                            break
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                self.outcomes["connect"][f"refused: {type(exc).__name__}"] += 1
                await asyncio.sleep(0.05)

    async def login(self, ws) -> bool:
        device_id, private = self.creds
        await ws.send(encode(Hello(device_id=device_id, protocol_version=PROTOCOL_VERSION, profile={})))
        challenge = decode(await ws.recv(), max_size=64 * MIB)
        if not isinstance(challenge, Challenge):
            return False
        await ws.send(encode(Auth(device_id=device_id, signature=sign_challenge(private, challenge.nonce, device_id))))
        return isinstance(decode(await ws.recv(), max_size=64 * MIB), AuthOk)

    async def exchange(self, ws, frame, timeout: float) -> str:
        try:
            await ws.send(frame)
            while True:
                raw = await asyncio.wait_for(ws.recv(), timeout)
                msg = decode(raw, max_size=64 * MIB)
                if isinstance(msg, Error):
                    return f"Error({msg.code})"
                if isinstance(msg, Ack):
                    return f"Ack(accepted={msg.accepted})"
        except TimeoutError:
            return "no reply"
        except ConnectionClosed as exc:
            return f"closed {exc.rcvd.code if exc.rcvd else 'abruptly'}"


async def sample(pid: int, healthz: str, stop: asyncio.Event, rss: list, latency: list, context=None) -> None:
    """Until ``stop``: the server's RSS (MiB) every 0.5 s into ``rss``, ``GET healthz`` latency (ms, inf when
    refused; verified with the ssl ``context`` for https) every 0.25 s into ``latency``."""
    proc, tick = psutil.Process(pid), 0
    while not stop.is_set():
        if tick % 2 == 0:
            rss.append(proc.memory_info().rss / MIB)
        start = time.perf_counter()
        try:
            await asyncio.to_thread(urllib.request.urlopen, healthz, timeout=10, context=context)
            latency.append((time.perf_counter() - start) * 1000)
        except OSError:
            latency.append(float("inf"))
        tick += 1
        await asyncio.sleep(0.25)


def enroll_device(cfg, name):
    registry = Registry(cfg.registry_url)
    private, public = generate_keypair()
    device = registry.redeem_token(registry.create_enroll_token(name, 3600), name, {}, public)
    registry.close()
    return device.id, private


async def _log_in_and_await_assignment(ws, creds, profile, timeout: float) -> Assignment:
    """Hello, answer the challenge, then the first Assignment the server sends on ``ws``."""
    device_id, private = creds
    await ws.send(encode(Hello(device_id=device_id, protocol_version=PROTOCOL_VERSION, profile=profile)))
    challenge = decode(await ws.recv(), max_size=64 * MIB)
    await ws.send(encode(Auth(device_id=device_id, signature=sign_challenge(private, challenge.nonce, device_id))))
    assert isinstance(decode(await ws.recv(), max_size=64 * MIB), AuthOk)
    async with asyncio.timeout(timeout):
        while not isinstance(msg := decode(await ws.recv(), max_size=64 * MIB), Assignment):
            pass
    return msg


async def first_assignment(url, creds, profile, timeout=180) -> Assignment:
    async with connect(url, max_size=64 * MIB, compression=None) as ws:
        return await _log_in_and_await_assignment(ws, creds, profile, timeout)


async def final_check(url, creds, cfg, context=None) -> str:
    """A real device logs in (over TLS with the ssl ``context`` for wss://), gets an assignment and its update
    is acked: the server serves."""
    async with connect(url, ssl=context, max_size=64 * MIB, compression=None) as ws:
        assignment = await _log_in_and_await_assignment(ws, creds, PROFILE, 180)
        manifest = Manifest.from_json(
            (Path(cfg.state_dir) / "bundles" / assignment.shape_key.id / "manifest.json").read_text()
        )
        await ws.send(encode(fake_update(assignment, manifest)))
        async with asyncio.timeout(180):
            while not isinstance(msg := decode(await ws.recv(), max_size=64 * MIB), Ack):
                pass
        return f"accepted={msg.accepted} {msg.reason}".strip()


async def run(opts, cfg, pid) -> int:
    url = f"ws://127.0.0.1:{cfg.port}"
    PROFILE["memory_mib"] = two_expert_memory(opts.workdir / "checkpoint")
    good, fuzzer = enroll_device(cfg, "good"), enroll_device(cfg, "fuzzer")
    assignment = await first_assignment(url, good, PROFILE)  # a real assignment: the template of tampered updates
    manifest = Manifest.from_json(
        (Path(cfg.state_dir) / "bundles" / assignment.shape_key.id / "manifest.json").read_text()
    )
    campaign = Campaign(url, random.Random(opts.seed), assignment, manifest, fuzzer)
    stop, rss, latency = asyncio.Event(), [], []
    sampler = asyncio.create_task(sample(pid, f"http://127.0.0.1:{cfg.port}/healthz", stop, rss, latency))
    start = time.perf_counter()
    post = opts.messages // 5
    workers = [campaign.worker(PRE_LOGIN, opts.messages - post) for _ in range(opts.concurrency)]
    await asyncio.gather(*workers, campaign.worker(POST_LOGIN, post))
    seconds = time.perf_counter() - start
    stop.set()
    await sampler
    verdict = await final_check(url, good, cfg)
    report(campaign, seconds, rss, latency, verdict)
    growth = max(rss) - rss[0]
    return 0 if psutil.pid_exists(pid) and growth <= opts.max_growth_mib and verdict.startswith("accepted=True") else 1


def report(campaign, seconds, rss, latency, verdict) -> None:
    total = sum(sum(c.values()) for k, c in campaign.outcomes.items() if k != "connect")
    print(f"\n{total} frames in {seconds:.0f} s ({total / seconds:.0f}/s)\n")
    print("| class | frames | outcomes |\n| --- | ---: | --- |")
    for cls in (*PRE_LOGIN, *POST_LOGIN, "connect"):
        counts = campaign.outcomes.get(cls)
        if counts:
            detail = ", ".join(f"{k}: {v}" for k, v in counts.most_common())
            print(f"| {cls} | {sum(counts.values())} | {detail} |")
    finite = sorted(x for x in latency if x != float("inf"))
    print(f"\nserver RSS: start {rss[0]:.0f} MiB, max {max(rss):.0f} MiB, end {rss[-1]:.0f} MiB")
    print(
        f"/healthz: {len(latency)} probes, {len(latency) - len(finite)} failed, "
        f"p50 {statistics.median(finite):.1f} ms, "
        f"p99 {finite[int(0.99 * (len(finite) - 1))]:.1f} ms, max {finite[-1]:.1f} ms"
    )
    print(f"a real device's update after the campaign: {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16, help="pre-login connections at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-growth-mib", type=float, default=200.0)
    parser.add_argument("--workdir", type=Path, default=None)
    opts = parser.parse_args()
    opts.workdir = (opts.workdir or Path(tempfile.mkdtemp(prefix="fedmoe-fuzz-"))).resolve()
    os.environ.setdefault("FEDMOE_CACHE", str(opts.workdir / "cache"))
    cfg = initialised_coordinator(
        opts.workdir,
        opts.workdir / "state",
        port=free_port(),
        max_message_mib=16,
        deadline_s=3600,
        max_unauthenticated_per_address=4 * opts.concurrency,
        max_attempts=1_000_000,
    )  # the fuzzer's empty profile fails every round
    save_config(cfg, opts.workdir / "coord.toml")
    child = start_coordinator(opts.workdir / "coord.toml", opts.workdir / "coordinator.log")
    try:
        wait_healthy(cfg.port, child)
        status = asyncio.run(run(opts, cfg, child.process.pid))
    finally:
        child.stop()
    log = (opts.workdir / "coordinator.log").read_text(errors="replace")
    print(
        f"coordinator log: {len(log.splitlines())} lines, {log.count('Traceback')} tracebacks "
        f"({opts.workdir / 'coordinator.log'})"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
