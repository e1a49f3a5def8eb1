"""Device memory over consecutive rounds: does the data segment / peak RSS grow round after round?

A federated device trains one assignment per round in the same long-running process. This bench replays
that loop in a fresh child process, with the device's own code path (``decode`` the Assignment frame,
``fit_assignment``, ``encode`` the Update), on the 8-layer upcycled SmolLM2 with 1 expert per layer (the Pi
bundle of the default simulation), and prints after every round the child's data segment (``VmData``, what
``RLIMIT_DATA`` limits), peak RSS (``VmHWM``), RSS and the round's seconds: as the device runs
(``device_runtime.memory``: fixed mmap threshold, trim between rounds; ``device_runtime.trainer_cache``: the
trainer kept across rounds), with a fresh trainer every round (``fedmoe-device run --fresh-trainer``), and
with a fresh trainer and glibc's defaults.

    python bench/bench_device_rounds.py --workdir /tmp/fedmoe-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import _measure

from export.planner import TrainingShape


def _status() -> dict[str, float]:
    """VmData, VmHWM and VmRSS of this process (MiB), its user and kernel CPU seconds and minor faults so far."""
    import resource

    from device_runtime.memory import status_kib

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **{key: status_kib(key) // 1024 for key in ("VmData", "VmHWM", "VmRSS")},
        "user": usage.ru_utime,
        "kernel": usage.ru_stime,
        "faults": usage.ru_minflt,
    }


def _child(opts) -> None:
    from safetensors.numpy import load_file

    from device_runtime.bundle import WEIGHTS_FILE, load_bundle
    from device_runtime.fit_round import fit_assignment
    from device_runtime.memory import limit_heap_growth, release_memory
    from device_runtime.trainer_cache import TrainerCache
    from device_runtime.wire import Assignment, FitConfig, decode, encode

    if opts.memory_care:
        limit_heap_growth()
    bundle = load_bundle(opts.bundle)
    manifest = bundle.manifest
    weights = load_file(bundle.path(WEIGHTS_FILE))
    ids = tuple(tuple(layer) for layer in manifest.expert_ids)
    frame = encode(
        Assignment(
            round_id=1,
            update_id="u-1",
            model_version=0,
            shape_key=manifest.shape_key,
            expert_ids=ids,
            config=FitConfig(
                batch_size=opts.batch_size, seq_len=opts.seq_len, learning_rate=2e-4, local_steps=opts.steps
            ),
            tensors={t.name: weights[t.name] for t in manifest.tensors},
        )
    )
    del weights
    trainers = TrainerCache(reuse=opts.keep_trainer)
    before = _status()
    for number in range(1, opts.rounds + 1):
        start = time.perf_counter()
        assignment = decode(frame, max_size=len(frame))
        payload = encode(fit_assignment(bundle, assignment, opts.data, threads=1, trainers=trainers))
        del assignment, payload
        if opts.memory_care:
            release_memory()
        now = _status()
        spent = {key: now[key] - before[key] for key in ("user", "kernel", "faults")}
        print(json.dumps({"round": number, **now, **spent, "seconds": time.perf_counter() - start}), flush=True)
        before = now


def _run(opts, bundle: Path, data: Path, memory_care: bool, keep_trainer: bool) -> list[dict]:
    args = (
        [
            sys.executable,
            __file__,
            "--child",
            "--bundle",
            str(bundle),
            "--data",
            str(data),
            "--rounds",
            str(opts.rounds),
            "--steps",
            str(opts.steps),
            "--batch-size",
            str(opts.batch_size),
            "--seq-len",
            str(opts.seq_len),
        ]
        + (["--memory-care"] if memory_care else [])
        + (["--keep-trainer"] if keep_trainer else [])
    )
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedmoe-bench"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="local steps per round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--device-only", action="store_true", help="only the setting the device runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-care", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep-trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        _child(opts)
        return 0
    opts.workdir.mkdir(parents=True, exist_ok=True)
    data = _measure.write_bbc_jsonl(opts.workdir / "bbc_news.jsonl")
    checkpoint = _measure.upcycled_checkpoint(opts.workdir, 8)
    bundle = opts.workdir / "bundles" / f"rounds-1-b{opts.batch_size}s{opts.seq_len}"
    if not bundle.is_dir():
        _measure.export_bundle(
            checkpoint,
            bundle,
            TrainingShape(opts.batch_size, opts.seq_len),
            opts.workdir / "export.log",
            experts_per_layer=1,
        )
    print(f"8 layers, 1 expert/layer, batch {opts.batch_size}x{opts.seq_len}, {opts.steps} steps per round (MiB)")
    print("setting | round | VmData | peak RSS | RSS | seconds | user s | kernel s | minor faults")
    settings = (
        (True, True, "device (memory care, kept trainer)"),
        (True, False, "memory care, fresh trainer"),
        (False, False, "glibc defaults, fresh trainer"),
    )
    for care, keep, label in settings[:1] if opts.device_only else settings:
        for row in _run(opts, bundle, data, care, keep):
            print(
                f"{label} | {row['round']} | {row['VmData']} | {row['VmHWM']} | {row['VmRSS']} | {row['seconds']:.1f}"
                f" | {row['user']:.2f} | {row['kernel']:.2f} | {row['faults']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
