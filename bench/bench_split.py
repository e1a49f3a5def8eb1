"""Split mode against the device backends on the same examples: ORT training (first-order) vs zo (MeZO) vs split
(HO-SFL) vs split + ACP-SL at several keep ratios, one table.

Setting (as ``bench_backends.py``): SmolLM2 upcycled to 8 layers x 4 experts (top-2); a Pi's bundle keeps 1
expert per layer. ``--steps`` steps of ``--batch-size`` BBC News articles, the same ones in the same order for
every row. ort-training and zo train the Pi bundle in a child process. split: the device (a child process, plain
onnxruntime) holds the embeddings and layers ``< --cut`` with 1 expert each; this process plays the coordinator:
the top (layers ``>= --cut``, every expert) in torch, the HO-SFL step over a pipe carrying the real wire frames
(``device_runtime.wire``), so the bytes are the protocol's.

Accuracy: label log-likelihood accuracy on ``--test`` held-out articles (best of the 5 topics; chance 20%), one
scorer for every row: torch, on the model each row trains (the Pi's pruned model for ort-training and zo; the
pruned bottom + the whole top for split) with the trained tensors applied (``export.evaluate.label_accuracy``).

Columns: accuracy before / after, seconds per step (wall; split: device and coordinator together), the device's
peak RSS (``VmHWM`` of its process), bytes up and down per step and per round (a round = ``--steps`` steps;
ort-training / zo send their update once per round: dense tensors, zo also as seeds and scalars), the
coordinator's CPU seconds per step (split only).

    python bench/bench_split.py --workdir /tmp/fedmoe-bench/work
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

import _measure

from device_runtime.units import MIB

LAYERS, EXPERTS = 8, 4


def _rows_of(name: str, keep: tuple[tuple[int, ...], ...]) -> list[int]:
    layer = int(name.split(".")[2])
    return list(keep[layer])


def _score(opts, keep: tuple[tuple[int, ...], ...], tensors: dict) -> float:
    """Label accuracy of the checkpoint pruned to ``keep`` with ``tensors`` applied (global rows sliced to
    ``keep`` for tensors that cover every expert)."""
    import numpy as np

    from export.evaluate import label_accuracy
    from export.global_state import apply_state, load_trainable_model
    from export.prune import prune

    model = load_trainable_model(opts.checkpoint, trainable_mode="experts", lora_rank=0, seed=0)
    pruned, _ = prune(model, keep)
    shapes = {n: tuple(p.shape) for n, p in pruned.named_parameters()}
    fitted = {
        n: np.asarray(a if tuple(a.shape) == shapes[n] else a[_rows_of(n, keep)], dtype=np.float32)
        for n, a in tensors.items()
    }
    apply_state(pruned, fitted)
    pruned.eval()
    test = [json.loads(line) for line in Path(opts.test_file).read_text().splitlines()]
    labels = sorted({r["label"] for r in test})
    return label_accuracy(pruned, Path(opts.checkpoint) / "tokenizer.json", test, labels, seq_len=opts.seq_len).accuracy


# ---------------------------------------------------------------- children (devices)


def _dataset(opts, tokenizer: Path):
    from device_runtime.data import LocalDataset

    return LocalDataset.from_jsonl(
        opts.train, tokenizer, seq_len=opts.seq_len, eval_fraction=0.0, seed=0, pad_to_seq_len=True
    )


def _backend_child(opts) -> dict:
    """ort-training or zo on the Pi bundle; writes the trained tensors for the parent's scorer."""
    from safetensors.numpy import save_file

    from device_runtime.backends import create_trainer
    from device_runtime.bundle import TOKENIZER_FILE, load_bundle
    from device_runtime.fit_round import build_update
    from device_runtime.trainer import peak_rss_bytes
    from device_runtime.wire import Assignment, FitConfig, ZoUpdate, encode
    from device_runtime.zo_directions import candidate_seeds

    bundle = load_bundle(opts.bundle)
    manifest = bundle.manifest
    seeds = candidate_seeds(0, 1, 1024)
    trainer = create_trainer(
        bundle, backend=opts.child, threads=opts.threads, zeroth_order={"seed": 0, "candidates": seeds}
    )
    lr = opts.zo_lr if opts.child == "zo" else opts.lr
    start = time.perf_counter()
    fit = trainer.fit(
        _dataset(opts, bundle.path(TOKENIZER_FILE)).train_batches(opts.batch_size), steps=opts.steps, learning_rate=lr
    )
    seconds = time.perf_counter() - start
    trainable = set(manifest.trainable_names)
    params = {n: v for n, v in trainer.get_parameters().items() if n in trainable}
    save_file(params, str(opts.out_tensors))
    assignment = Assignment(
        round_id=1,
        update_id="u-1",
        model_version=0,
        shape_key=manifest.shape_key,
        expert_ids=manifest.expert_ids,
        config=FitConfig(),
    )
    up = len(encode(build_update(assignment, fit, params, {"loss": fit.losses[-1]})))
    if fit.zo_coefficients:
        used, scalars = zip(*fit.zo_coefficients)
        up = len(
            encode(
                build_update(assignment, fit, {}, {"loss": fit.losses[-1]}, zo=ZoUpdate(seeds=used, scalars=scalars))
            )
        )
    down = sum(a.nbytes for a in params.values())  # the assignment's tensors (the round's download)
    return {
        "step_s": seconds / opts.steps,
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "up_round": up,
        "down_round": down,
        "loss_last_10": sum(fit.losses[-10:]) / 10,
    }


