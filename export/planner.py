"""Budget planner: how many experts per MoE layer a device can train (HFedMoE's budgeted selection).

Torch-free (the coordinator imports it). The memory model of one ORT training step, in bytes, float32:

    peak = runtime_overhead                                  (interpreter, numpy, ORT libraries)
         + 4 * all parameters of the pruned model            (ORT checkpoint state, frozen and trainable)
         + 4 * attention and kept expert matrix parameters   (measured: one more copy, the transposes)
         + 12 * trainable parameters                          (gradient + AdamW m and v)
         + max(activation_factor * 4 * activation floats,    (kept for backward, see _activation_floats)
               4 * bundle tensors,                           (weights.safetensors staged while loading)
               4 * (bundle tensors + 3 * trainable))         (federated round: the assignment's decoded
                                                              tensors, and the update as numpy, safetensors
                                                              bytes and websocket frame)

With resident frozen experts (``TrainingShape.frozen_dtype``, ``export.prune``) the graph holds the other
``E - C`` experts of each MoE layer frozen (or their one merged stand-in: ``TrainingShape.merged``), routes over
all E (the router's E rows train) and runs every held expert on every token (dense-masked), so the activations
and flops are those of E (or C + 1) experts, and each frozen parameter costs
``2`` bytes (float16, held by the trainer and fed as a graph input) ``+ 4`` (its float32 cast, kept for the
backward) ``+ 4`` (the transposed copy the backward matmul reads, as for trained matrices). Such a device's heap
is not back to its pre-training size when its update goes out, so the round's wire copies are added to the
peak instead of overlapping the activations: measured in the default simulation, a 1.5 GiB Pi with 1 trained
expert and a merged stand-in per layer (estimate 1334 MiB without that term) had a 1415 MiB data segment after
training and died of a MemoryError framing its 81 MiB update (``docs/algorithms.md``).

A zeroth-order step (``TrainingShape.order``, the ``zo`` backend: MeZO on the eval graph, no gradients, no
optimizer state, no activations kept for a backward) needs instead::

    peak = runtime_overhead
         + 4 * all parameters of the pruned model            (the ORT checkpoint file's bytes, read once)
         + 4 * bundle tensors                                 (writable copies, perturbed in place)
         + max(4 * live forward floats,                       (one decoder layer's activations + the logits)
               4 * (bundle tensors + 3 * trainable))          (the federated round's wire copies, as above)

and two forwards per step (``2 / 3`` of the first-order flops). Not calibrated separately:
``bench/bench_backends.py`` prints its estimate next to the measured peak RSS.

The compute model: ``flops = 3 * (2 * tokens * (parameters - vocab * hidden) + 2 * logit_rows * vocab * hidden
+ attention)`` (every kept expert runs on every token: dense-masked routing; the tied embedding counts once, as
the lm_head matmul, which runs only on the ``logit_rows = batch * targets`` positions that predict a target),
step time =
flops / (device GFLOP/s * efficiency). The constants are calibrated by ``bench/bench_planner.py`` against
ORT training runs on this machine (see ``CALIBRATION``); the benchmark prints estimated vs measured peak RSS.

Selection (Fang et al., HFedMoE, arXiv 2601.00583, budgeted importance maximisation): experts are of equal
size, so maximising the summed importance under the budget is "the largest uniform C per layer that fits,
then the top-C experts of each layer by importance". A uniform C keeps the number of distinct graph shapes
(and so ONNX exports) at most E.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_runtime.errors import BudgetError, ConfigError, ModelError
from device_runtime.modes import Order, TrainableMode
from device_runtime.units import MIB
from export.checkpoint_format import FEDMOE_KEY

_ROUTER_SUFFIXES = (".gate.weight", ".router.layer.weight")

# Measured by bench/bench_planner.py (ORT 1.19.2, 2 threads, CPU arena off; bench/README.md has the tables): on 24
# runs of 4-, 8- and 30-layer upcycled SmolLM2 bundles (1, 2, 4 experts/layer, experts and LoRA r=8, 16 to 1024
# tokens per step) the estimate was 1.02-1.18x the measured peak RSS with these two memory constants. Efficiency:
# the steps ran at 0.54-0.77 of measure_gflops (105.6 GFLOP/s here); 0.5 keeps the step estimate above them.
# Refitted when the lm_head moved to target positions only (its logits had been over-counted, hiding ~7% of the
# other activations and ~4 MiB of load-phase overhead): 8-layer experts-1 at 4x128 measured 1008-1012 MiB, 4-layer
# lora8-1 at 1x64 386 MiB; runtime 120 -> 128 MiB and activation factor 1.03 -> 1.10 put both 1.01x over.
CALIBRATION = {"runtime_overhead_mib": 128.0, "activation_factor": 1.10, "efficiency": 0.5}
ORDERS = tuple(Order)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the planner needs, read from a checkpoint without loading it.

    Attributes:
        hidden, intermediate (per expert), vocab, num_layers, num_heads, num_kv_heads, head_dim: config sizes.
        moe_layers: number of MoE layers. num_experts: experts per MoE layer in the global model.
        experts_per_token: top-k. shared_params: parameters outside experts and routers (embeddings, attention,
        norms, dense MLPs, shared experts). expert_params: parameters of ONE expert (all its projections).
    """

    hidden: int
    intermediate: int
    vocab: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_layers: int
    num_experts: int
    experts_per_token: int
    shared_params: int
    expert_params: int


