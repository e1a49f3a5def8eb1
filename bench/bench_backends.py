"""First-order vs zeroth-order local training on the same bundle, the same examples: accuracy, step time,
peak RSS and upload bytes side by side.

Each backend trains in a fresh child process (its own peak RSS, ``VmHWM``): ``ort-training`` (backward +
AdamW, ``OrtTrainer``) and ``zo`` (MeZO: two forwards of ``eval_model.onnx`` per step, SGD on the SPSA
estimate, ``ZoTrainer``), both ``--steps`` steps of ``--batch-size`` BBC News articles in the same order.
Accuracy is label log-likelihood accuracy on ``--test`` held-out articles, computed on the bundle's pruned
model by the backend itself (the sum of the candidate label's token log-likelihoods, best of the 5 topics;
chance is 20%). Upload bytes are the encoded ``Update`` frame: dense tensors for both, and for ``zo`` also
the seed-and-scalar form (FedKSeed) a round with ``zo_seeds`` gets.

    FEDMOE_CACHE=/tmp/fedmoe-bench python bench/bench_backends.py --workdir /tmp/fedmoe-bench/work
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _measure

from device_runtime.units import MIB

BACKENDS = ("ort-training", "zo")


def _accuracy(trainer, records: list[dict], tokenizer: Path, seq_len: int) -> float:
    """Share of ``records`` whose true label has the highest summed log-likelihood among all labels."""
    from device_runtime.data import TextEncoder, collate, format_example
    from device_runtime.graph_io import target_tokens

    encoder = TextEncoder(tokenizer, seq_len=seq_len)
    labels = sorted({r["label"] for r in records})
    right = 0
    for record in records:
        scores = []
        for label in labels:
            batch = collate([encoder.encode(*format_example({**record, "label": label}))], pad_id=encoder.pad_id)
            scores.append(-trainer.evaluate([batch]).loss * target_tokens(batch))
        right += labels[scores.index(max(scores))] == record["label"]
    return right / len(records)


def _child(opts) -> dict:
    from device_runtime.backends import create_trainer
    from device_runtime.bundle import TOKENIZER_FILE, load_bundle
    from device_runtime.data import LocalDataset, read_jsonl
    from device_runtime.fit_round import build_update
    from device_runtime.wire import Assignment, FitConfig, ZoUpdate, encode
    from device_runtime.zo_directions import candidate_seeds

    bundle = load_bundle(opts.bundle)
    manifest, tokenizer = bundle.manifest, bundle.path(TOKENIZER_FILE)
    test = read_jsonl(opts.test)
    seeds = candidate_seeds(0, 1, opts.zo_seeds)
    trainer = create_trainer(
        bundle, backend=opts.child, threads=opts.threads, zeroth_order={"seed": 0, "candidates": seeds}
    )
    before = _accuracy(trainer, test, tokenizer, opts.seq_len)
    dataset = LocalDataset.from_jsonl(
        opts.train, tokenizer, seq_len=opts.seq_len, eval_fraction=0.0, seed=0, pad_to_seq_len=True
    )
    lr = opts.zo_lr if opts.child == "zo" else opts.lr
    start = time.perf_counter()
    fit = trainer.fit(dataset.train_batches(opts.batch_size), steps=opts.steps, learning_rate=lr)
    seconds = time.perf_counter() - start
    after = _accuracy(trainer, test, tokenizer, opts.seq_len)
    assignment = Assignment(
        round_id=1,
        update_id="u-1",
        model_version=0,
        shape_key=manifest.shape_key,
        expert_ids=manifest.expert_ids,
        config=FitConfig(),
    )
    params = {n: v for n, v in trainer.get_parameters().items() if n in set(manifest.trainable_names)}
    dense = len(encode(build_update(assignment, fit, params, {"loss": fit.losses[-1]})))
    compact = None
    if fit.zo_coefficients:
        seeds_used, scalars = zip(*fit.zo_coefficients)
        compact = len(
            encode(
                build_update(
                    assignment, fit, {}, {"loss": fit.losses[-1]}, zo=ZoUpdate(seeds=seeds_used, scalars=scalars)
                )
            )
        )
    from device_runtime.trainer import peak_rss_bytes

    return {
        "backend": opts.child,
        "order": trainer.order,
        "lr": lr,
        "examples": fit.num_examples,
        "step_s": fit.step_time_s,
        "train_s": seconds,
        "loss_first": fit.losses[0],
        "loss_last_10": sum(fit.losses[-10:]) / len(fit.losses[-10:]),
        "accuracy_before": before,
        "accuracy_after": after,
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "upload_dense_bytes": dense,
        "upload_zo_bytes": compact,
        "trainable_params": sum(int(__import__("numpy").prod(s.shape)) for s in manifest.tensors if s.trainable),
        "torch_imported": "torch" in sys.modules,
    }


def _prepare(opts) -> tuple[Path, Path, Path]:
    """The upcycled checkpoint's bundle and the train / test JSONL files (each built once in the workdir)."""
    from coordinator.simulation.data import train_test_split, write_jsonl
    from export.datasets import bbc_news
    from export.planner import TrainingShape

    opts.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = _measure.upcycled_checkpoint(opts.workdir, opts.layers)
    bundle = opts.workdir / f"bundle-{opts.layers}l-{opts.experts_per_layer}e"
    if not (bundle / "manifest.json").is_file():
        _measure.export_bundle(
            checkpoint,
            bundle,
            TrainingShape(batch_size=opts.batch_size, seq_len=opts.seq_len),
            opts.workdir / "export.log",
            experts_per_layer=opts.experts_per_layer,
        )
    train, test = train_test_split(bbc_news(), opts.test, seed=0)
    return (
        bundle,
        write_jsonl(train, opts.workdir / "bbc-train.jsonl"),
        write_jsonl(test, opts.workdir / "bbc-test.jsonl"),
    )