class _PipeLink:
    """A split device's link over a multiprocessing connection carrying wire frames."""

    def __init__(self, conn):
        self.conn = conn

    def exchange(self, msg):
        from device_runtime.wire import decode, encode

        self.conn.send_bytes(encode(msg))
        return decode(self.conn.recv_bytes(), max_size=1 << 30)


def _split_child(opts) -> dict:
    """The split device: SplitTrainer over the pipe to the parent (the coordinator)."""
    from device_runtime.bundle import TOKENIZER_FILE, load_bundle
    from device_runtime.split_trainer import SplitTrainer
    from device_runtime.trainer import peak_rss_bytes
    from device_runtime.wire import SplitConfig

    bundle = load_bundle(opts.bundle)
    conn = Client(opts.address, authkey=b"bench")
    trainer = SplitTrainer(bundle, threads=opts.threads, progress=False)
    config = SplitConfig(
        cut_layer=opts.cut, perturbations=opts.perturbations, keep_ratio=opts.keep_ratio, learning_rate=opts.split_lr
    )
    trainer.join(
        _PipeLink(conn), update_id="u-1", round_id=1, seed=0, config=config, expert_ids=bundle.manifest.expert_ids
    )
    start = time.perf_counter()
    fit = trainer.fit(
        _dataset(opts, bundle.path(TOKENIZER_FILE)).train_batches(opts.batch_size),
        steps=opts.steps,
        learning_rate=opts.split_lr,
    )
    seconds = time.perf_counter() - start
    conn.close()
    return {
        "step_s": seconds / opts.steps,
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "loss_last_10": sum(fit.losses[-10:]) / 10,
    }


# ---------------------------------------------------------------- parent


def _serve_split(opts, keep_ratio: float, common: list[str]) -> dict:
    """Run the split device child against a SplitGroup in this process; the row's numbers."""
    import subprocess
    import tempfile

    import numpy as np

    from coordinator.split_group import Member, SplitGroup
    from coordinator.split_top import SplitTop
    from device_runtime.wire import FitConfig, SmashedData, SplitConfig, decode, encode
    from export.global_state import global_tensor_names, load_trainable_model

    model = load_trainable_model(opts.checkpoint, trainable_mode="experts", lora_rank=0, seed=0)
    names = set(global_tensor_names(model))
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n in names}
    split = SplitConfig(
        cut_layer=opts.cut, perturbations=opts.perturbations, keep_ratio=keep_ratio, learning_rate=opts.split_lr
    )
    config = FitConfig(
        batch_size=opts.batch_size,
        seq_len=opts.seq_len,
        learning_rate=opts.lr,
        local_steps=opts.steps,
        aux_loss_coef=0.0,
        split=split,
    )
    top = SplitTop(opts.checkpoint, params, cut_layer=opts.cut, learning_rate=opts.lr, threads=opts.threads)
    keep = tuple((0,) for _ in range(opts.cut))
    group = SplitGroup(1, config, top, [Member("u-1", "pi", keep)], vocab_size=int(top.top.config.vocab_size))
    listener = Listener(("127.0.0.1", 0), authkey=b"bench")
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                "split",
                "--keep-ratio",
                str(keep_ratio),
                "--address",
                f"{listener.address[0]}:{listener.address[1]}",
                *common,
            ],
            stdout=out,
        )
        conn = listener.accept()
        up = down = 0
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = cpu.ru_utime + cpu.ru_stime
        while not group.finished:
            raw = conn.recv_bytes()
            up += len(raw)
            msg = decode(raw, max_size=1 << 30)
            handler = group.on_smashed if isinstance(msg, SmashedData) else group.on_scalars
            for _, reply in handler("u-1", msg):
                frame = encode(reply)
                down += len(frame)
                conn.send_bytes(frame)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        coordinator_cpu = cpu.ru_utime + cpu.ru_stime - cpu0
        assert child.wait(600) == 0, "split device failed"
        out.seek(0)
        row = json.loads(out.read().strip().splitlines()[-1])
    full = tuple(tuple(range(EXPERTS)) for _ in range(LAYERS - opts.cut))
    tensors = top.tensors()
    before = _score(opts, keep + full, {n: v for n, v in params.items()})
    after = _score(opts, keep + full, tensors)
    return {
        **row,
        "backend": "split" if keep_ratio >= 1 else f"split+acp {keep_ratio:g}",
        "accuracy_before": before,
        "accuracy_after": after,
        "up_step": up / opts.steps,
        "down_step": down / opts.steps,
        "up_round": up,
        "down_round": down + sum(int(np.prod(np.shape(params[n]))) * 4 for n in top.bottom) // EXPERTS,
        "coordinator_cpu_step_s": coordinator_cpu / opts.steps,
    }


