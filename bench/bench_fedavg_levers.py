"""FedAvg levers in one process, in torch: what a change to local training or to the server step does to
accuracy per round, in minutes instead of a whole simulation.

The devices of a finished simulation (its ``data/`` folder: one JSONL per device and ``test.jsonl``) train in
turn from the global model, ``--steps`` AdamW steps each (``export.torch_train.fit_steps``, the centralized
reference's trainer), and the server averages their trainable tensors weighted by num_examples (FedAvg,
McMahan et al. 2017, eq. 2), then moves ``--server-lr`` times that step (1: plain FedAvg). The coordinator's
:class:`~coordinator.evaluation.Evaluator` scores every round's global model. Levers:

- ``--carry-optimizer``: each device keeps its AdamW moments from round to round (what a device does that keeps
  its trainer, ``device_runtime.trainer_cache``); without it, fresh moments every round.
- ``--balance P``: each device samples an example with probability proportional to count(its label) ** -P
  (0: uniform over examples; 1: uniform over the labels it holds).

    python bench/bench_fedavg_levers.py --data runs/<name>/data --trainable lora --lr 2e-3 --carry-optimizer
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

from coordinator.simulation.simulate import PRESETS, ensure_checkpoint


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a simulation's data/ folder")
    parser.add_argument("--checkpoint", type=Path, default=None, help="[default: the simulation's upcycled model]")
    parser.add_argument("--trainable", choices=("experts", "lora"), default="lora")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="local steps per device and round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--carry-optimizer", action="store_true")
    parser.add_argument("--balance", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def balanced_batches(dataset, labels: list[str], batch_size: int, power: float, seed: int):
    """Endless batches drawn without replacement within a batch, example i with weight count(label_i) ** -power."""
    from device_runtime.data import collate

    count = collections.Counter(labels)
    weights = np.array([count[label] ** -power for label in labels], dtype=np.float64)
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    while True:
        rows = rng.choice(len(labels), size=min(batch_size, len(labels)), replace=False, p=weights)
        yield collate([dataset.train[i] for i in rows], pad_id=dataset.pad_id)


def main(argv=None) -> None:
    import torch

    from coordinator.evaluation import Evaluator
    from device_runtime.data import LocalDataset, TextEncoder, read_jsonl
    from export.families import describe
    from export.global_state import load_trainable_model
    from export.torch_train import fit_steps, trainable_only

    args = _parse(argv)
    checkpoint = args.checkpoint or ensure_checkpoint(PRESETS["default"])
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    layout = dict(trainable_mode=args.trainable, lora_rank=args.lora_rank if args.trainable == "lora" else 0)
    model = load_trainable_model(checkpoint, seed=args.seed, **layout)
    names = [n for n, _ in describe(model).trainable_tensors(list(model.state_dict()), args.trainable)]
    params = trainable_only(model, names)
    encoder = TextEncoder(checkpoint / "tokenizer.json", seq_len=args.seq_len)
    evaluator = Evaluator(
        checkpoint, read_jsonl(args.data / "test.jsonl"), seed=args.seed, seq_len=args.seq_len, **layout
    )
    devices = []
    for path in sorted(p for p in args.data.glob("*.jsonl") if p.name != "test.jsonl"):
        records = read_jsonl(path)
        dataset = LocalDataset(records, encoder, eval_fraction=0.0, seed=args.seed)
        batches = (
            balanced_batches(dataset, [r["label"] for r in records], args.batch_size, args.balance, args.seed)
            if args.balance
            else dataset.train_batches(args.batch_size)
        )
        devices.append({"name": path.stem, "n": len(records), "batches": batches, "optimizer": None})
    total = sum(d["n"] for d in devices)
    global_params = [p.detach().clone() for p in params]
    print(
        f"{len(devices)} devices, {args.trainable}, lr {args.lr}, {args.steps} steps, server lr {args.server_lr}, "
        f"carry optimizer {args.carry_optimizer}, balance {args.balance}"
    )
    print("round | accuracy % | label loss | seconds")
    for server_round in range(1, args.rounds + 1):
        start = time.monotonic()
        average = [torch.zeros_like(p) for p in global_params]
        for device in devices:
            with torch.no_grad():
                for p, g in zip(params, global_params):
                    p.copy_(g)
            _, optimizer = fit_steps(
                model, params, device["batches"], steps=args.steps, learning_rate=args.lr, optimizer=device["optimizer"]
            )
            device["optimizer"] = optimizer if args.carry_optimizer else None
            for a, p in zip(average, params):
                a += p.detach() * (device["n"] / total)
        global_params = [g + args.server_lr * (a - g) for g, a in zip(global_params, average)]
        with torch.no_grad():
            for p, g in zip(params, global_params):
                p.copy_(g)
        score = evaluator.score({n: p.detach().numpy() for n, p in zip(names, params)})
        print(
            f"{server_round} | {100 * score.accuracy:.1f} | {score.loss:.3f} | {time.monotonic() - start:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
