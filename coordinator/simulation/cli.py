"""The ``simulate`` command of ``fedmoe-coord`` (a live rich view while it runs, a table at the end)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from coordinator.privacy import PrivacyConfig, noise_for_epsilon
from coordinator.simulation.centralized import NAME as CENTRALIZED
from coordinator.simulation.profiles import load_profiles
from coordinator.simulation.ray_pool import RayOptions, disconnect
from coordinator.simulation.reference import PREFIX as REFERENCE_PREFIX
from coordinator.simulation.report import RoundRecord
from coordinator.simulation.simulate import LEARNING_RATES, PRESETS, SimulationPlan, simulate, with_overrides
from coordinator.strategy import STRATEGIES
from device_runtime.errors import ConfigError
from device_runtime.modes import TrainableMode
from device_runtime.units import MIB


def _strategies(strategy: str, compare: str | None) -> tuple[str, ...]:
    names = tuple(s.strip() for s in (compare or strategy).split(",") if s.strip())
    unknown = [n for n in names if n.removeprefix(REFERENCE_PREFIX) not in STRATEGIES and n != CENTRALIZED]
    if not names or unknown:
        raise ConfigError(
            f"unknown strategy {unknown or names}; choose from "
            f"{', '.join(sorted([*STRATEGIES, CENTRALIZED]))}, or torch-<strategy>"
        )
    return names


def _with_trainable(preset, trainable: str | None, lora_rank: int | None, learning_rate: float | None):
    """The preset with ``--trainable`` / ``--lora-rank`` applied; switching the mode without ``--learning-rate``
    takes that mode's rate (``LEARNING_RATES``).

    Raises:
        ConfigError: ``--lora-rank`` without LoRA.
    """
    mode = trainable or preset.trainable_mode
    if mode != TrainableMode.LORA and lora_rank:
        raise ConfigError("--lora-rank needs --trainable lora")
    rate = preset.learning_rate if mode == preset.trainable_mode or learning_rate else LEARNING_RATES[mode]
    return replace(
        preset,
        trainable_mode=mode,
        lora_rank=(lora_rank or preset.lora_rank or 8) if mode == TrainableMode.LORA else 0,
        learning_rate=rate,
    )


def simulation_privacy(epsilon: float | None, clip: float, secure: bool, rounds: int) -> PrivacyConfig:
    """The ``[privacy]`` table of ``simulate``'s flags: with ``epsilon`` the noise multiplier whose ``rounds``
    rounds at q = 1 spend it (``privacy.noise_for_epsilon``), clip S and that epsilon as the budget.

    Raises:
        ConfigError: the epsilon is out of reach.
    """
    if epsilon is None:
        return PrivacyConfig(secure_aggregation=secure)
    delta = PrivacyConfig().delta
    z = noise_for_epsilon(epsilon, rounds, 1.0, delta)
    return PrivacyConfig(noise_multiplier=z, clip=clip, delta=delta, epsilon_budget=epsilon, secure_aggregation=secure)


def _round_table(records: list[RoundRecord]) -> Table:
    table = Table(
        title="rounds (round 0 = zero-shot)",
        caption="accuracy, loss: the coordinator's score of the round's new model on the test set (label "
        "log-likelihood); fed loss: the devices' loss (nats per token) of the model the round started from on their "
        "own held-out records, before training (federated evaluation)",
    )
    for column in (
        "strategy",
        "round",
        "accuracy",
        "loss",
        "fed loss",
        "wall s",
        "MiB up",
        "MiB down",
        "device losses",
        "peak RSS MiB",
    ):
        table.add_column(column, justify="right")
    for r in records:
        losses = " ".join(f"{d.loss:.2f}" for d in r.devices if d.loss is not None)
        rss = " ".join(f"{d.peak_rss_mib:.0f}" for d in r.devices if d.peak_rss_mib is not None)
        table.add_row(
            r.strategy,
            str(r.round),
            f"{100 * r.accuracy:.1f}%",
            f"{r.loss:.3f}",
            _fed(r),
            f"{r.wall_s:.0f}",
            f"{r.bytes_up / MIB:.1f}",
            f"{r.bytes_down / MIB:.1f}",
            losses,
            rss,
        )
    return table


def _fed(r: RoundRecord) -> str:
    """The round's federated evaluation: loss (and accuracy where devices computed one), "-" when none."""
    if r.fed_loss is None:
        return "-"
    return f"{r.fed_loss:.3f}" + ("" if r.fed_accuracy is None else f" ({100 * r.fed_accuracy:.1f}%)")