def _backend_row(opts, backend: str, common: list[str]) -> dict:
    from safetensors.numpy import load_file

    from export.global_state import global_tensor_names, load_trainable_model

    tensors_file = opts.workdir / f"trained-{backend}.safetensors"
    row = _measure.run_json([sys.executable, __file__, "--child", backend, "--out-tensors", str(tensors_file), *common])
    keep = tuple((0,) for _ in range(LAYERS))
    model = load_trainable_model(opts.checkpoint, trainable_mode="experts", lora_rank=0, seed=0)
    names = set(global_tensor_names(model))
    params = {n: p.detach().numpy() for n, p in model.named_parameters() if n in names}
    return {
        **row,
        "backend": backend,
        "accuracy_before": _score(opts, keep, params),
        "accuracy_after": _score(opts, keep, load_file(str(tensors_file))),
        "up_step": row["up_round"] / opts.steps,
        "down_step": row["down_round"] / opts.steps,
        "coordinator_cpu_step_s": None,
    }


def _prepare(opts) -> None:
    from coordinator.simulation.data import train_test_split, write_jsonl
    from export.bundle_writer import BundleRequest, write_bundle
    from export.datasets import bbc_news
    from export.planner import TrainingShape

    opts.workdir.mkdir(parents=True, exist_ok=True)
    opts.checkpoint = _measure.upcycled_checkpoint(opts.workdir, LAYERS)
    opts.pi_bundle = opts.workdir / f"bundle-{LAYERS}l-1e"
    if not (opts.pi_bundle / "manifest.json").is_file():
        _measure.export_bundle(
            opts.checkpoint,
            opts.pi_bundle,
            TrainingShape(batch_size=opts.batch_size, seq_len=opts.seq_len),
            opts.workdir / "export.log",
            experts_per_layer=1,
        )
    opts.split_bundle = opts.workdir / f"bundle-{LAYERS}l-1e-cut{opts.cut}"
    if not (opts.split_bundle / "manifest.json").is_file():
        write_bundle(
            opts.checkpoint,
            opts.split_bundle,
            BundleRequest(keep=tuple((0,) for _ in range(opts.cut)), cut_layer=opts.cut),
        )
    train, test = train_test_split(bbc_news(), opts.test, seed=0)
    opts.train = write_jsonl(train, opts.workdir / "bbc-train.jsonl")
    opts.test_file = write_jsonl(test, opts.workdir / "bbc-test.jsonl")


FIELDS = [
    ("backend", "{}"),
    ("accuracy_before", "{:.2f}"),
    ("accuracy_after", "{:.2f}"),
    ("step_s", "{:.3f}"),
    ("peak_rss_mib", "{:.0f}"),
    ("up_step", "{:,.0f}"),
    ("down_step", "{:,.0f}"),
    ("up_round", "{:,.0f}"),
    ("down_round", "{:,.0f}"),
    ("coordinator_cpu_step_s", "{:.3f}"),
]


def _table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(n for n, _ in FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row.get(n) is None else f.format(row[n]) for n, f in FIELDS) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedmoe-bench/work"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--test", type=int, default=100, help="held-out articles scored for accuracy")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (ort-training; split's top)")
    parser.add_argument("--zo-lr", type=float, default=1e-4, help="SGD learning rate (zo; bench_backends' best)")
    parser.add_argument("--split-lr", type=float, default=1e-5, help="SGD learning rate of split's bottom")
    parser.add_argument("--cut", type=int, default=1, help="split: decoder layers on the device")
    parser.add_argument("--perturbations", type=int, default=2, help="split: HO-SFL's P")
    parser.add_argument("--keep-ratios", default="0.5,0.25", help="split + ACP-SL rows (comma-separated)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default="ort-training,zo,split", help="rows to run (comma-separated)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for name in ("bundle", "train", "address", "out-tensors"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--keep-ratio", type=float, default=1.0, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        opts.train, opts.out_tensors = Path(opts.train), opts.out_tensors and Path(opts.out_tensors)
        if opts.address:
            host, port = opts.address.rsplit(":", 1)
            opts.address = (host, int(port))
        print(json.dumps(_split_child(opts) if opts.child == "split" else _backend_child(opts)))
        return 0
    _prepare(opts)
    common = [
        "--train",
        str(opts.train),
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
        "--split-lr",
        str(opts.split_lr),
        "--cut",
        str(opts.cut),
        "--perturbations",
        str(opts.perturbations),
        "--threads",
        str(opts.threads),
    ]
    rows = []
    for backend in opts.backends.split(","):
        if backend == "split":
            for ratio in [1.0, *(float(r) for r in opts.keep_ratios.split(",") if r)]:
                rows.append(_serve_split(opts, ratio, [*common, "--bundle", str(opts.split_bundle)]))
                print(_table(rows[-1:]), flush=True)
        else:
            rows.append(_backend_row(opts, backend, [*common, "--bundle", str(opts.pi_bundle)]))
            print(_table(rows[-1:]), flush=True)
    print(json.dumps(rows, indent=2))
    print(f"load average {os.getloadavg()[0]:.2f}; {opts.steps} steps of {opts.batch_size} x {opts.seq_len} tokens")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