@dataclass(frozen=True)
class TrainingShape:
    """What a local training step looks like.

    Attributes:
        batch_size: sequences per step. seq_len: tokens per sequence.
        trainable_mode: ``"experts"`` or ``"lora"``. lora_rank: r (LoRA mode only).
        order: ``"first-order"`` (ORT training: backward + AdamW) or ``"zeroth-order"`` (forwards only).
        targets: target (completion) tokens per sequence, the longest in a batch: the graph runs the lm_head on
            ``batch_size * targets`` rows only (``export.training_graph.select_targets``). None: every position
            (``seq_len - 1``), the bound that holds for any data.
        frozen_dtype: None (pruned: the device holds only the experts it trains) or ``"float16"`` (the others
            resident, frozen: first-order, experts mode). merged: the frozen ones merged into one stand-in.
    """

    batch_size: int = 8
    seq_len: int = 128
    trainable_mode: str = "experts"
    lora_rank: int = 0
    order: Order = Order.FIRST
    targets: int | None = None
    frozen_dtype: str | None = None
    merged: bool = False

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.frozen_dtype is not None and (
            self.frozen_dtype != "float16" or self.order != Order.FIRST or self.trainable_mode != TrainableMode.EXPERTS
        ):
            raise ConfigError(f"frozen_dtype {self.frozen_dtype!r}: only 'float16', first-order, experts mode")
        if self.merged and self.frozen_dtype is None:
            raise ConfigError("merged stand-in experts need a frozen_dtype")
        if self.targets is not None and not 1 <= self.targets < self.seq_len:
            raise ConfigError(f"targets must be in [1, seq_len - 1 = {self.seq_len - 1}], got {self.targets}")

    @property
    def logit_rows(self) -> int:
        """Rows the lm_head runs on in one step: ``batch_size * targets``."""
        return self.batch_size * (self.seq_len - 1 if self.targets is None else self.targets)


@dataclass(frozen=True)
class Budget:
    """A device's budget: memory in MiB, compute in GFLOP/s, optional cap on one step's time in seconds."""

    memory_mib: float
    gflops: float = 10.0
    max_step_s: float | None = None

    def __post_init__(self) -> None:
        if self.memory_mib <= 0 or self.gflops <= 0:
            raise ConfigError(f"budget memory_mib and gflops must be > 0, got {self.memory_mib}, {self.gflops}")


