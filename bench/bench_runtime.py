"""ORT training runtime vs torch eager on the same pruned model: step time and peak RSS, as ratios ORT / torch.

For each size (experts kept per layer of an 8-layer upcycled SmolLM2), one bundle is exported; then, back to
back, a torch-free child trains it with ``OrtTrainer`` and another child trains the same pruned model
(``export.bundle_writer.prepare_model`` + ``TrainingWrapper``, same trainable set, AdamW eps 1e-8 weight decay
0.01) with torch eager, on the same padded batches, 2 threads each, ``--steps`` timed steps after one warm-up.
The pair is repeated ``--repeats`` times (the machine is shared: compare ratios within a pair). The largest
difference between the two runtimes' per-step losses is printed too: it shows both trained on the same batches.

Peak RSS is the child's ``ru_maxrss`` from ``os.wait4``. The torch child resets its peak
(``/proc/self/clear_refs``) once the pruned model is built, so the full global model it loads first is not
counted: both numbers are "training this pruned model", not "exporting it".

Run (about 6 minutes on 2 cores)::

    FEDMOE_CACHE=/tmp/fedmoe-bench python bench/bench_runtime.py --workdir /tmp/fedmoe-bench/work
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

from export.planner import TrainingShape  # noqa: E402


def _pair(bundle: Path, checkpoint: Path, data: Path, opts) -> dict:
    """One back-to-back (ORT, torch) measurement of a bundle."""
    common = [
        str(data),
        "--steps",
        str(opts.steps),
        "--warmup",
        "1",
        "--batch-size",
        str(opts.batch_size),
        "--seq-len",
        str(opts.seq_len),
        "--threads",
        str(opts.threads),
    ]
    ort = _measure.run_child(["ort", str(bundle), *common])
    if ort["torch_imported"]:
        raise AssertionError("the ORT child imported torch")
    torch = _measure.run_child(["torch", str(checkpoint), *common, "--bundle", str(bundle)])
    row = {}
    for name, result in (("ort", ort), ("torch", torch)):
        row[f"{name}_step_s"] = statistics.median(result["step_s"])
        row[f"{name}_rss_mib"] = result["peak_rss_mib"]
        row[f"{name}_losses"] = result["losses"]
    row["step_ratio"] = row["ort_step_s"] / row["torch_step_s"]
    row["rss_ratio"] = row["ort_rss_mib"] / row["torch_rss_mib"]
    row["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(ort["losses"], torch["losses"]))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1, 4], help="experts kept per layer")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    opts.workdir.mkdir(parents=True, exist_ok=True)
    data = _measure.write_bbc_jsonl(opts.workdir / "bbc_news.jsonl")
    checkpoint = _measure.upcycled_checkpoint(opts.workdir, opts.layers)
    rows = []
    for size in opts.sizes:
        bundle = opts.workdir / "bundles" / f"runtime-{size}"
        if not bundle.is_dir():
            _measure.export_bundle(
                checkpoint,
                bundle,
                TrainingShape(opts.batch_size, opts.seq_len),
                opts.workdir / "export.log",
                experts_per_layer=size,
            )
        for repeat in range(opts.repeats):
            rows.append({"experts_per_layer": size, "repeat": repeat, **_pair(bundle, checkpoint, data, opts)})
    print(
        f"{opts.layers} layers, batch {opts.batch_size}x{opts.seq_len}, {opts.threads} threads, "
        f"{opts.steps} timed steps (median)"
    )
    print(
        "experts/layer | repeat | ORT step s | torch step s | step ORT/torch | ORT MiB | torch MiB | "
        "RSS ORT/torch | max loss diff"
    )
    for r in rows:
        print(
            f"{r['experts_per_layer']} | {r['repeat']} | {r['ort_step_s']:.2f} | {r['torch_step_s']:.2f} | "
            f"{r['step_ratio']:.2f} | {r['ort_rss_mib']:.0f} | {r['torch_rss_mib']:.0f} | {r['rss_ratio']:.2f} | "
            f"{r['loss_max_abs_diff']:.1e}"
        )
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
