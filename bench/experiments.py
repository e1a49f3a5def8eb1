"""Strategies x Dirichlet alpha x seeds: one `fedmoe-coord simulate --compare ...` per (alpha, seed), then a table
of mean and standard deviation over the seeds and plots (accuracy vs round, vs MiB uploaded, vs wall time).

    python bench/experiments.py --strategies centralized,hfedmoe,dense-fedavg --alphas 0.1,0.5,1.0 --seeds 0,1,2
    python bench/experiments.py --preset smoke --alphas 0.1,1.0 --seeds 0,1 -- --rounds 2   # after --: simulate options

Each (alpha, seed) run lands in ``<workdir>/alpha<a>-seed<s>`` (a finished one, with its ``summary.json``, is
reused, so an interrupted grid resumes). Writes ``results.csv``, ``results.md`` and ``experiments.png`` to
``--workdir`` and prints two tables: per (alpha, strategy) the final and best accuracy, the mean of the last two
rounds, the first round that reaches ``--target`` % (its mean over the seeds that reach it, and how many did), the
upload and the round time; then the accuracy of every round. Each number is mean +- std over the seeds (n - 1 in
the denominator; one seed gives none).

    python bench/experiments.py --strategies hfedmoe,torch-hfedmoe --alphas 1.0 --seeds 0,1,2 -- --test-size 444
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from device_runtime.units import MIB

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="centralized,hfedmoe,dense-fedavg")
    parser.add_argument("--alphas", default="0.1,0.5,1.0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--workdir", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--target", type=float, default=80.0, help="accuracy (%%) whose first round is reported")
    parser.add_argument("simulate_args", nargs="*", help="more `fedmoe-coord simulate` options (after --)")
    return parser.parse_args(argv)


def run_grid(args) -> dict[tuple[float, int], dict]:
    """``(alpha, seed) -> summary.json`` of every run of the grid (running the missing ones)."""
    out = {}
    for alpha in (float(a) for a in args.alphas.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            run = (args.workdir / f"alpha{alpha:g}-seed{seed}").resolve()
            if not (run / "summary.json").is_file():
                command = [
                    sys.executable,
                    "-m",
                    "coordinator.cli",
                    "simulate",
                    "--preset",
                    args.preset,
                    "--compare",
                    args.strategies,
                    "--alpha",
                    str(alpha),
                    "--seed",
                    str(seed),
                    "--out",
                    str(run),
                    "--name",
                    run.name,
                    *args.simulate_args,
                ]
                print("running", " ".join(command), flush=True)
                subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            out[(alpha, seed)] = json.loads((run / "summary.json").read_text())
    return out


def _mean_std(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def first_round_at(accuracy_per_round: list[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy (a fraction) reaches ``target`` %, or None."""
    return next((r for r, a in enumerate(accuracy_per_round) if r and 100 * a >= target), None)


def table(summaries: dict[tuple[float, int], dict], target: float = 80.0) -> list[dict]:
    """One row per (alpha, strategy): final, best and last-two-rounds accuracy, the first round at ``target`` %,
    MiB uploaded per round and round wall time, each as mean and std over the seeds; ``round_<r>`` per round."""
    rows = []
    for alpha in sorted({a for a, _ in summaries}):
        runs = [s for (a, _), s in sorted(summaries.items()) if a == alpha]
        for strategy in runs[0]["strategies"]:
            per = [run["strategies"][strategy] for run in runs]
            reached = [r for s in per if (r := first_round_at(s["accuracy_per_round"], target)) is not None]
            metrics = {
                "final_accuracy": [100 * s["final_accuracy"] for s in per],
                "best_accuracy": [100 * max(s["accuracy_per_round"][1:]) for s in per],
                "last_two_accuracy": [100 * np.mean(s["accuracy_per_round"][-2:]) for s in per],
                "round_at_target": reached or [float("nan")],
                "mib_up_per_round": [np.mean(s["bytes_up_per_round"][1:]) / MIB for s in per],
                "round_wall_s": [np.mean(s["round_wall_s"][1:]) for s in per],
            }
            metrics.update(
                {
                    f"round_{r}": [100 * s["accuracy_per_round"][r] for s in per]
                    for r in range(len(per[0]["accuracy_per_round"]))
                }
            )
            row = {
                "alpha": alpha,
                "strategy": strategy,
                "seeds": len(per),
                "seeds_at_target": len(reached),
                "rounds": len(per[0]["accuracy_per_round"]),
            }
            for name, values in metrics.items():
                row[name], row[name + "_std"] = _mean_std(values)
            rows.append(row)
    return rows


