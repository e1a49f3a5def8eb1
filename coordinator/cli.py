"""``fedmoe-coord``: initialise, serve and inspect a federation.

\b
Typical flow:
  fedmoe-coord --config coord.toml init moe/ --strategy hfedmoe --min-fit-clients 2
  fedmoe-coord --config coord.toml enroll --name pi-1 --expires 1h     # prints a one-time token
  fedmoe-coord --config coord.toml serve
  fedmoe-coord --config coord.toml rounds
  fedmoe-coord --config coord.toml model export merged/
  fedmoe-coord --config coord.toml model export --format pte phone-model/   # ExecuTorch .pte + tokenizer
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coordinator.config import FROZEN_EXPERTS, CoordinatorConfig, load_config, save_config
from coordinator.registry import Registry
from coordinator.rounds import RoundPolicy
from device_runtime.cli_errors import run_cli
from device_runtime.errors import ConfigError
from device_runtime.modes import TrainableMode

console = Console(stderr=True)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"2d"`` or plain seconds -> seconds. Raises ConfigError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"bad duration {text!r}; use e.g. 90s, 15m, 1h or 2d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _config(ctx: click.Context) -> CoordinatorConfig:
    return load_config(ctx.obj["config"])


def _registry(ctx: click.Context) -> Registry:
    return Registry(_config(ctx).registry_url)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "config_path",
    default="fedmoe-coord.toml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The coordinator's TOML config file.",
)
@click.pass_context
def main(ctx, config_path):
    """Run the federated fine-tuning coordinator (websocket server, registry, rounds)."""
    ctx.obj = {"config": Path(config_path)}


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True))
@click.option("--state-dir", default="state", show_default=True, help="Coordinator state directory.")
@click.option("--strategy", default="hfedmoe", show_default=True, help="Aggregation strategy.")
@click.option("--min-fit-clients", default=2, show_default=True)
@click.option("--max-fit-clients", default=10, show_default=True)
@click.option("--num-rounds", default=0, show_default=True, help="Rounds to run (0: unbounded).")
@click.option("--round-deadline", default="10m", show_default=True, help="How long a round waits for updates.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True)
@click.option(
    "--tls-name",
    "tls_names",
    multiple=True,
    help="A host name or address devices use to reach the coordinator, put in its TLS certificate "
    "(repeatable; this machine's name, localhost and --host are always in it).",
)
@click.option("--trainable", type=click.Choice(["experts", "lora"]), default="experts", show_default=True)
@click.option("--lora-rank", default=8, show_default=True, help="LoRA rank (with --trainable lora).")
@click.option(
    "--frozen-experts",
    type=click.Choice(list(FROZEN_EXPERTS)),
    default="float16",
    show_default=True,
    help="What a device holds of the experts its budget does not let it train: every one, frozen in "
    "float16 (its forward routes over the whole model; merged into one stand-in on smaller budgets), "
    "or none (pruned).",
)
@click.option(
    "--calibration-texts",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="JSONL file with a 'text' per line for the calibration pass. [default: 20 BBC News articles]",
)
@click.option(
    "--eval-data",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Held-out JSONL ('text', 'label'): every new global version is scored on it (label "
    "log-likelihood accuracy, shown by `rounds`).",
)
@click.option(
    "--dp-noise-multiplier",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Client-level DP (needs --strategy dp-fedavg): the [privacy] noise multiplier z. [default: 0, off]",
)
@click.option("--dp-clip", type=click.FloatRange(min=0), default=0.0, help="[privacy] clip: L2 clip S of an update.")
@click.option(
    "--dp-epsilon", type=click.FloatRange(min=0), default=0.0, help="[privacy] epsilon_budget (0: none). [default: 0]"
)
@click.pass_context
def init(
    ctx,
    checkpoint,
    state_dir,
    strategy,
    min_fit_clients,
    max_fit_clients,
    num_rounds,
    round_deadline,
    host,
    port,
    tls_names,
    trainable,
    lora_rank,
    frozen_experts,
    calibration_texts,
    eval_data,
    dp_noise_multiplier,
    dp_clip,
    dp_epsilon,
):
    """Write the config, create the registry, global state version 0, calibration statistics, and the TLS
    certificate authority with the server certificate (``serve`` speaks wss:// with mutual TLS)."""
    path: Path = ctx.obj["config"]
    if path.exists():
        raise ConfigError(f"{path} exists; pick another --config or remove it")
    cfg = CoordinatorConfig(
        checkpoint=str(Path(checkpoint).resolve()),
        state_dir=str(Path(state_dir).resolve()),
        strategy=strategy,
        rounds=RoundPolicy(
            min_fit_clients=min_fit_clients,
            max_fit_clients=max_fit_clients,
            num_rounds=num_rounds,
            deadline_s=parse_duration(round_deadline),
        ),
        host=host,
        port=port,
        trainable_mode=trainable,
        lora_rank=lora_rank if trainable == TrainableMode.LORA else 0,
        frozen_experts=frozen_experts,
        eval_data=str(Path(eval_data).resolve()) if eval_data else "",
        privacy={"noise_multiplier": dp_noise_multiplier, "clip": dp_clip, "epsilon_budget": dp_epsilon},
    )
    from coordinator.federation import initialize
    from coordinator.tls import with_new_authority

    version = initialize(cfg, _calibration_texts(calibration_texts))
    cfg = with_new_authority(cfg, list(tls_names))
    save_config(cfg, path)
    console.print(f"wrote {path}; registry {cfg.registry_url}; model version {version.version}")


def _calibration_texts(path: str | None) -> list[str]:
    if path is None:
        from export.calibration import default_texts

        return default_texts()
    try:
        return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: every line must be a JSON object with a 'text' ({exc})") from exc


@main.command()
@click.option("--port", type=int, default=None, help="Override the config's port (0: any free port).")
@click.option(
    "--insecure",
    is_flag=True,
    help="Serve plain ws:// without TLS (tokens, weights and updates in the clear): only on a trusted "
    "network. Same as insecure = true in the config.",
)
@click.pass_context
def serve(ctx, port, insecure):
    """Serve devices and run rounds until SIGTERM / Ctrl-C (wss:// with mutual TLS unless --insecure)."""
    import logging

    from coordinator.server import run

    cfg = _config(ctx)
    cfg = replace(cfg, port=cfg.port if port is None else port, insecure=cfg.insecure or insecure)
    if insecure:  # the CA stays: it signs bundles and assignments (device_runtime.signing)
        cfg = replace(cfg, tls_cert="", tls_key="")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # no line per opened / closed connection
    scheme = "wss" if cfg.tls else "ws"
    run(cfg, ready=lambda p: print(f"listening on {scheme}://{cfg.host}:{p}", flush=True))


@main.command()
@click.option("--name", required=True, help="Name of the device to enroll.")
@click.option("--expires", default="1h", show_default=True, help="Token lifetime (e.g. 15m, 1h, 2d).")
@click.pass_context
def enroll(ctx, name, expires):
    """Create a one-time enrollment token (printed once; only its hash is stored). With TLS it ends in
    ``.FINGERPRINT`` of the coordinator's CA, which the device pins on first contact."""
    from coordinator.tls import pinned_token

    cfg = _config(ctx)
    registry = Registry(cfg.registry_url)
    try:
        print(pinned_token(registry.create_enroll_token(name, parse_duration(expires)), cfg))
    finally:
        registry.close()


@main.group(invoke_without_command=True)
@click.pass_context
def devices(ctx):
    """List enrolled devices (subcommand: revoke)."""
    if ctx.invoked_subcommand is not None:
        return
    registry = _registry(ctx)
    table = Table("id", "name", "memory MiB", "GFLOP/s", "last seen", "revoked")
    for d in registry.list_devices():  # profile values come from the device: shown as text, never as markup
        memory = d.profile.get("memory_mib", d.profile.get("memory_available_mib", ""))
        table.add_row(
            d.id,
            d.name,
            escape(str(memory)),
            escape(str(d.profile.get("gflops", ""))),
            _time(d.last_seen),
            _time(d.revoked_at),
        )
    registry.close()
    Console().print(table)


@devices.command()
@click.argument("device_id")
@click.pass_context
def revoke(ctx, device_id):
    """Revoke a device: it can no longer authenticate."""
    registry = _registry(ctx)
    try:
        registry.revoke_device(device_id)
    finally:
        registry.close()
    console.print(f"revoked {device_id}")


@main.command()
@click.option("--limit", default=20, show_default=True)
@click.pass_context
def rounds(ctx, limit):
    """Recent rounds with their status and metrics."""
    registry = _registry(ctx)
    table = Table(
        "round",
        "strategy",
        "status",
        "clients",
        "examples",
        "train loss",
        "eval accuracy",
        "fed eval loss",
        "model version",
        "started",
        caption="eval accuracy: the coordinator's held-out score of the version the round made (eval_data); "
        "fed eval loss: the devices' held-out loss of the version the round started from (nats per token)",
    )
    for r in registry.list_rounds(limit=limit):
        m = r.metrics or {}
        loss = m.get("train_loss")
        scores = {x.name: x.value for x in registry.metrics(round_id=r.id) if x.name == "eval_accuracy"}
        accuracy = scores.get("eval_accuracy")
        table.add_row(
            str(r.id),
            r.strategy,
            r.status,
            str(m.get("num_clients", "")),
            str(m.get("num_examples", "")),
            "" if loss is None else f"{loss:.4f}",
            "" if accuracy is None else f"{100 * accuracy:.1f}%",
            _federated(m),
            str(m.get("model_version", "")),
            _time(r.started_at),
        )
    registry.close()
    Console().print(table)


@main.command()
@click.pass_context
def status(ctx):
    """Model version, devices and rounds at a glance."""
    cfg = _config(ctx)
    registry = Registry(cfg.registry_url)
    latest, devs = registry.latest_model_version(), registry.list_devices()
    rounds = registry.list_rounds(limit=1_000_000)
    central = _last_central_evaluation(registry, rounds)
    registry.close()
    finished = sum(r.status == "finished" for r in rounds)
    table = Table("what", "value")
    table.add_row("checkpoint", cfg.checkpoint)
    table.add_row("strategy", cfg.strategy)
    table.add_row("model version", "none (run init)" if latest is None else str(latest.version))
    table.add_row("devices", f"{sum(not d.revoked for d in devs)} active, {sum(d.revoked for d in devs)} revoked")
    table.add_row("last round", "none" if not rounds else f"{rounds[0].id} ({rounds[0].status})")
    table.add_row("rounds", _progress(cfg, rounds, finished))
    if cfg.privacy.enabled:  # the epsilon spent, as the last version recorded it (coordinator.privacy)
        spent = (latest.metrics or {}).get("dp_epsilon", 0.0) if latest is not None else 0.0
        budget = f" of {cfg.privacy.epsilon_budget:g}" if cfg.privacy.epsilon_budget else ""
        table.add_row("privacy", f"epsilon {spent:.4g}{budget} at delta {cfg.privacy.delta:g}")
    table.add_row("central evaluation", central if cfg.eval_data else "off (no eval_data)")
    scored = next((r for r in rounds if (r.metrics or {}).get("fed_eval_loss") is not None), None)
    if scored is None:
        off = cfg.fit.eval_fraction == 0
        table.add_row("federated evaluation", "off ([fit] eval_fraction = 0)" if off else "none yet")
    else:
        table.add_row("federated evaluation", f"round {scored.id}: {_federated(scored.metrics, long=True)}")
        names = {d.id: d.name for d in devs}
        for device, score in sorted(scored.metrics.get("fed_eval_devices", {}).items()):
            table.add_row(f"  {names.get(device, device)}", _device_score(score))
    Console().print(table)


def _federated(metrics: dict, *, long: bool = False) -> str:
    """A round's federated evaluation (``coordinator.federation.federated_evaluation``): the devices' example-
    weighted held-out loss (nats per token) of the version the round started from, accuracy if they computed one,
    and (``long``) how many examples and devices; "" when there is none."""
    loss = metrics.get("fed_eval_loss")
    if loss is None:
        return ""
    accuracy = metrics.get("fed_eval_accuracy")
    text = f"{loss:.4f}" + ("" if accuracy is None else f", accuracy {100 * accuracy:.1f}%")
    if long:
        text = (
            f"loss {text} on {int(metrics.get('fed_eval_num_examples', 0))} held-out examples of "
            f"{int(metrics.get('fed_eval_num_clients', 0))} devices (the model version the round started from)"
        )
    return text


def _device_score(score: dict) -> str:
    """One device's federated evaluation: loss, accuracy if any, examples, and the graph it scored with."""
    accuracy = score.get("accuracy")
    return (
        f"loss {score['loss']:.4f}"
        + ("" if accuracy is None else f", accuracy {100 * accuracy:.1f}%")
        + f" on {int(score['num_examples'])} examples, shape {score.get('shape_key', '?')}"
    )


def _last_central_evaluation(registry: Registry, rounds: list) -> str:
    """The coordinator's own held-out score (``coordinator.evaluation``, label log-likelihood) of the newest scored
    version, or why there is none."""
    for r in rounds[:50]:
        scores = {m.name: m.value for m in registry.metrics(round_id=r.id) if m.device_id is None}
        if "eval_accuracy" in scores:
            return (
                f"round {r.id}: accuracy {100 * scores['eval_accuracy']:.1f}%, "
                f"label loss {scores.get('eval_loss', float('nan')):.4f} (the version it made)"
            )
    return "none yet" if rounds else "no round yet"


def _progress(cfg: CoordinatorConfig, rounds: list, finished: int) -> str:
    """Finished rounds of ``num_rounds`` (``rounds``: newest first), and an alert once ``[rounds] max_attempts``
    or more consecutive rounds failed (the coordinator then backs off)."""
    num_rounds = cfg.rounds.num_rounds
    goal = f"{finished} of {num_rounds} finished" if num_rounds else f"{finished} finished"
    if num_rounds and finished >= num_rounds:
        return f"{goal}: done"
    failed = next((i for i, r in enumerate(rounds) if r.status != "failed"), len(rounds))
    if failed >= cfg.rounds.max_attempts:
        return (
            f"{goal}; ALERT: {failed} consecutive rounds failed (last: {rounds[0].metrics.get('reason', '?')}); "
            "rounds back off and resume when eligible devices connect (`fedmoe-coord devices`)"
        )
    return goal


@main.group()
def model():
    """The global model."""


@model.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "pte"]),
    default="hf",
    show_default=True,
    help="hf: a Hugging Face checkpoint; pte: an ExecuTorch program (XNNPACK) + tokenizer for on-device "
    "inference (needs the executorch extra; push it with `fedmoe-android push-model`).",
)
@click.option(
    "--experts-per-layer",
    type=click.IntRange(min=1),
    help="pte: keep only the C most important experts of each MoE layer (by the calibration importance), "
    "the subset a device class with C experts per layer holds [default: all].",
)
@click.option(
    "--max-seq-len",
    default=128,
    show_default=True,
    type=click.IntRange(min=1),
    help="pte: the longest token sequence the program takes.",
)
@click.pass_context
def export_model(ctx, out_dir, fmt, experts_per_layer, max_seq_len):
    """Merge the latest global state into OUT_DIR: a Hugging Face checkpoint, or (--format pte) an ExecuTorch .pte."""
    from coordinator.federation import export_latest

    cfg = _config(ctx)
    if fmt == "hf":
        version = export_latest(cfg, out_dir)
    else:
        version = _export_pte(cfg, out_dir, experts_per_layer, max_seq_len)
    console.print(f"exported model version {version} to {out_dir}")


def _export_pte(cfg: CoordinatorConfig, out_dir: str, experts_per_layer: int | None, max_seq_len: int) -> int:
    """The latest version as ``export.executorch`` writes it, pruned to the top experts if asked."""
    import tempfile

    from coordinator.federation import export_latest, load_calibration
    from export.executorch import export_pte
    from export.planner import select_experts

    keep = (
        None
        if experts_per_layer is None
        else select_experts([layer.information_score() for layer in load_calibration(cfg).layers], experts_per_layer)
    )
    with tempfile.TemporaryDirectory() as tmp:
        version = export_latest(cfg, tmp)
        info = export_pte(tmp, out_dir, keep=keep, max_seq_len=max_seq_len)
    console.print(f"{info.path}: {info.size_bytes / 2**20:.2f} MiB, up to {info.max_seq_len} tokens")
    return version


def _simulate_command():
    from coordinator.simulation.cli import simulate_command

    return simulate_command


main.add_command(_simulate_command(), name="simulate")


def _time(value) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def run() -> None:
    """Entry point: FedmoeError becomes a one-line error and exit status 1 (no traceback)."""
    run_cli(main, console)


if __name__ == "__main__":
    run()
