"""Shared helpers of the benchmarks: train a bundle in a fresh child process and measure it.

Run as a script, this file is the child: ``python bench/_measure.py ort BUNDLE DATA --steps N ...`` trains a
bundle with ONNX Runtime training and ``python bench/_measure.py torch CHECKPOINT DATA --bundle BUNDLE ...``
trains the same pruned model with torch eager; each prints one JSON line (per-step seconds, whether torch was
imported) and its own peak resident set size, ``VmHWM`` (not ``ru_maxrss``: exec carries over the parent's
resident size at fork, see ``device_runtime.trainer.peak_rss_bytes``).

Both children read the same JSONL file with the same seed and pad every batch to ``(batch, seq_len)``, so they
see identical batches of the shape the planner estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device_runtime.units import MIB

HERE = Path(__file__).resolve()


def write_bbc_jsonl(path: Path) -> Path:
    """BBC News records (``export.datasets.bbc_news``) as a JSONL file at ``path`` (written once)."""
    if not path.is_file():
        from export.datasets import bbc_news

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in bbc_news()))
    return path


def fedmoe_export(args: list[str], log: Path) -> float:
    """Run ``fedmoe-export *args`` (output appended to ``log``); return its wall-clock seconds."""
    start = time.perf_counter()
    with open(log, "a") as handle:
        subprocess.run([sys.executable, "-m", "export.cli", *args], stdout=handle, stderr=handle, check=True)
    return time.perf_counter() - start


def upcycled_checkpoint(workdir: Path, layers: int) -> Path:
    """``workdir/smollm2-e4k2-{layers}l``: SmolLM2 upcycled to 4 experts, top-2, first ``layers`` layers (once)."""
    path = workdir / f"smollm2-e4k2-{layers}l"
    if not (path / "config.json").is_file():
        fedmoe_export(
            ["upcycle", "smollm2", "--experts", "4", "--top-k", "2", "--num-layers", str(layers), "--out", str(path)],
            workdir / "export.log",
        )
    return path


def export_bundle(
    checkpoint: Path,
    out: Path,
    train,
    log: Path,
    *,
    experts_per_layer: int | None = None,
    budget_mib: float | None = None,
) -> float:
    """``fedmoe-export bundle`` for a fixed experts-per-layer or a memory budget; returns its seconds."""
    args = [
        "bundle",
        str(checkpoint),
        "--out",
        str(out),
        "--batch-size",
        str(train.batch_size),
        "--seq-len",
        str(train.seq_len),
        "--trainable",
        train.trainable_mode,
    ]
    if train.trainable_mode == "lora":
        args += ["--lora-rank", str(train.lora_rank)]
    args += ["--memory-mib", str(budget_mib)] if budget_mib else ["--experts-per-layer", str(experts_per_layer)]
    if train.frozen_dtype is not None:
        args += ["--frozen", "merged" if train.merged else train.frozen_dtype]
    return fedmoe_export(args, log)


def run_child(args: list[str]) -> dict:
    """Run ``python bench/_measure.py *args``; return its JSON line (with its ``peak_rss_mib``).

    Raises:
        RuntimeError: the child failed (the tail of its stderr is in the message).
    """
    return run_json([sys.executable, str(HERE), *args])


def run_json(command: list[str]) -> dict:
    """Run ``command`` (a child printing one JSON line last); return that line parsed.

    Raises:
        RuntimeError: the child failed (the tail of its stderr is in the message).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(command, stdout=out, stderr=err)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"child {command[1:4]} exited {proc.returncode}: {err.read().strip()[-2000:]}")
        return json.loads(out.read().strip().splitlines()[-1])


def _peak_rss_mib() -> float:
    from device_runtime.trainer import peak_rss_bytes

    return peak_rss_bytes() / MIB


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``/proc/self/clear_refs`` value 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _batches(data: Path, tokenizer: Path, batch_size: int, seq_len: int):
    from device_runtime.data import LocalDataset

    dataset = LocalDataset.from_jsonl(data, tokenizer, seq_len=seq_len, eval_fraction=0.0, seed=0, pad_to_seq_len=True)
    return dataset.train_batches(batch_size)


def _ort_child(opts) -> dict:
    from device_runtime.bundle import TOKENIZER_FILE, load_bundle
    from device_runtime.ort_trainer import OrtTrainer

    bundle = load_bundle(opts.target)
    trainer = OrtTrainer(bundle, threads=opts.threads, progress=False)
    batches = _batches(opts.data, bundle.path(TOKENIZER_FILE), opts.batch_size, opts.seq_len)
    times, losses = [], []
    for _ in range(opts.warmup + opts.steps):
        fit = trainer.fit(batches, steps=1, learning_rate=1e-4)
        times.append(fit.step_time_s)
        losses.append(fit.losses[0])
    return {"step_s": times[opts.warmup :], "losses": losses}


def _torch_child(opts) -> dict:
    """The bundle's pruned model in torch eager: same trainable set, AdamW(eps 1e-8, wd 0.01), same batches."""
    import gc

    import torch

    from device_runtime.bundle import load_bundle
    from export.bundle_writer import BundleRequest, prepare_model
    from export.training_graph import TrainingWrapper

    torch.set_num_threads(opts.threads)
    manifest = load_bundle(opts.bundle).manifest
    request = BundleRequest(
        keep=manifest.expert_ids,
        trainable_mode=manifest.shape_key.trainable_mode,
        lora_rank=manifest.shape_key.lora_rank,
    )
    pruned, description = prepare_model(Path(opts.target), request)
    trainable = [n for n, _ in description.trainable_tensors(list(pruned.state_dict()), request.trainable_mode)]
    wrapper = TrainingWrapper(pruned, trainable=trainable).train()
    params = dict(wrapper.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in trainable)
    optimizer = torch.optim.AdamW([params[n] for n in trainable], lr=1e-4, eps=1e-8, weight_decay=0.01)
    gc.collect()
    reset = reset_peak_rss()  # the global model loaded before pruning is not part of training
    batches = _batches(opts.data, Path(opts.target) / "tokenizer.json", opts.batch_size, opts.seq_len)
    times, losses = [], []
    for _ in range(opts.warmup + opts.steps):
        batch = next(batches)
        inputs = wrapper.make_inputs(
            *(torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.labels)), aux_loss_coef=0.01
        )
        start = time.perf_counter()
        loss = wrapper(*inputs.values())[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {"step_s": times[opts.warmup :], "losses": losses, "peak_reset": reset}


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("backend", choices=["ort", "torch"])
    parser.add_argument("target", help="ort: bundle directory; torch: MoE checkpoint directory")
    parser.add_argument("data", type=Path, help="JSONL records")
    parser.add_argument("--bundle", help="torch: the bundle whose expert subset and trainable mode to copy")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    opts = _parse(argv)
    result = _ort_child(opts) if opts.backend == "ort" else _torch_child(opts)
    result.update(torch_imported="torch" in sys.modules, peak_rss_mib=_peak_rss_mib(), pid=os.getpid())
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
