"""What privacy costs on the main job: one ``fedmoe-coord simulate`` per variant, one table.

Variants (``--variants``, comma-separated):

- ``plain``: ``--strategy fedavg``;
- ``dp1``, ``dp4``, ``dp8``: ``--strategy dp-fedavg --dp-epsilon 1 | 4 | 8 --dp-clip S`` (client-level DP, central
  noise; delta 1e-5; every device every round, so the sampling rate is q = 1 and no amplification is claimed);
- ``secagg``: ``--strategy fedavg --secure-aggregation``;
- ``both``: ``--strategy dp-fedavg --dp-epsilon 8 --dp-clip S --secure-aggregation`` (devices clip, the
  coordinator noises the securely aggregated sums).

Each run is a real federation (coordinator and device processes over websockets, ``coordinator.simulation``) on the
``--preset`` split (``default``: the main job's 8-layer MoE, BBC News, Dirichlet 1.0, seed 0). The table gives, per
variant: the coordinator's held-out accuracy after each round and the final one; MiB uploaded and downloaded per
round (every frame of the round, the secure steps included); seconds per round (round 1 includes the bundle
exports, so the mean is over the later rounds when there are any); the coordinator's CPU seconds per round
(``coordinator_cpu_s``: the serve process's CPU time from a round's start to its version, every thread); and the
epsilon spent. Ratios to ``plain`` (upload bytes, round seconds) follow for the secure variants.

    python bench/bench_privacy.py --workdir /tmp/fedmoe-privacy                       # the full table (~45 min idle)
    python bench/bench_privacy.py --rounds 2 --variants plain,secagg --workdir /tmp/p # a quick look

``--scaling 5,20,50`` instead runs the secure protocol alone, in this process, for that many devices of a tiny
MoE (2 layers of 4 experts, hidden 64, FFN 128; each device holds 2 random experts per layer and every router
row), every message through the real framing, 10% of the devices dropping after masking: per device its bytes
sent against a plain float32 update and its seconds, and the coordinator's seconds to run the phases and unmask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "plain": ["--strategy", "fedavg"],
    "dp1": ["--strategy", "dp-fedavg", "--dp-epsilon", "1"],
    "dp4": ["--strategy", "dp-fedavg", "--dp-epsilon", "4"],
    "dp8": ["--strategy", "dp-fedavg", "--dp-epsilon", "8"],
    "secagg": ["--strategy", "fedavg", "--secure-aggregation"],
    "both": ["--strategy", "dp-fedavg", "--dp-epsilon", "8", "--secure-aggregation"],
}
MIB = 1 << 20


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/privacy"), help="one simulation folder per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--preset", default="default", help="the simulation preset (default: the main job)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run [default: the preset's]")
    parser.add_argument("--num-devices", type=int, default=None, help="[default: the preset's profiles]")
    parser.add_argument(
        "--dp-clip", type=float, default=0.001, help="S of the DP variants (L2 of a device's delta; README: why 0.001)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slots", type=int, default=2, help="devices training at once (this machine's cores)")
    parser.add_argument("--scaling", default=None, help="device counts, e.g. 5,20,50: the protocol alone (no training)")
    return parser.parse_args(argv)


def run_variant(name: str, args: argparse.Namespace) -> Path:
    """``fedmoe-coord simulate`` of one variant into ``workdir/name`` (reused when it already finished)."""
    out = args.workdir / name
    if (out / "summary.json").is_file():
        return out
    command = [sys.executable, "-m", "coordinator.cli", "simulate", "--preset", args.preset, "--out", str(out)]
    command += [*VARIANTS[name], "--seed", str(args.seed), "--slots", str(args.slots)]
    if "--dp-epsilon" in VARIANTS[name]:
        command += ["--dp-clip", str(args.dp_clip)]
    if args.rounds is not None:
        command += ["--rounds", str(args.rounds)]
    if args.num_devices is not None:
        command += ["--num-devices", str(args.num_devices)]
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(args.workdir / f"{name}.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"{name}: {time.perf_counter() - start:.0f} s ({' '.join(command[3:])})", file=sys.stderr)
    return out


def measure(out: Path) -> dict:
    """Per round of a finished simulation: accuracy, bytes, seconds, coordinator CPU and the round's DP metrics."""
    from coordinator.registry import Registry

    records = [r for r in json.loads((out / "metrics.json").read_text()) if r["round"] > 0]
    strategy = records[0]["strategy"]
    registry = Registry(f"sqlite:///{out / strategy / 'state' / 'registry.db'}")
    try:
        rows = []
        for r in records:
            version = registry.get_model_version(r["round"])
            logged = {m.name: m.value for m in registry.metrics(round_id=version.round_id) if m.device_id is None}
            rows.append(
                {
                    "accuracy": r["accuracy"],
                    "up_mib": r["bytes_up"] / MIB,
                    "down_mib": r["bytes_down"] / MIB,
                    "wall_s": r["wall_s"],
                    "cpu_s": logged.get("coordinator_cpu_s"),
                    "epsilon": (version.metrics or {}).get("dp_epsilon"),
                    "clipped": (version.metrics or {}).get("dp_clipped"),
                }
            )
    finally:
        registry.close()
    return {"strategy": strategy, "rounds": rows}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def table(results: dict[str, dict]) -> str:
    """The one table (Markdown), then the secure variants' ratios to ``plain``."""
    rounds = max(len(r["rounds"]) for r in results.values())
    head = ["variant", *[f"acc r{i + 1}" for i in range(rounds)], "final", "MiB up/round", "MiB down/round"]
    head += ["s/round", "coord CPU s/round", "epsilon", "clipped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = {}
    for name, result in results.items():
        rows = result["rounds"]
        later = rows[1:] or rows  # round 1 exports the bundles
        cells = [
            name,
            *[f"{r['accuracy']:.0%}" for r in rows],
            *[""] * (rounds - len(rows)),
            f"{rows[-1]['accuracy']:.0%}",
        ]
        up, down = _mean([r["up_mib"] for r in rows]), _mean([r["down_mib"] for r in rows])
        wall, cpu = _mean([r["wall_s"] for r in later]), _mean([r["cpu_s"] for r in later if r["cpu_s"] is not None])
        epsilon = rows[-1]["epsilon"]
        clipped = [r["clipped"] for r in rows if r["clipped"] is not None]
        cells += [f"{up:.1f}", f"{down:.1f}", f"{wall:.1f}", f"{cpu:.1f}", "-" if epsilon is None else f"{epsilon:.2f}"]
        cells += ["-" if not clipped else f"{sum(clipped):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
        summary[name] = (up, wall)
    if "plain" in summary:
        lines.append("")
        up, wall = summary["plain"]
        for name in ("secagg", "both"):
            if name in summary:
                ratio_up, ratio_wall = summary[name][0] / up, summary[name][1] / wall
                lines.append(f"{name} / plain: upload x{ratio_up:.3f}, round seconds x{ratio_wall:.2f}")
    return "\n".join(lines)


def scaling(counts: list[int], seed: int = 0) -> str:
    """The secure protocol alone for each device count (see the module docstring): one Markdown table."""
    import numpy as np

    from coordinator.secagg import SecureMember, SecureRound, SecureSettings, secure_sums
    from device_runtime.secagg import DeviceSecAgg, Slot, row_weighting
    from device_runtime.wire import decode, encode

    layers, experts, hidden, ffn = 2, 4, 64, 128
    rows = {"experts": 3 * hidden * ffn, "router": hidden}  # gate_up (2I x H) and down (H x I); one router row
    global_params = {
        **{f"l{l}.experts": np.zeros((experts, rows["experts"]), np.float32) for l in range(layers)},
        **{f"l{l}.router": np.zeros((experts, rows["router"]), np.float32) for l in range(layers)},
    }
    settings = SecureSettings("examples", 10.0, 0.0, 1.0, 2, 0.5, 60.0)
    rng = np.random.default_rng(seed)
    lines = [
        "| devices | up KiB/device (plain float32) | x plain | device s (keys, shares, mask, reveal) | "
        "coordinator s (phases + unmask) |",
        "|---|---|---|---|---|",
    ]

    def wire(msg, count=None):
        data = encode(msg)
        if count is not None:
            count.append(len(data))
        return decode(data, max_size=1 << 30)

    for n in counts:
        ids = [f"d{i:03d}" for i in range(n)]
        held = {
            d: tuple(tuple(sorted(rng.choice(experts, 2, replace=False).tolist())) for _ in range(layers)) for d in ids
        }
        routers = tuple(tuple(range(experts)) for _ in range(layers))
        slots = {
            d: tuple(
                [
                    Slot(f"l{l}.experts", i, g, "trained", l, rows["experts"])
                    for l in range(layers)
                    for i, g in enumerate(held[d][l])
                ]
                + [Slot(f"l{l}.router", g, g, "held", l, rows["router"]) for l in range(layers) for g in range(experts)]
            )
            for d in ids
        }
        coordinator = 0.0
        start = time.perf_counter()
        state = SecureRound(1, [SecureMember(d, f"u{d}", held[d], routers, slots[d]) for d in ids], settings, now=0.0)
        coordinator += time.perf_counter() - start
        sent = {d: [] for d in ids}
        device_s = {d: 0.0 for d in ids}
        devices = {}
        for d in ids:
            t = time.perf_counter()
            devices[d] = DeviceSecAgg(wire(state.start_message(d)), d)
            keys = wire(devices[d].keys(), sent[d])
            device_s[d] += time.perf_counter() - t
            state.on_keys(d, keys)
        t = time.perf_counter()
        rosters = state.advance(0.0).sends
        coordinator += time.perf_counter() - t
        for d, msg in rosters:
            t = time.perf_counter()
            shares = wire(devices[d].on_roster(wire(msg)), sent[d])
            device_s[d] += time.perf_counter() - t
            state.on_shares(d, shares)
        t = time.perf_counter()
        inboxes = state.advance(0.0).sends
        coordinator += time.perf_counter() - t
        payloads, plain = {}, {}
        for d, msg in inboxes:
            base = {
                name: np.zeros(
                    (len([s for s in slots[d] if s.name == name]), rows["experts" if "experts" in name else "router"]),
                    np.float32,
                )
                for name in {s.name for s in slots[d]}
            }
            trained = {name: b + rng.normal(0, 1e-3, b.shape).astype(np.float32) for name, b in base.items()}
            plain[d] = 4 * sum(a.size for a in trained.values())
            t = time.perf_counter()
            devices[d].on_inbox(wire(msg))
            payloads[d] = devices[d].mask(slots[d], base, trained, row_weighting(devices[d].start, 10, {}, (), ()))
            device_s[d] += time.perf_counter() - t
            sent[d].append(len(payloads[d]))
        alive = ids[: max(2, n - n // 10)]  # the last 10% drop after masking: summed, but never reveal
        t = time.perf_counter()
        requests = state.unmask(ids)
        coordinator += time.perf_counter() - t
        for d, msg in requests:
            if d in alive:
                t = time.perf_counter()
                reveal = wire(devices[d].on_unmask(wire(msg)), sent[d])
                device_s[d] += time.perf_counter() - t
                state.on_reveal(d, reveal)
        t = time.perf_counter()
        seeds, masks = state.secrets()
        secure_sums(state, payloads.__getitem__, global_params, seeds, masks)
        coordinator += time.perf_counter() - t
        up = statistics.fmean(sum(sent[d]) for d in ids) / 1024
        base_kib = statistics.fmean(plain.values()) / 1024
        lines.append(
            f"| {n} | {up:.1f} ({base_kib:.1f}) | {up / base_kib:.3f} | {statistics.fmean(device_s.values()):.3f} | "
            f"{coordinator:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = _parse(argv)
    if args.scaling:
        print(scaling([int(n) for n in args.scaling.split(",")], args.seed))
        return
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    results = {name: measure(run_variant(name, args)) for name in names}
    (args.workdir / "privacy.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