def _table(rows: list[dict]) -> str:
    fields = [
        ("backend", "{}"),
        ("order", "{}"),
        ("lr", "{:g}"),
        ("examples", "{}"),
        ("step_s", "{:.3f}"),
        ("peak_rss_mib", "{:.0f}"),
        ("loss_first", "{:.3f}"),
        ("loss_last_10", "{:.3f}"),
        ("accuracy_before", "{:.2f}"),
        ("accuracy_after", "{:.2f}"),
        ("upload_dense_bytes", "{}"),
        ("upload_zo_bytes", "{}"),
    ]
    lines = ["| " + " | ".join(name for name, _ in fields) + " |", "|" + "---|" * len(fields)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row[n] is None else f.format(row[n]) for n, f in fields) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedmoe-bench/work"))
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the upcycled SmolLM2")
    parser.add_argument("--experts-per-layer", type=int, default=1, help="kept experts (1: the Pi bundle)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--test", type=int, default=100, help="held-out articles scored for accuracy")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (ort-training)")
    parser.add_argument("--zo-lr", type=float, default=1e-6, help="SGD learning rate (zo)")
    parser.add_argument("--zo-seeds", type=int, default=1024, help="FedKSeed candidate seeds K")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    for name in ("bundle", "train", "test-file"):
        parser.add_argument(f"--{name}", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        opts.train, opts.test = opts.train, opts.test_file
        print(json.dumps(_child(opts)))
        return 0
    bundle, train, test = _prepare(opts)
    common = [
        "--bundle",
        str(bundle),
        "--train",
        str(train),
        "--test-file",
        str(test),
        "--steps",
        str(opts.steps),
        "--batch-size",
        str(opts.batch_size),
        "--seq-len",
        str(opts.seq_len),
        "--lr",
        str(opts.lr),
        "--zo-lr",
        str(opts.zo_lr),
        "--zo-seeds",
        str(opts.zo_seeds),
        "--threads",
        str(opts.threads),
        "--test",
        str(opts.test),
    ]
    rows = [_measure.run_json([sys.executable, __file__, "--child", backend, *common]) for backend in opts.backends]
    print(json.dumps(rows, indent=2))
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
