"""fedmoe against plain Flower FedAvg on the same model, device files and test set, scored by the same Evaluator.

    python bench/bench_vs_flower.py --preset smoke                 # runs `fedmoe-coord simulate` first
    python bench/bench_vs_flower.py --fedmoe-run runs/<name>        # reuses a finished simulation's files

Flower side: flwr's deployment engine on loopback (``flower-superlink``, one ``flower-supernode`` per fedmoe
device with that device's JSONL file, ``flwr run`` of ``bench/flower_app``), flwr's own ``FedAvg``. The Flower
clients train in torch what a Flower user would train (``--model dense``: SmolLM2's first layers with every FFN
trainable; ``--model moe``: the same upcycled MoE with all experts and routers) with the fedmoe devices' batches,
local steps, learning rate and seeds; the server scores each global model with ``coordinator.evaluation.Evaluator``
on the simulation's ``test.jsonl``. Bytes are payload bytes (tensor data) summed over the clients of a round;
round wall time is the server's from sending the round's fit messages to aggregating the replies; peak RSS is
each process's ``VmHWM`` (the Flower ClientApp processes of a SuperNode, sampled every 0.5 s).

Needs Flower in the running Python (``pip install -e ".[peer]"``; a separate venv with
``--system-site-packages`` keeps its pins away from the shared environment). Prints one table and writes
``flower.jsonl`` and ``comparison.json`` to ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.simulation.processes import MIB, Child, _spawn, free_port  # noqa: E402
from device_runtime.memory import status_kib  # noqa: E402

APP = ROOT / "bench" / "flower_app"
OFFLINE = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fedmoe-run", type=Path, help="a finished `fedmoe-coord simulate` output directory")
    parser.add_argument("--preset", default="default", help="without --fedmoe-run: the simulation preset to run")
    parser.add_argument("--simulate-args", default="", help="without --fedmoe-run: more `simulate` options")
    parser.add_argument("--strategy", default=None, help="the fedmoe strategy to compare (default: the run's first)")
    parser.add_argument("--model", choices=["dense", "moe"], default="dense", help="what the Flower clients train")
    parser.add_argument(
        "--flower-learning-rate",
        type=float,
        default=5e-4,
        help="the Flower clients' AdamW rate: full-weight fine-tuning's (5e-4, issue 11's measured "
        "table), not fedmoe's LoRA rate; 0 = the fedmoe run's rate",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedmoe-vs-flower"))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the Flower run may take")
    return parser.parse_args(argv)


def _fedmoe_run(args) -> Path:
    if args.fedmoe_run:
        return args.fedmoe_run.resolve()
    out = (args.workdir / "fedmoe").resolve()
    command = [
        sys.executable,
        "-m",
        "coordinator.cli",
        "simulate",
        "--preset",
        args.preset,
        "--out",
        str(out),
        *args.simulate_args.split(),
    ]
    print("running", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def _flwr_bin(name: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise SystemExit(f'{name} not found: install Flower into this Python (`pip install -e ".[peer]"`)')
    return found


def _run_config(plan: dict, checkpoint: Path, run: Path, model: str, results: Path, learning_rate: float) -> dict:
    preset = plan["preset"]
    return {
        "model": model,
        "moe-checkpoint": str(checkpoint),
        "num-layers": preset["num_layers"],
        "rounds": preset["rounds"],
        "local-steps": preset["local_steps"],
        "batch-size": preset["batch_size"],
        "seq-len": preset["seq_len"],
        "learning-rate": learning_rate or preset["learning_rate"],
        "seed": plan["seed"],
        "num-clients": len(plan["devices"]),
        "test-file": str(run / "data" / "test.jsonl"),
        "results-file": str(results),
        "threads": 1,
    }


class Peaks:
    """Peak RSS (MiB) of every descendant process of some parents, by the parent's name."""

    def __init__(self, parents: dict[str, int]):
        self.parents = parents
        self.peak: dict[str, float] = {}

    def sample(self) -> None:
        for name, pid in self.parents.items():
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                hwm = status_kib("VmHWM", child.pid)
                if hwm is not None:
                    self.peak[name] = max(self.peak.get(name, 0.0), hwm / 1024)


