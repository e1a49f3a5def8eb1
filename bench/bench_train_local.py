"""Step time and peak RSS of ``fedmoe-device train-local`` on the default bundle shapes, for one or more source
trees side by side (e.g. main before a change and a worktree after it).

For each tree (``--tree LABEL=PATH``, run with ``PYTHONPATH=PATH`` and a private ``FEDMOE_CACHE`` per tree, so
each exports its own graph) and each shape below, write the bundle with ``fedmoe-export bundle`` (reused when the
directory exists) and time ``fedmoe-device train-local BUNDLE --data FILE --steps N --threads 1 --json``; print
its mean step time, its own peak RSS (``peak_rss_mib``) and the first and last loss (same data, same seed, so
equal graphs give equal losses).

Shapes: the README default's 8-layer upcycled SmolLM2 (4 experts, top-2), seq_len 64, batch 4, and either all 4
experts per layer with rank-8 LoRA or 1 expert per layer with full experts trainable. Run (about 6 minutes per
tree on 2 cores, most of it the two graph exports)::

    python bench/bench_train_local.py --workdir /tmp/fedmoe-bench/train-local \\
        --data runs/<sim>/data/raspberry-pi-0.jsonl --tree before=/work/main --tree after=.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from export.loading import cache_dir

SHAPES = {
    "lora8-4": ["--experts-per-layer", "4", "--trainable", "lora", "--lora-rank", "8"],
    "experts-1": ["--experts-per-layer", "1", "--trainable", "experts"],
}
BATCH = ["--seq-len", "64", "--batch-size", "4"]


def _run(tree: Path, cache: Path, args: list[str]) -> str:
    """``python -m args`` in ``tree`` (``-m`` puts the cwd first on the path) with ``cache`` as FEDMOE_CACHE.

    Returns:
        its stdout.

    Raises:
        RuntimeError: the command failed (the tail of its stderr is in the message).
    """
    env = {**os.environ, "PYTHONPATH": str(tree), "FEDMOE_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", *args], env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} failed under {tree}: {done.stderr[-2000:]}")
    return done.stdout


def measure(label: str, tree: Path, shape: str, opts) -> dict:
    """Export (unless present) and train one bundle with one tree; one row of the table."""
    cache = opts.workdir / f"cache-{label}"
    bundle = opts.workdir / f"{label}-{shape}"
    if not (bundle / "manifest.json").is_file():
        _run(tree, cache, ["export.cli", "bundle", str(opts.checkpoint), *SHAPES[shape], *BATCH, "--out", str(bundle)])
    out = _run(
        tree,
        cache,
        [
            "device_runtime.cli",
            "train-local",
            str(bundle),
            "--data",
            str(opts.data),
            "--steps",
            str(opts.steps),
            "--threads",
            "1",
            "--json",
            "--no-progress",
        ],
    )
    summary = json.loads(out)
    return {
        "tree": label,
        "shape": shape,
        "shape_key": summary["shape_key"],
        "step_s": summary["step_time_s"],
        "peak_rss_mib": summary["peak_rss_mib"],
        "first_loss": summary["losses"][0],
        "last_loss": summary["losses"][-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="bundles and one private cache per tree")
    parser.add_argument("--data", type=Path, required=True, help="a device's JSONL file (a simulation's data/)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=cache_dir() / "models" / "smollm2-e4k2-L8",
        help="upcycled MoE checkpoint [default: the simulation's 8-layer e4k2 SmolLM2]",
    )
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="a source tree to measure (repeatable) [default: this one, as 'this']",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    opts = parser.parse_args()
    opts.workdir, opts.data, opts.checkpoint = (p.resolve() for p in (opts.workdir, opts.data, opts.checkpoint))
    opts.workdir.mkdir(parents=True, exist_ok=True)
    trees = [t.split("=", 1) for t in opts.tree] or [["this", str(Path(__file__).resolve().parents[1])]]
    rows = [measure(label, Path(path).resolve(), shape, opts) for shape in opts.shapes for label, path in trees]
    print(f"tree | shape key | step s (mean of {opts.steps}, --threads 1) | peak RSS MiB | first loss | last loss")
    for r in rows:
        print(
            f"{r['tree']} | {r['shape_key']} | {r['step_s']:.3f} | {r['peak_rss_mib']:.0f} | "
            f"{r['first_loss']:.4f} | {r['last_loss']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