@dataclass(frozen=True)
class Estimate:
    """Estimated peak memory (bytes, by part) and step time (seconds) for C experts per layer."""

    experts_per_layer: int
    parts: dict[str, float] = field(default_factory=dict)
    step_s: float = 0.0

    @property
    def peak_bytes(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB


def _lora_params(shape: ModelShape, rank: int) -> int:
    """LoRA parameters of one expert: A and B for gate_up (2I x H) and down (H x I)."""
    h, i = shape.hidden, shape.intermediate
    return rank * (h + 2 * i) + rank * (i + h)


def _activation_floats(shape: ModelShape, train: TrainingShape, kept: int) -> int:
    """Floats kept for backward in one step, summed over ``batch * seq_len`` tokens.

    Per token: each decoder layer's attention (q, k, v, o, softmax scores ``heads * seq_len`` twice) plus its two
    RMSNorms and residuals; per MoE layer, every kept expert on every token (dense-masked routing: gate, up,
    SiLU, product, down) and with LoRA the adapters' ``(2I + H)`` outputs twice. Per target row
    (:attr:`TrainingShape.logit_rows`): the logits four times (logits, float cast, log-softmax, their gradient).
    """
    tokens = train.batch_size * train.seq_len
    h, i = shape.hidden, shape.intermediate
    kv = shape.num_kv_heads * shape.head_dim
    attention = 12 * h + 4 * kv + 2 * shape.num_heads * train.seq_len
    expert = 5 * i + 2 * h + (2 * (2 * i + h) if train.trainable_mode == TrainableMode.LORA else 0)
    experts = kept * expert + 4 * shape.num_experts
    return tokens * (shape.num_layers * attention + shape.moe_layers * experts) + train.logit_rows * 4 * shape.vocab


def estimate(
    shape: ModelShape,
    train: TrainingShape,
    kept: int,
    *,
    gflops: float = 10.0,
    calibration: Mapping[str, float] = CALIBRATION,
) -> Estimate:
    """Estimate peak training memory (bytes by part) and step time (seconds) with ``kept`` experts per MoE layer.

    Parts: ``runtime`` (interpreter, numpy, ORT), ``weights`` (float32 parameters, plus one more copy of the
    attention and kept expert matrices: measured, the transposes the backward matmuls read), ``grad_and_adamw``
    (12 bytes per trainable parameter) and ``activations``: the larger of ``activation_factor`` x the activation
    floats, the bundle tensors staged while ``weights.safetensors`` is loaded, and the wire copies of a federated
    round (assignment tensors + 3 copies of the update); these transients never coexist. The wire term was
    measured in ``fedmoe-coord simulate``: a 4-expert 8-layer device peaked at 2928 MiB RSS in round 2 and
    ran out of a 3072 MiB RLIMIT_DATA while framing its 340 MB update.
    """
    held = shape.num_experts if train.frozen_dtype is not None else kept  # router rows
    routed = min(kept + 1, held) if train.merged else held  # experts the forward runs (a stand-in counts once)
    frozen = shape.moe_layers * (routed - kept) * shape.expert_params
    router = held * shape.hidden
    experts = shape.moe_layers * kept * shape.expert_params
    lora = (
        shape.moe_layers * kept * _lora_params(shape, train.lora_rank)
        if train.trainable_mode == TrainableMode.LORA
        else 0
    )
    trainable = (
        lora + shape.moe_layers * router
        if train.trainable_mode == TrainableMode.LORA
        else experts + shape.moe_layers * router
    )
    staged = trainable + frozen // 2  # weights.safetensors, in float32 units (frozen experts in float16)
    all_params = shape.shared_params + experts + shape.moe_layers * router + lora
    q_and_o = 2 * shape.hidden * shape.num_heads * shape.head_dim  # attention matrices: q, o (H x heads*hd), k, v
    matrices = experts + shape.num_layers * (q_and_o + 2 * shape.hidden * shape.num_kv_heads * shape.head_dim)
    wire = 4 * (staged + 3 * trainable)
    tokens = train.batch_size * train.seq_len
    attention_flops = 4 * tokens * train.seq_len * shape.num_heads * shape.head_dim * shape.num_layers
    lm_head = shape.vocab * shape.hidden  # the (tied) embedding, as a matmul on the target rows only
    matmul_flops = 2 * tokens * (all_params + frozen - lm_head) + 2 * train.logit_rows * lm_head
    if train.order == Order.ZEROTH:
        live = _activation_floats(shape, train, kept) // shape.num_layers + 2 * train.logit_rows * shape.vocab
        parts = {
            "runtime": calibration["runtime_overhead_mib"] * MIB,
            "weights": 4 * all_params + 4 * staged,
            "grad_and_adamw": 0,
            "activations": max(4 * live, wire),
        }
        flops = 2 * (matmul_flops + attention_flops)
        return Estimate(experts_per_layer=kept, parts=parts, step_s=flops / (gflops * 1e9 * calibration["efficiency"]))
    activations = calibration["activation_factor"] * 4 * _activation_floats(shape, train, routed)
    parts = {
        "runtime": calibration["runtime_overhead_mib"] * MIB,
        "weights": 4 * all_params + 4 * matrices + 10 * frozen,
        "grad_and_adamw": 12 * trainable,
        "activations": max(activations, 4 * staged, wire),
    }
    if frozen:  # the round's wire copies come on top of a frozen bundle's heap (see the module docstring)
        parts["wire"] = wire
    flops = 3 * (matmul_flops + attention_flops)
    step_s = flops / (gflops * 1e9 * calibration["efficiency"])
    return Estimate(experts_per_layer=kept, parts=parts, step_s=step_s)


def plan(
    shape: ModelShape, train: TrainingShape, budget: Budget, *, calibration: Mapping[str, float] = CALIBRATION
) -> Estimate:
    """The largest uniform number of experts per layer whose estimate fits the budget.

    Raises:
        BudgetError: even one expert per layer does not fit; the message gives the estimate by part.
    """
    best = None
    for kept in range(1, shape.num_experts + 1):
        est = estimate(shape, train, kept, gflops=budget.gflops, calibration=calibration)
        fits_time = budget.max_step_s is None or est.step_s <= budget.max_step_s
        if est.peak_mib <= budget.memory_mib and fits_time:
            best = est
    if best is None:
        est = estimate(shape, train, 1, gflops=budget.gflops, calibration=calibration)
        parts = ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in est.parts.items())
        raise BudgetError(
            f"one expert per layer needs ~{est.peak_mib:.0f} MiB ({parts}) and ~{est.step_s:.2f} s/step, over the "
            f"budget of {budget.memory_mib:.0f} MiB / {budget.max_step_s} s: use --trainable lora, a smaller "
            "batch or seq_len, or upcycle with fewer layers (--num-layers)"
        )
    return best