def _cell(row, name, digits):
    return f"{row[name]:.{digits}f} +- {row[name + '_std']:.{digits}f}"


def markdown(rows: list[dict], target: float = 80.0) -> str:
    """The summary table, then the per-round table."""
    head = (
        f"| alpha | strategy | seeds | final accuracy % | best accuracy % | mean of last 2 rounds % | "
        f"first round at {target:g}% (seeds) | MiB up / round | round wall s |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    summary = "".join(
        f"| {r['alpha']:g} | {r['strategy']} | {r['seeds']} | {_cell(r, 'final_accuracy', 1)} | "
        f"{_cell(r, 'best_accuracy', 1)} | {_cell(r, 'last_two_accuracy', 1)} | "
        f"{_cell(r, 'round_at_target', 1)} ({r['seeds_at_target']}) | {_cell(r, 'mib_up_per_round', 0)} | "
        f"{_cell(r, 'round_wall_s', 0)} |\n"
        for r in rows
    )
    rounds = range(rows[0]["rounds"])
    per_round = (
        "\n| alpha | strategy | "
        + " | ".join(f"r{r}" for r in rounds)
        + " |\n|---|---|"
        + "---|" * len(rounds)
        + "\n"
        + "".join(
            f"| {r['alpha']:g} | {r['strategy']} | " + " | ".join(_cell(r, f"round_{k}", 1) for k in rounds) + " |\n"
            for r in rows
        )
    )
    return head + summary + per_round


def plot(summaries: dict[tuple[float, int], dict], path: Path) -> Path:
    """One row of three panels per alpha: mean accuracy (band: +- std over seeds) vs round, vs cumulative MiB
    uploaded, vs cumulative round wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({a for a, _ in summaries})
    fig, axes = plt.subplots(len(alphas), 3, figsize=(15, 4 * len(alphas)), squeeze=False)
    for row, alpha in zip(axes, alphas):
        runs = [s for (a, _), s in sorted(summaries.items()) if a == alpha]
        for strategy in runs[0]["strategies"]:
            per = [run["strategies"][strategy] for run in runs]
            accuracy = 100 * np.array([s["accuracy_per_round"] for s in per])
            mean, std = accuracy.mean(0), accuracy.std(0)
            xs = (
                np.arange(len(mean)),
                np.mean([np.cumsum(s["bytes_up_per_round"]) / MIB for s in per], 0),
                np.mean([np.cumsum(s["round_wall_s"]) for s in per], 0),
            )
            for axis, x in zip(row, xs):
                axis.plot(x, mean, marker="o", label=strategy)
                axis.fill_between(x, mean - std, mean + std, alpha=0.2)
        for axis, label in zip(
            row, ("round (0 = zero-shot)", "MiB uploaded (cumulative)", "round wall time (s, cumulative)")
        ):
            axis.set(xlabel=label, ylabel="held-out accuracy (%)", title=f"alpha {alpha:g}, {len(runs)} seeds")
            axis.grid(alpha=0.3)
            axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    args = _parse(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    summaries = run_grid(args)
    rows = table(summaries, args.target)
    with open(args.workdir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, args.target)
    (args.workdir / "results.md").write_text(text)
    print(text)
    print("plot:", plot(summaries, args.workdir / "experiments.png"))


if __name__ == "__main__":
    main()