def run_flower(
    plan: dict, run: Path, model: str, workdir: Path, timeout: float, learning_rate: float = 0.0
) -> tuple[list[dict], dict]:
    """Run the Flower peer; returns its per-round rows (round 0 = initial model) and peak RSS per process."""
    from coordinator.simulation.simulate import Preset, ensure_checkpoint

    checkpoint = ensure_checkpoint(Preset(**plan["preset"]))
    home = workdir / "flwr-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    results = workdir / "flower.jsonl"
    results.unlink(missing_ok=True)
    overrides = workdir / "run-config.toml"
    overrides.write_text(
        "".join(
            f"{k} = {json.dumps(v)}\n"
            for k, v in _run_config(plan, checkpoint, run, model, results, learning_rate).items()
        )
    )
    env = {
        **OFFLINE,
        "FLWR_HOME": str(home),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PATH": f"{Path(_flwr_bin('flwr')).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # flwr spawns its tools
    children: list[Child] = [
        _spawn(
            "superlink",
            [_flwr_bin("flower-superlink"), "--insecure", "--port", str(port)],
            workdir / "superlink.log",
            env,
        )
    ]
    try:
        _wait_listening(port, children[0])
        for device in plan["devices"]:
            data = run / "data" / f"{device['name']}.jsonl"
            children.append(
                _spawn(
                    device["name"],
                    [
                        _flwr_bin("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f'data-file="{data}"',
                    ],
                    workdir / f"supernode-{device['name']}.log",
                    env,
                )
            )
        peaks = Peaks({"server" if c.name == "superlink" else c.name: c.process.pid for c in children})
        runner = _spawn(
            "flwr-run",
            [_flwr_bin("flwr"), "run", str(APP), "bench", "--run-config", str(overrides), "--stream"],
            workdir / "flwr-run.log",
            env,
        )
        deadline = time.monotonic() + timeout
        while runner.poll() is None and _rows(results, plan) is None:
            if time.monotonic() > deadline or any(c.poll() is not None for c in children):
                raise SystemExit(f"the Flower run failed; see {workdir}/*.log:\n{runner.tail(20)}")
            peaks.sample()
            time.sleep(0.5)
        runner.stop()
        rows = _rows(results, plan)
        if rows is None:
            raise SystemExit(f"the Flower run ended early; see {workdir}/flwr-run.log:\n{runner.tail(20)}")
        return rows, peaks.peak
    finally:
        for child in reversed(children):
            child.stop()


def _wait_listening(port: int, child: Child, timeout: float = 120.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port`` (the SuperLink's HTTP API)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(2)  # the port opens before the app's startup has finished
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the SuperLink did not listen on {port}:\n{child.tail(20)}")


def _rows(results: Path, plan: dict) -> list[dict] | None:
    """The results file's rows once every round (and round 0) is in it."""
    if not results.is_file():
        return None
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return rows if len(rows) > plan["preset"]["rounds"] else None


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def comparison_table(fedmoe: dict, flower: list[dict], peaks_fedmoe: dict, peaks_flower: dict, title: str):
    """A rich table: per round fedmoe vs Flower accuracy, MiB up / down, wall seconds, and their ratios."""
    from rich.table import Table

    table = Table(title=title)
    for column in (
        "round",
        "acc fedmoe",
        "acc Flower",
        "MiB up fedmoe",
        "MiB up Flower",
        "up ratio",
        "MiB down fedmoe",
        "MiB down Flower",
        "down ratio",
        "wall s fedmoe",
        "wall s Flower",
        "wall ratio",
    ):
        table.add_column(column, justify="right")
    for i, row in enumerate(flower):
        up, down, wall = (fedmoe[k][i] for k in ("bytes_up_per_round", "bytes_down_per_round", "round_wall_s"))
        table.add_row(
            str(row["round"]),
            f"{100 * fedmoe['accuracy_per_round'][i]:.1f}%",
            f"{100 * row['accuracy']:.1f}%",
            f"{up / MIB:.0f}",
            f"{row.get('bytes_up', 0) / MIB:.0f}",
            _ratio(up, row.get("bytes_up")),
            f"{down / MIB:.0f}",
            f"{row.get('bytes_down', 0) / MIB:.0f}",
            _ratio(down, row.get("bytes_down")),
            f"{wall:.0f}",
            f"{row.get('wall_s', 0):.0f}",
            _ratio(wall, row.get("wall_s")),
        )
    memory = Table("process", "peak RSS MiB fedmoe", "peak RSS MiB Flower", title="peak RSS per client")
    for name in dict.fromkeys([*peaks_fedmoe, *peaks_flower]):
        memory.add_row(name, *(f"{p[name]:.0f}" if name in p else "-" for p in (peaks_fedmoe, peaks_flower)))
    return table, memory


def main(argv=None) -> None:
    from rich.console import Console

    args = _parse(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = _fedmoe_run(args)
    plan = json.loads((run / "plan.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    strategy = args.strategy or plan["strategies"][0]
    flower, peaks = run_flower(plan, run, args.model, args.workdir.resolve(), args.timeout, args.flower_learning_rate)
    fedmoe = summary["strategies"][strategy]
    title = f"fedmoe {strategy} vs Flower FedAvg ({args.model}) on {run.name}; ratios are fedmoe / Flower"
    console = Console(width=200)
    for table in comparison_table(fedmoe, flower, fedmoe["peak_rss_mib"], peaks, title):
        console.print(table)
    (args.workdir / "comparison.json").write_text(
        json.dumps(
            {
                "fedmoe_run": str(run),
                "strategy": strategy,
                "flower_model": args.model,
                "fedmoe": fedmoe,
                "flower": flower,
                "flower_peak_rss_mib": peaks,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
