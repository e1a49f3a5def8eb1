"""Crash soak (issue 10, item 7): SIGKILL a real ``fedmoe-coord serve`` at random points of real rounds with real
``fedmoe-device run`` processes (ONNX Runtime training, mutual TLS), restart it each time, then check the books.

    python bench/bench_crash_soak.py --kills 20

After the last kill the coordinator runs until ``--final-rounds`` more rounds finish. Then:

* acknowledged updates lost: update ids a device logged as accepted ("update ... accepted") that are not among
  the accepted updates of a finished round (must be 0);
* counted twice: an update id recorded more than once, or a finished round with two accepted updates of one
  device (must be 0);
* registry vs store: global versions whose tensor file is missing, and tensor files no registry row names
  (must be 0 and 0).

Exit status 1 if any of these is not 0 or a device process died.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import RECORDS, initialised_coordinator  # noqa: E402

from coordinator.config import save_config  # noqa: E402
from coordinator.federation import tensor_store  # noqa: E402
from coordinator.registry import Registry  # noqa: E402
from coordinator.simulation.processes import (  # noqa: E402
    enroll_device,
    free_port,
    start_coordinator,
    start_device,  # noqa: E402
    wait_healthy,
)
from coordinator.tls import local_url, pinned_token, with_new_authority  # noqa: E402

DEVICES = ("soak-a", "soak-b", "soak-c")
MEMORY_MIB = 1024
ACCEPTED = re.compile(r"update (\S+) accepted")


def finished_rounds(cfg) -> int:
    registry = Registry(cfg.registry_url)
    try:
        return sum(r.status == "finished" for r in registry.list_rounds(limit=1_000_000))
    finally:
        registry.close()


def books(cfg, logs: list[Path]) -> dict:
    """The checks of the module docstring, from the registry, the store and the device logs."""
    acked = {m.group(1) for log in logs for m in ACCEPTED.finditer(log.read_text(errors="replace"))}
    registry = Registry(cfg.registry_url)
    try:
        rounds = registry.list_rounds(limit=1_000_000)
        aggregated, twice = set(), 0
        for r in rounds:
            if r.status != "finished":
                continue
            updates = registry.accepted_updates(r.id)
            aggregated |= {u.update_id for u in updates}
            twice += len(updates) - len({u.device_id for u in updates})
        store = tensor_store(cfg)
        versions = [registry.get_model_version(v) for v in range(registry.latest_model_version().version + 1)]
        missing = sum(not store.has(v.tensor_sha256) for v in versions if v is not None)
        named = {v.tensor_sha256 for v in versions if v} | set(registry.update_shas())
        orphans = len(store.shas() - named)
        statuses = Counter(r.status for r in rounds)
    finally:
        registry.close()
    return {
        "rounds": dict(statuses),
        "model versions": len(versions),
        "acknowledged updates": len(acked),
        "acknowledged updates lost": len(acked - aggregated),
        "counted twice": twice,
        "versions missing from the store": missing,
        "orphan tensor files": orphans,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--max-delay-s", type=float, default=30.0, help="a kill comes 0.5 .. this many s after start")
    parser.add_argument("--final-rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    work = (opts.workdir or Path(tempfile.mkdtemp(prefix="fedmoe-soak-"))).resolve()
    cfg = initialised_coordinator(
        work,
        work / "state",
        port=free_port(),
        min_fit_clients=2,
        max_fit_clients=3,
        deadline_s=60,
        max_attempts=1000,
    )
    cfg = with_new_authority(cfg)
    config = work / "coord.toml"
    save_config(cfg, config)
    url, data = local_url(cfg), work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 2))
    coordinator = start_coordinator(config, work / "coordinator.log")
    wait_healthy(cfg.port, coordinator, cafile=cfg.tls_ca_cert)
    registry = Registry(cfg.registry_url)
    tokens = {name: pinned_token(registry.create_enroll_token(name, 600), cfg) for name in DEVICES}
    registry.close()
    devices = []
    for name in DEVICES:
        home = work / "devices" / name
        enroll_device(url, tokens[name], name, home, MEMORY_MIB)
        devices.append(
            start_device(
                url,
                name,
                home,
                data,
                MEMORY_MIB,
                threads=1,
                slots=f"{work / 'slots'}:2",
                max_message_mib=cfg.max_message_mib,
            )
        )
    kills, start = [], time.monotonic()
    try:
        for kill in range(opts.kills):
            delay = rng.uniform(0.5, opts.max_delay_s)
            time.sleep(delay)
            coordinator.process.kill()
            coordinator.process.wait(30)
            kills.append((delay, finished_rounds(cfg)))
            print(f"kill {kill + 1}: {delay:.1f} s after start, {kills[-1][1]} rounds finished so far", flush=True)
            coordinator = start_coordinator(config, work / "coordinator.log")
            wait_healthy(cfg.port, coordinator, timeout=180, cafile=cfg.tls_ca_cert)
        target = finished_rounds(cfg) + opts.final_rounds
        deadline = time.monotonic() + 600
        while finished_rounds(cfg) < target and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        for child in devices:
            child.stop()
        coordinator.stop()
    died = [d.name for d in devices if d.returncode not in (0, -15, None)]
    result = books(cfg, [d.log for d in devices])
    print(f"\n{len(kills)} SIGKILLs in {time.monotonic() - start:.0f} s, rounds after the last: {opts.final_rounds}")
    print("\n| check | value |\n| --- | --- |")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    print(f"| device processes that died | {len(died)} {died or ''} |")
    bad = (
        result["acknowledged updates lost"],
        result["counted twice"],
        result["versions missing from the store"],
        result["orphan tensor files"],
        len(died),
    )
    return 1 if any(bad) else 0


if __name__ == "__main__":
    sys.exit(main())