@click.command()
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="default",
    show_default=True,
    help="default: SmolLM2 upcycled (8 layers, 4 experts, top-2), 5 devices, 5 rounds; smoke: 2 layers, "
    "2 devices, 2 rounds (about a minute).",
)
@click.option(
    "--strategy", default="hfedmoe", show_default=True, help=f"Aggregation strategy: {', '.join(sorted(STRATEGIES))}."
)
@click.option(
    "--compare",
    default=None,
    help="Several strategies on the same split and seed, e.g. "
    "centralized,hfedmoe,torch-hfedmoe (centralized: the same model and steps on the union of the data; "
    "torch-<strategy>: that strategy's rounds in torch, the reference of the system; both in this process).",
)
@click.option(
    "--devices",
    "devices_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="TOML device profiles ([[device]] kind, memory_mib, gflops, count).  [default: 2 Pis of 1.5 GiB, "
    "2 phones of 3 GiB, 1 laptop of 8 GiB]",
)
@click.option("--num-devices", type=int, default=None, help="Cycle or cut the profiles to this many devices.")
@click.option("--rounds", type=int, default=None, help="Rounds per strategy.  [default: from the preset]")
@click.option("--local-steps", type=int, default=None, help="Local training steps per round.")
@click.option("--num-layers", type=int, default=None, help="Decoder layers of SmolLM2 to keep.")
@click.option("--learning-rate", type=float, default=None, help="Local AdamW learning rate.")
@click.option(
    "--zo-learning-rate",
    type=click.FloatRange(min=0.0),
    default=None,
    help="SGD step size of zeroth-order (zo) devices (MeZO); 0: the AdamW rate, which diverges.  [default: 1e-5]",
)
@click.option("--seq-len", type=int, default=None, help="Tokens per training example (prompt + label).")
@click.option("--test-size", type=int, default=None, help="Held-out records the global model is scored on.")
@click.option("--alpha", default=1.0, show_default=True, help="Dirichlet concentration of the non-IID split.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split, the router and the selection.")
@click.option(
    "--data",
    "data_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A JSONL data set instead of BBC News.",
)
@click.option("--text-field", default="text", show_default=True, help="Text field of --data records.")
@click.option("--label-field", default="label", show_default=True, help="Label field of --data records.")
@click.option(
    "--trainable",
    type=click.Choice(["experts", "lora"]),
    default=None,
    help="What devices train: LoRA adapters on every kept expert + routers, or the full experts + routers. "
    " [default: from the preset: experts]",
)
@click.option("--lora-rank", type=int, default=None, help="LoRA rank r (with --trainable lora).  [default: 8]")
@click.option(
    "--logit-adjustment",
    type=float,
    default=None,
    help="tau of the balanced softmax each device trains with: the logits of the labels' first answer token "
    "shifted by tau * log(its own label prior), in training only (0: off).  [default: from the preset: 1]",
)
@click.option(
    "--frozen-experts",
    type=click.Choice(["float16", "pruned"]),
    default=None,
    help="What a device holds of the experts its budget does not let it train: every one, frozen in "
    "float16, so its forward pass routes over the whole global model (HFedMoE's design, where the "
    "budget affords it), or none (pruned: router and top-k shrink to its experts).  "
    "[default: from the preset: float16]",
)
@click.option(
    "--eval-fraction",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=None,
    help="Share of each device's records it holds out and scores the received model on before training "
    "(federated evaluation; the same records every round, never trained on; 0: off, every record trains).  "
    "[default: 0.1]",
)
@click.option(
    "--reference-scores",
    type=click.Choice(["held", "all"]),
    default="held",
    show_default=True,
    help="torch-<strategy> only: the routing statistics a device's expert selection uses: its last update's, "
    "over the experts it held (as the system), or over every expert under the current global model on "
    "the batches it is about to train on (HFedMoE's data-driven selection; a lever to measure).",
)
@click.option(
    "--update-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="The dtype devices send their updates in (float16 halves the upload).",
)
@click.option(
    "--dp-epsilon",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Client-level DP (with --strategy dp-fedavg): the epsilon budget of the whole run at delta 1e-5; the noise "
    "multiplier is the smallest that spends at most this over --rounds rounds (every device every round: q = 1).",
)
@click.option(
    "--dp-clip",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    show_default=True,
    help="With --dp-epsilon: S, the L2 clip of a device's update delta (every row it sends).",
)
@click.option(
    "--secure-aggregation",
    is_flag=True,
    help="Secure aggregation of the sparse rows ([privacy] secure_aggregation): the coordinator sees only each "
    "row's sum over its holders (fedavg, fedmoe, dense-fedavg, dp-fedavg).",
)
@click.option("--slots", default=2, show_default=True, help="Devices training at the same time (machine cores).")
@click.option(
    "--ray-address",
    default=None,
    help="Run the device processes on this Ray cluster (HOST:PORT of its head, or auto) instead of this machine: "
    "one Ray actor per device starts the same fedmoe-device process on its node (--slots then counts per node); "
    "the coordinator stays here.  Needs fedmoe[ray].",
)
@click.option(
    "--ray-cpus-per-device",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="With --ray-address: Ray CPUs each device reserves on its node.",
)
@click.option(
    "--coordinator-host",
    default="127.0.0.1",
    show_default=True,
    help="With --ray-address: the address the Ray nodes reach this machine at (not loopback: the coordinator "
    "listens on every interface and the address goes into its certificate).",
)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output directory.  [default: runs/<name>]")
@click.option("--name", default=None, help="Run name.  [default: <preset>-<strategies>-<time>]")
def simulate_command(
    preset,
    strategy,
    compare,
    devices_file,
    num_devices,
    rounds,
    local_steps,
    num_layers,
    learning_rate,
    zo_learning_rate,
    seq_len,
    test_size,
    alpha,
    seed,
    data_file,
    text_field,
    label_field,
    trainable,
    lora_rank,
    logit_adjustment,
    frozen_experts,
    eval_fraction,
    reference_scores,
    update_dtype,
    dp_epsilon,
    dp_clip,
    secure_aggregation,
    slots,
    ray_address,
    ray_cpus_per_device,
    coordinator_host,
    out,
    name,
):
    """Simulate a federation on this machine: a coordinator and N device runtimes as separate processes
    over real websockets on loopback, on real data, each device under an OS memory limit equal to its budget.

    Prints zero-shot and final accuracy, bytes moved, and where the metrics (CSV, JSON), the plot, the
    registries and the final global states are.
    """
    chosen = with_overrides(
        PRESETS[preset],
        rounds=rounds,
        local_steps=local_steps,
        num_layers=num_layers,
        learning_rate=learning_rate,
        zo_learning_rate=zo_learning_rate,
        seq_len=seq_len,
        test_size=test_size,
        logit_adjustment=logit_adjustment,
        frozen_experts=frozen_experts,
        eval_fraction=eval_fraction,
    )
    chosen = _with_trainable(chosen, trainable, lora_rank, learning_rate)
    strategies = _strategies(strategy, compare)
    name = name or f"{preset}-{'-'.join(strategies)}-{time.strftime('%Y%m%d-%H%M%S')}"
    devices = load_profiles(devices_file, num_devices=num_devices or chosen.num_devices)
    plan = SimulationPlan(
        name=name,
        out=Path(out or Path("runs") / name).resolve(),
        strategies=strategies,
        preset=chosen,
        devices=tuple(devices),
        alpha=alpha,
        seed=seed,
        data_file=None if data_file is None else Path(data_file),
        text_field=text_field,
        label_field=label_field,
        slots=slots,
        update_dtype=update_dtype,
        reference_scores=reference_scores,
        privacy=simulation_privacy(dp_epsilon, dp_clip, secure_aggregation, chosen.rounds),
        ray=RayOptions(ray_address, ray_cpus_per_device, coordinator_host) if ray_address else None,
    )
    console = Console()
    try:
        summary = _run_live(plan, console) if console.is_terminal else simulate(plan, _printer(console))
    finally:
        disconnect()  # leave the Ray cluster if this run joined one (the cluster keeps running)
    _final(console, summary)


def _run_live(plan: SimulationPlan, console: Console) -> dict:
    """Run with a live view: a spinner on the current stage above the growing round table."""
    records: list[RoundRecord] = []
    status = Spinner("dots", text="starting")
    with Live(Group(status, _round_table(records)), console=console, refresh_per_second=4) as live:

        def on_event(kind: str, payload) -> None:
            if kind == "stage":
                status.update(text=str(payload))
            else:
                records.append(payload)
            live.update(Group(status, _round_table(records)))

        summary = simulate(plan, on_event)
        status.update(text="done")
    return summary


def _printer(console: Console):
    """Progress as plain lines, for logs and CI (no terminal to redraw a live view in)."""

    def on_event(kind: str, payload) -> None:
        if kind == "stage":
            console.print(f"[{time.strftime('%H:%M:%S')}] {payload}")
        else:
            r = payload
            console.print(
                f"[{time.strftime('%H:%M:%S')}] {r.strategy} round {r.round}: accuracy "
                f"{100 * r.accuracy:.1f}%, loss {r.loss:.3f}, fed loss {_fed(r)}, {r.wall_s:.0f} s, "
                f"{r.bytes_up / MIB:.1f} MiB up, {r.bytes_down / MIB:.1f} MiB down"
            )

    return on_event


def _final(console: Console, summary: dict) -> None:
    table = Table(title=f"{summary['name']}: held-out accuracy")
    for column in ("strategy", "zero-shot", "final", "MiB uploaded", "MiB downloaded"):
        table.add_column(column, justify="right")
    for strategy, s in summary["strategies"].items():
        table.add_row(
            strategy,
            f"{100 * s['zero_shot_accuracy']:.1f}%",
            f"{100 * s['final_accuracy']:.1f}%",
            f"{sum(s['bytes_up_per_round']) / MIB:.1f}",
            f"{sum(s['bytes_down_per_round']) / MIB:.1f}",
        )
    console.print(table)
    console.print(_memory_table(summary))
    if any(s.get("device_nodes") for s in summary["strategies"].values()):
        console.print(_nodes_table(summary))
    console.print(_devices_table(summary))
    if any(r.get("backend") for s in summary["strategies"].values() for r in _device_rows(s)):
        console.print(_backends_table(summary))
    console.print(
        f"plot: {summary['plot']}\nmetrics: {summary['out']}/metrics.csv, metrics.json, summary.json; "
        f"final models (Hugging Face checkpoints) in {summary['out']}/<strategy>/model, "
        f"registries in {summary['out']}/<strategy>/state"
    )


def _devices_table(summary: dict) -> Table:
    """Per strategy, round and device: the experts it trained (global ids per MoE layer), what it held frozen
    besides, and its peak RSS against its budget (MiB)."""
    table = Table(
        "strategy",
        "round",
        "device",
        "experts trained (ids per layer)",
        "held frozen",
        "peak RSS / budget MiB",
        title="devices by round",
    )
    for strategy, s in summary["strategies"].items():
        for record in s.get("devices_per_round", []):
            for d in record["devices"]:
                rss = "-" if d["peak_rss_mib"] is None else f"{d['peak_rss_mib']:.0f}"
                table.add_row(
                    strategy,
                    str(record["round"]),
                    d["device"],
                    d["experts"],
                    d.get("frozen", "-"),
                    f"{rss} / {summary['budgets_mib'].get(d['device'], '-')}",
                )
    return table


def _device_rows(strategy: dict) -> list[dict]:
    return [d for record in strategy.get("devices_per_round", []) for d in record["devices"]]


def _backends_table(summary: dict) -> Table:
    """Per strategy and training backend, means over its devices and rounds: MiB up and down per round, training
    seconds and training loss (a split device's is the coordinator's top loss on its batches)."""
    table = Table(
        "strategy", "backend", "device-rounds", "MiB up", "MiB down", "train s", "train loss", title="by backend"
    )
    for strategy, s in summary["strategies"].items():
        groups: dict[str, list[dict]] = {}
        for d in _device_rows(s):
            groups.setdefault(d.get("backend") or "-", []).append(d)
        for backend, rows in sorted(groups.items()):
            table.add_row(
                strategy,
                backend,
                str(len(rows)),
                f"{sum(d['bytes_up'] for d in rows) / len(rows) / MIB:.1f}",
                f"{sum(d['bytes_down'] for d in rows) / len(rows) / MIB:.1f}",
                _mean([d.get("train_s") for d in rows], "{:.1f}"),
                _mean([d.get("loss") for d in rows], "{:.3f}"),
            )
    return table


def _mean(values: list, fmt: str) -> str:
    known = [float(v) for v in values if v is not None]
    return fmt.format(sum(known) / len(known)) if known else "-"


def _nodes_table(summary: dict) -> Table:
    """Per strategy and device: the Ray node (id, host name) its process ran on (``--ray-address``)."""
    table = Table("strategy", "device", "Ray node", "host", title="device placement (Ray)")
    for strategy, s in summary["strategies"].items():
        for device, node in s.get("device_nodes", {}).items():
            table.add_row(strategy, device, node["node_id"][:16], node["host"])
    return table


def _memory_table(summary: dict) -> Table:
    """Each device's budget and, per strategy, its measured peak RSS (MiB)."""
    strategies = [s for s, v in summary["strategies"].items() if v["peak_rss_mib"]]  # centralized has no devices
    table = Table("device", "budget MiB", *(f"peak RSS MiB ({s})" for s in strategies), title="device memory")
    for device, budget in summary["budgets_mib"].items():
        peaks = [summary["strategies"][s]["peak_rss_mib"].get(device) for s in strategies]
        table.add_row(device, str(budget), *("sat out" if p is None else f"{p:.0f}" for p in peaks))
    return table