def select_experts(importance: list[np.ndarray], kept: int) -> tuple[tuple[int, ...], ...]:
    """Top-``kept`` experts of each layer by importance, in ascending global id order.

    Args:
        importance: per MoE layer an array ``(num_experts,)`` of I(e) scores (higher is more important).
        kept: experts to keep per layer (clipped to the layer's expert count).
    """
    chosen = []
    for scores in importance:
        scores = np.asarray(scores, dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[: min(kept, scores.size)]
        chosen.append(tuple(sorted(int(e) for e in order)))
    return tuple(chosen)


def model_shape(checkpoint: str | Path) -> ModelShape:
    """Read a MoE checkpoint directory's ``config.json`` (a Hugging Face MoE family's or the fedmoe format's,
    ``export.upcycle``) and safetensors headers (no weights loaded).

    Raises:
        ModelError: no config.json, or the config lacks the MoE fields.
    """
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {checkpoint}/config.json: {exc}") from exc
    moe = config.get(FEDMOE_KEY) or config  # an upcycled model in the fedmoe format keeps its MoE sizes apart
    num_experts = int(moe.get("num_local_experts") or moe.get("num_experts") or 0)
    if not num_experts:
        raise ModelError(f"{checkpoint} is not a MoE checkpoint (no num_local_experts / num_experts)")
    shapes = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as handle:
            shapes.update({name: handle.get_slice(name).get_shape() for name in handle.keys()})
    hidden = int(config["hidden_size"])
    intermediate = int(config.get("moe_intermediate_size") or config["intermediate_size"])
    # Routers are (E, hidden) tensors named *.gate.weight (GraniteMoE on disk: *.router.layer.weight) whatever the
    # on-disk layout of the experts (fused or per-expert).
    moe_layers = sum(1 for n, s in shapes.items() if n.endswith(_ROUTER_SUFFIXES) and list(s) == [num_experts, hidden])
    if not moe_layers:
        raise ModelError(f"{checkpoint} has no router tensor (*.gate.weight of shape ({num_experts}, {hidden}))")
    expert_params = 3 * hidden * intermediate  # gate, up, down projections
    total = sum(int(np.prod(s)) for s in shapes.values())
    heads = int(config["num_attention_heads"])
    return ModelShape(
        hidden=hidden,
        intermediate=intermediate,
        vocab=int(config["vocab_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        moe_layers=moe_layers,
        num_experts=num_experts,
        experts_per_token=int(moe["num_experts_per_tok"]),
        shared_params=total - moe_layers * num_experts * (expert_params + hidden),
        expert_params=expert_params,
    )
