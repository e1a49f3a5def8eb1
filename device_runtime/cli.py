"""``fedmoe-device``: the device runtime's command line (``python -m device_runtime.cli``).

Commands here: ``profile`` (what this device can do) and ``train-local`` (offline training of a bundle on
a local JSONL file, for debugging a bundle or a device without a coordinator); ``enroll`` (once: redeem a
token, store the device key) and ``run`` (serve a coordinator's rounds until SIGTERM), see
``device_runtime.client``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from device_runtime.data import DEFAULT_TEMPLATE
from device_runtime.errors import FedmoeError
from device_runtime.modes import ORT_TRAINING_BACKEND, SPLIT_BACKEND, ZO_BACKEND
from device_runtime.units import MIB

if TYPE_CHECKING:
    from device_runtime.stats import RoutingStats

_BACKEND = click.option(
    "--backend",
    envvar="FEDMOE_DEVICE_BACKEND",
    show_envvar=True,
    type=click.Choice([ORT_TRAINING_BACKEND, ZO_BACKEND, SPLIT_BACKEND]),
    help="Training backend: ort-training (first-order, needs onnxruntime-training), zo "
    "(zeroth-order, any onnxruntime) or split (HO-SFL: the bottom of the model forward-only here, the top on the "
    "coordinator; any onnxruntime; `run` only) [default: the first one installed of the first two].",
)


@click.group()
def main() -> None:
    """fedmoe device runtime: train pruned MoE expert subsets with ONNX Runtime (no torch)."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON instead of a table.")
@click.option(
    "--benchmark-seconds",
    default=0.3,
    show_default=True,
    type=click.FloatRange(min=0.01),
    help="Duration of the float32 matmul benchmark, seconds.",
)
@_BACKEND
def profile(as_json: bool, benchmark_seconds: float, backend: str | None) -> None:
    """Measure this device: memory (MiB), cores, platform, training backends, float32 GFLOP/s."""
    from device_runtime.backends import BACKENDS
    from device_runtime.profile import collect_profile

    try:
        measured = collect_profile(benchmark_seconds=benchmark_seconds, backend=backend)
    except FedmoeError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    if as_json:
        click.echo(json.dumps(measured.to_dict(), indent=2))
        return
    table = Table(title="device profile")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in measured.to_dict().items():
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    backends = Table(title="training backends")
    for column in ("backend", "order", "available", "install"):
        backends.add_column(column)
    for name, entry in BACKENDS.items():
        backends.add_row(name, entry.order, "yes" if name in measured.backends else "no", escape(entry.install))
    Console().print(table, backends)


