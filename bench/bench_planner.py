"""Validate the planner's memory and step-time estimates by measurement (ORT training, no torch in the trainer).

For three bundle sizes (1, 2, 4 experts per layer of an 8-layer upcycled SmolLM2) and three budgets (512, 1024,
2048 MiB, bundles chosen by ``fedmoe-export bundle --memory-mib``), train a few steps in a fresh child process
that never imports torch (asserted), read that child's peak RSS (``os.wait4`` ru_maxrss) and step time, and
print: budget, shape key, estimated MiB, measured MiB, ratio, export seconds, bundle MiB, step times and the
compute efficiency they imply against this machine's ``measure_gflops`` (best of three: the CPU is shared).

Run (about 6-8 minutes on 2 cores)::

    FEDMOE_CACHE=/tmp/fedmoe-bench python bench/bench_planner.py --workdir /tmp/fedmoe-bench/work

Exit status 1 when an estimate is under its measurement or over it by more than 25%, or a budget row's
measured peak exceeds its budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

from device_runtime.bundle import load_bundle  # noqa: E402
from device_runtime.profile import measure_gflops  # noqa: E402
from device_runtime.units import MIB  # noqa: E402
from export.planner import CALIBRATION, TrainingShape, estimate, model_shape  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One bundle to measure: ``layers`` upcycled decoder layers, then either a fixed count or a budget."""

    name: str
    layers: int
    train: TrainingShape
    experts_per_layer: int | None = None
    budget_mib: float | None = None


# Every BBC News topic (" business", " entertainment", " politics", " sport", " tech") is one SmolLM2 token: the
# lm_head runs on one position per sequence (TrainingShape.targets).
BBC_TARGETS = 1
CASES = (
    Case("size-1", 8, TrainingShape(4, 128, targets=BBC_TARGETS), experts_per_layer=1),
    Case("size-2", 8, TrainingShape(4, 128, targets=BBC_TARGETS), experts_per_layer=2),
    Case("size-4", 8, TrainingShape(4, 128, targets=BBC_TARGETS), experts_per_layer=4),
    Case("budget-512", 4, TrainingShape(1, 64, "lora", 8, targets=BBC_TARGETS), budget_mib=512),
    Case("budget-1024", 8, TrainingShape(2, 64, targets=BBC_TARGETS), budget_mib=1024),
    Case("budget-2048", 8, TrainingShape(4, 128, targets=BBC_TARGETS), budget_mib=2048),
    # one trained expert per layer, the other three resident in float16, or merged into one stand-in (the Pis)
    Case("resident-1", 8, TrainingShape(4, 64, targets=BBC_TARGETS, frozen_dtype="float16"), experts_per_layer=1),
    Case(
        "merged-1",
        8,
        TrainingShape(4, 64, targets=BBC_TARGETS, frozen_dtype="float16", merged=True),
        experts_per_layer=1,
    ),
    # all SmolLM2 layers: opt-in, ~2 min more
    Case("full-30", 30, TrainingShape(2, 64, targets=BBC_TARGETS), experts_per_layer=1),
)
DEFAULT_CASES = [c.name for c in CASES if c.name != "full-30"]


def measure(case: Case, workdir: Path, data: Path, steps: int, gflops: float) -> dict:
    """Export, train in a torch-free child and compare with the estimate; one row of the table."""
    checkpoint = _measure.upcycled_checkpoint(workdir, case.layers)
    out = workdir / "bundles" / case.name
    export_s = float("nan")  # the bundle is reused when it exists
    if not out.is_dir():
        export_s = _measure.export_bundle(
            checkpoint,
            out,
            case.train,
            workdir / "export.log",
            experts_per_layer=case.experts_per_layer,
            budget_mib=case.budget_mib,
        )
    manifest = load_bundle(out).manifest
    kept = max(manifest.shape_key.experts_per_layer)
    est = estimate(model_shape(checkpoint), case.train, kept, gflops=gflops)
    child = _measure.run_child(
        [
            "ort",
            str(out),
            str(data),
            "--steps",
            str(steps),
            "--warmup",
            "1",
            "--batch-size",
            str(case.train.batch_size),
            "--seq-len",
            str(case.train.seq_len),
        ]
    )
    if child["torch_imported"]:
        raise AssertionError(f"{case.name}: the ORT training child imported torch")
    measured = child["peak_rss_mib"]
    step_s = child["step_s"]
    return {
        "case": case.name,
        "budget_mib": case.budget_mib,
        "layers": case.layers,
        "shape_key": manifest.shape_key.id,
        "train": f"{case.train.trainable_mode} {case.train.batch_size}x{case.train.seq_len}",
        "estimated_mib": est.peak_mib,
        "measured_mib": measured,
        "ratio": est.peak_mib / measured,
        "export_s": export_s,
        "bundle_mib": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / MIB,
        "step_s": step_s,
        "estimated_step_s": est.step_s,
        "implied_efficiency": CALIBRATION["efficiency"] * est.step_s / min(step_s),
    }


def _print_table(rows: list[dict], gflops: float) -> None:
    header = (
        "case",
        "budget",
        "layers",
        "shape key",
        "train",
        "est MiB",
        "meas MiB",
        "ratio",
        "export s",
        "bundle MiB",
        "step s (min-max)",
        "est step s",
        "efficiency",
    )
    print(f"device: {gflops:.1f} GFLOP/s (measure_gflops), CALIBRATION {CALIBRATION}")
    print(" | ".join(header))
    for r in rows:
        print(
            " | ".join(
                [
                    r["case"],
                    f"{r['budget_mib']:.0f}" if r["budget_mib"] else "-",
                    str(r["layers"]),
                    r["shape_key"],
                    r["train"],
                    f"{r['estimated_mib']:.0f}",
                    f"{r['measured_mib']:.0f}",
                    f"{r['ratio']:.3f}",
                    f"{r['export_s']:.0f}",
                    f"{r['bundle_mib']:.0f}",
                    f"{min(r['step_s']):.2f}-{max(r['step_s']):.2f}",
                    f"{r['estimated_step_s']:.2f}",
                    f"{r['implied_efficiency']:.3f}",
                ]
            )
        )


def _failures(rows: list[dict]) -> list[str]:
    bad = [f"{r['case']}: ratio {r['ratio']:.3f} outside [1, 1.25]" for r in rows if not 1.0 <= r["ratio"] <= 1.25]
    return bad + [
        f"{r['case']}: measured {r['measured_mib']:.0f} MiB over the budget {r['budget_mib']:.0f}"
        for r in rows
        if r["budget_mib"] and r["measured_mib"] > r["budget_mib"]
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="checkpoints, bundles, data, export.log")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per bundle after one warm-up step")
    parser.add_argument(
        "--cases",
        nargs="*",
        default=DEFAULT_CASES,
        help=f"case names (default: all but full-30): {', '.join(c.name for c in CASES)}",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    opts = parser.parse_args()
    opts.workdir.mkdir(parents=True, exist_ok=True)
    data = _measure.write_bbc_jsonl(opts.workdir / "bbc_news.jsonl")
    samples = [measure_gflops(seconds=1.0) for _ in range(3)]  # the CPU is shared: the best is the least disturbed
    gflops = max(samples)
    print(f"measure_gflops x3: {', '.join(f'{g:.1f}' for g in samples)} GFLOP/s; using the best")
    rows = [measure(case, opts.workdir, data, opts.steps, gflops) for case in CASES if case.name in opts.cases]
    _print_table(rows, gflops)
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    failures = _failures(rows)
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
