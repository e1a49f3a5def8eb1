"""Simulation outputs: per-round metrics (CSV, JSON), the summary, and plots (PNG, matplotlib).

Round 0 is the zero-shot evaluation of the initial global model. Two evaluations per round: the coordinator's own
(``accuracy``, ``loss``: label log-likelihood on the held-out test set, ``coordinator/evaluation.py``, of the version
the round made) and the federated one (``fed_loss``: the devices' example-weighted loss of the completion tokens
of their own held-out records, nats per token, of the version the round STARTED from, i.e. the previous row's, as
each device's bundle holds it; ``fed_accuracy`` where devices computed one; per device ``device_eval_loss``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from device_runtime.units import MIB


@dataclass(frozen=True)
class DeviceRound:
    """One device in one round: training loss, bytes moved, peak RSS (MiB), experts kept per layer (the most in
    any layer) and which: the global ids per MoE layer, layers separated by ``|`` (``experts_label``), what it
    held frozen besides (``ShapeKey.held_label``), and its federated evaluation: the loss (nats per completion
    token) of the model it received, as its bundle holds it, on ``eval_examples`` held-out records before training
    (None: it sent none); its training backend and training seconds."""

    device: str
    loss: float | None
    bytes_up: int
    bytes_down: int
    peak_rss_mib: float | None
    experts_kept: int
    experts: str = ""
    frozen: str = "-"
    eval_loss: float | None = None
    eval_examples: int = 0
    backend: str = ""
    train_s: float | None = None


def experts_label(expert_ids) -> str:
    """Per MoE layer the global expert ids, ``"0,2|1,3"`` for ``((0, 2), (1, 3))``."""
    return "|".join(",".join(str(g) for g in layer) for layer in expert_ids)


@dataclass(frozen=True)
class RoundRecord:
    """One round of one strategy: global accuracy / loss on the held-out set (the version the round made), wall
    time, bytes moved, and the federated evaluation of the version the round started from (``fed_loss``, nats per
    completion token; ``fed_accuracy`` where devices computed one; ``fed_examples`` held-out records; None / 0:
    none, e.g. round 0, ``eval_fraction`` 0, or the torch reference and the centralized bound)."""

    strategy: str
    round: int
    accuracy: float
    loss: float
    wall_s: float
    bytes_up: int
    bytes_down: int
    devices: tuple[DeviceRound, ...] = field(default_factory=tuple)
    fed_loss: float | None = None
    fed_accuracy: float | None = None
    fed_examples: int = 0


def cumulative_bytes_up(records: Sequence[RoundRecord]) -> list[int]:
    """Running total of bytes uploaded, round by round (records of one strategy, in order)."""
    total, out = 0, []
    for record in records:
        total += record.bytes_up
        out.append(total)
    return out


def write_metrics(records: Sequence[RoundRecord], out: Path) -> None:
    """``metrics.json`` (everything, nested) and ``metrics.csv`` (one row per strategy, round and device)."""
    (out / "metrics.json").write_text(json.dumps([asdict(r) for r in records], indent=2))
    columns = [
        "strategy",
        "round",
        "accuracy",
        "loss",
        "fed_loss",
        "fed_accuracy",
        "fed_examples",
        "wall_s",
        "bytes_up",
        "bytes_down",
        "device",
        "device_loss",
        "device_eval_loss",
        "device_eval_examples",
        "device_bytes_up",
        "device_bytes_down",
        "device_peak_rss_mib",
        "experts_kept",
        "experts",
        "frozen",
        "device_backend",
        "device_train_s",
    ]
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for r in records:
            head = [
                r.strategy,
                r.round,
                f"{r.accuracy:.4f}",
                f"{r.loss:.4f}",
                _number(r.fed_loss),
                _number(r.fed_accuracy),
                r.fed_examples,
                f"{r.wall_s:.1f}",
                r.bytes_up,
                r.bytes_down,
            ]
            for d in r.devices or (None,):
                tail = (
                    [""] * 12
                    if d is None
                    else [
                        d.device,
                        _number(d.loss),
                        _number(d.eval_loss),
                        d.eval_examples,
                        d.bytes_up,
                        d.bytes_down,
                        "" if d.peak_rss_mib is None else f"{d.peak_rss_mib:.0f}",
                        d.experts_kept,
                        d.experts,
                        d.frozen,
                        d.backend,
                        _number(d.train_s),
                    ]
                )
                writer.writerow(head + tail)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def plot_accuracy(records: Sequence[RoundRecord], path: Path) -> Path:
    """Accuracy vs round and vs cumulative MiB uploaded, one line per strategy, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy in dict.fromkeys(r.strategy for r in records):
        rows = [r for r in records if r.strategy == strategy]
        accuracy = [100 * r.accuracy for r in rows]
        by_round.plot([r.round for r in rows], accuracy, marker="o", label=strategy)
        by_bytes.plot([b / MIB for b in cumulative_bytes_up(rows)], accuracy, marker="o", label=strategy)
    by_round.set(xlabel="round (0 = zero-shot)", ylabel="held-out accuracy (%)", title="accuracy vs round")
    by_bytes.set(
        xlabel="MiB uploaded by all devices (cumulative)",
        ylabel="held-out accuracy (%)",
        title="accuracy vs bytes uploaded",
    )
    for axis in (by_round, by_bytes):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