@main.command("train-local")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--data",
    "data_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSONL file: {"text", "label"} or {"prompt", "completion"} per line.',
)
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps [default: manifest, else one epoch].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per step [default: manifest].")
@click.option("--seq-len", type=click.IntRange(min=2), help="Tokens per sequence [default: manifest].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="AdamW learning rate [default: manifest].")
@click.option(
    "--aux-loss-coef", type=click.FloatRange(min=0), help="Load-balancing loss coefficient [default: manifest]."
)
@click.option("--threads", type=click.IntRange(min=1), help="ORT intra-op threads [default: one per core].")
@click.option(
    "--eval-fraction",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Share of the records held out for evaluation.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the train/eval split and shuffling.")
@click.option(
    "--template",
    default=DEFAULT_TEMPLATE,
    show_default=True,
    help="Prompt template of classification records ({text} is replaced).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the trained weights.safetensors and fit.json here.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of tables.")
@_BACKEND
def train_local(
    bundle: Path,
    data_file: Path,
    steps: int | None,
    batch_size: int | None,
    seq_len: int | None,
    lr: float | None,
    aux_loss_coef: float | None,
    threads: int | None,
    eval_fraction: float,
    seed: int,
    template: str,
    out_dir: Path | None,
    no_progress: bool,
    as_json: bool,
    backend: str | None,
) -> None:
    """Train BUNDLE (a bundle directory) on local data, offline, and report loss, step time, peak RSS
    and per-expert routing importance (HFedMoE, arXiv 2601.00583)."""
    try:
        summary = _train_local(
            bundle,
            data_file,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            lr=lr,
            aux_loss_coef=aux_loss_coef,
            threads=threads,
            eval_fraction=eval_fraction,
            seed=seed,
            template=template,
            out_dir=out_dir,
            progress=not no_progress,
            backend=backend,
        )
    except FedmoeError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


def _train_local(
    bundle_dir: Path,
    data_file: Path,
    *,
    steps: int | None,
    batch_size: int | None,
    seq_len: int | None,
    lr: float | None,
    aux_loss_coef: float | None,
    threads: int | None,
    eval_fraction: float,
    seed: int,
    template: str,
    out_dir: Path | None,
    progress: bool,
    backend: str | None = None,
) -> dict[str, Any]:
    """Verify the bundle, train, evaluate before/after, optionally write weights; return a JSON-able summary."""
    from device_runtime.backends import create_trainer
    from device_runtime.bundle import TOKENIZER_FILE, WEIGHTS_FILE, load_bundle
    from device_runtime.data import LocalDataset

    bundle = load_bundle(bundle_dir)  # verifies every sha256 before anything runs
    defaults = bundle.manifest.training
    batch_size, seq_len = batch_size or defaults.batch_size, seq_len or defaults.seq_len
    dataset = LocalDataset.from_jsonl(
        data_file,
        bundle.path(TOKENIZER_FILE),
        seq_len=seq_len,
        template=template,
        eval_fraction=eval_fraction,
        seed=seed,
    )
    steps = steps or defaults.local_steps or math.ceil(len(dataset.train) / batch_size)
    trainer = create_trainer(bundle, backend=backend, threads=threads, progress=progress, zeroth_order={"seed": seed})
    before = trainer.evaluate(dataset.eval_batches(batch_size)) if dataset.eval else None
    fit = trainer.fit(
        dataset.train_batches(batch_size),
        steps=steps,
        learning_rate=lr or defaults.learning_rate,
        aux_loss_coef=defaults.aux_loss_coef if aux_loss_coef is None else aux_loss_coef,
    )
    after = trainer.evaluate(dataset.eval_batches(batch_size)) if dataset.eval else None
    summary = {
        "bundle": str(bundle_dir),
        "shape_key": bundle.manifest.shape_key.id,
        "backend": trainer.backend,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "num_examples": fit.num_examples,
        "num_tokens": fit.num_tokens,
        "losses": list(fit.losses),
        "step_time_s": fit.step_time_s,
        "peak_rss_mib": fit.peak_rss_bytes / MIB,
        "eval_loss_before": before and before.loss,
        "eval_loss_after": after and after.loss,
        "trained_experts": [list(t) for t in fit.trained_experts],
        "routing": fit.routing.to_dict(),
    }
    if out_dir is not None:
        from safetensors.numpy import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(trainer.get_parameters(), str(out_dir / WEIGHTS_FILE))
        (out_dir / "fit.json").write_text(json.dumps(summary, indent=2))
        summary["out"] = str(out_dir)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    from device_runtime.stats import RoutingStats

    console = Console()
    losses = summary["losses"]
    curve = Table(
        title="loss curve",
        caption=f"{summary['steps']} steps, batch {summary['batch_size']} x {summary['seq_len']} tokens",
    )
    curve.add_column("step", justify="right")
    curve.add_column("loss", justify="right")
    stride = max(1, len(losses) // 20)
    for step in sorted({*range(0, len(losses), stride), len(losses) - 1}):
        curve.add_row(str(step + 1), f"{losses[step]:.4f}")
    console.print(curve)
    console.print(
        f"step time {summary['step_time_s'] * 1000:.1f} ms (mean), peak RSS "
        f"{summary['peak_rss_mib']:.0f} MiB, {summary['num_tokens']} tokens"
    )
    if summary["eval_loss_before"] is not None:
        console.print(f"eval loss {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}")
    routing = RoutingStats.from_dict(summary["routing"])
    console.print(_importance_table(routing))
    if "out" in summary:
        console.print(f"weights written to {summary['out']}")


def _importance_table(routing: RoutingStats) -> Table:
    """Per MoE layer and kept expert: usage s_cum, s_spec, KL_e, I_b (HFedMoE's default lambda and beta,
    ``stats.IMPORTANCE_LAMBDA`` / ``IMPORTANCE_BETA``), tokens routed."""
    table = Table(title="routing importance (HFedMoE)")
    for column in ("layer", "expert", "usage", "s_spec", "KL", "I_b", "tokens"):
        table.add_column(column, justify="right")
    for l, layer in enumerate(routing.layers):
        ids = routing.expert_ids[l] if routing.expert_ids else range(len(layer.usage))
        score = layer.information_score()
        for i, expert in enumerate(ids):
            table.add_row(
                str(l),
                str(expert),
                f"{layer.usage[i]:.3f}",
                f"{layer.specific[i]:.3f}",
                f"{layer.kl[i]:.4f}",
                f"{score[i]:.3f}",
                str(layer.tokens_routed[i]),
            )
    return table


# ---------------------------------------------------------------- coordinator connection (device_runtime.client)


def _home_path(name: str) -> Path:
    from device_runtime.client import default_home

    return default_home() / name


def _logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


_CAFILE = click.option(
    "--cafile",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificate (PEM) that signed the coordinator's TLS certificate (wss:// only) "
    "[default: the CA pinned at enrollment by the token's fingerprint, else the system CAs].",
)
_CREDENTIALS = click.option(
    "--credentials",
    "credentials_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Credentials file (JSON, mode 0600) [default: $FEDMOE_DEVICE_HOME/credentials.json, "
    "$FEDMOE_DEVICE_HOME defaults to ~/.fedmoe-device].",
)
_MEMORY = click.option(
    "--memory-mib",
    type=click.IntRange(min=1),
    help="Memory budget reported to the coordinator, MiB (it sizes the expert subset) [default: memory available now].",
)


@main.command("enroll")
@click.argument("url")
@click.option(
    "--token",
    required=True,
    envvar="FEDMOE_ENROLL_TOKEN",
    show_envvar=True,
    help="Single-use enrollment token from `fedmoe-coord enroll` (keep it out of shell history: "
    "use the environment variable).",
)
@click.option("--name", required=True, help="Device name, e.g. pi4-kitchen ([A-Za-z0-9][A-Za-z0-9_.-]*).")
@_CAFILE
@_CREDENTIALS
@_MEMORY
@_BACKEND
def enroll_command(
    url: str,
    token: str,
    name: str,
    cafile: Path | None,
    credentials_path: Path | None,
    memory_mib: int | None,
    backend: str | None,
) -> None:
    """Enroll this device at the coordinator URL (ws://host:port or wss://host:port), once.

    Generates an Ed25519 key pair (the private key never leaves the device), redeems the token and writes
    the device id and key to the credentials file with mode 0600.
    """
    import asyncio

    from device_runtime.client import device_profile, enroll

    _logging(False)
    path = credentials_path or _home_path("credentials.json")
    try:
        creds = asyncio.run(
            enroll(
                url,
                token,
                name,
                credentials_path=path,
                cafile=cafile,
                profile=device_profile(memory_mib, backend=backend),
            )
        )
    except (FedmoeError, OSError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    click.echo(f"enrolled as {creds.device_id}; credentials written to {path}")


main.add_command(
    click.Command(
        "enroll", callback=enroll_command.callback, params=enroll_command.params, help=enroll_command.help, hidden=True
    )
)


@main.command("run")
@click.argument("url")
@click.option(
    "--data",
    "data_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='Local training data, JSONL: {"text", "label"} or {"prompt", "completion"} per line.',
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="State directory: cached bundles and not yet acknowledged updates [default: $FEDMOE_DEVICE_HOME/state].",
)
@click.option("--threads", type=click.IntRange(min=1), help="ORT intra-op threads [default: one per core].")
@_CAFILE
@_CREDENTIALS
@_MEMORY
@click.option(
    "--max-message-mib",
    default=256.0,
    show_default=True,
    type=click.FloatRange(0, 4096, min_open=True),
    help="Largest websocket message accepted, MiB (match the coordinator's max_message_mib).",
)
@click.option(
    "--cache-mib",
    default=4096.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Bound on the bundle cache, MiB (least recently used bundles are evicted).",
)
@click.option(
    "--template",
    default=DEFAULT_TEMPLATE,
    show_default=True,
    help="Prompt template of classification records ({text} is replaced).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Accept a plain ws:// URL although this device enrolled at a TLS coordinator (one that serves "
    "--insecure); bundles and assignments are still verified against the key pinned at enrollment.",
)
@click.option(
    "--fresh-trainer",
    is_flag=True,
    help="Build the training session again every round (fresh AdamW moments) instead of keeping it while "
    "the bundle stays the same; costs 3-4 s a round on the default bundles.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@_BACKEND
def run_command(
    url: str,
    data_file: Path,
    cache_dir: Path | None,
    threads: int | None,
    cafile: Path | None,
    credentials_path: Path | None,
    memory_mib: int | None,
    max_message_mib: float,
    cache_mib: float,
    template: str,
    insecure: bool,
    fresh_trainer: bool,
    verbose: bool,
    backend: str | None,
) -> None:
    """Serve the coordinator at URL: authenticate, train each assignment on local data, upload updates.

    Reconnects with exponential backoff after a lost connection and re-sends any update not yet
    acknowledged (also after a restart). SIGTERM / Ctrl-C abandon training after the current step and
    keep cached bundles and pending updates for the next start.
    """
    from device_runtime.auth import load_credentials
    from device_runtime.client import DeviceClient, run_until_signal
    from device_runtime.memory import limit_heap_growth

    _logging(verbose)
    limit_heap_growth()  # rounds free 100s of MiB each: keep the data segment from creeping up
    try:
        creds = load_credentials(credentials_path or _home_path("credentials.json"))
        client = DeviceClient(
            url,
            creds,
            data_file,
            cache_dir=cache_dir or _home_path("state"),
            cafile=cafile,
            max_message_mib=max_message_mib,
            threads=threads,
            memory_mib=memory_mib,
            cache_mib=cache_mib,
            template=template,
            backend=backend,
            insecure=insecure,
            reuse_trainer=not fresh_trainer,
        )
        run_until_signal(client)
    except FedmoeError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


if __name__ == "__main__":
    main()
