"""Local training with ONNX Runtime training: the :class:`~device_runtime.trainer.Trainer` of a bundle.

Built from a verified bundle (``device_runtime.bundle.load_bundle``): ``CheckpointState.load_checkpoint``,
``Module(training_model, state, eval_model)``, ``Optimizer(optimizer_model, module)``, then
``weights.safetensors`` is written into the state by name. Order matters (DESIGN.md section 3): assigning
``state.parameters[name]`` before a ``Module`` was built on that state segfaults.

Graph inputs are fed in ``manifest.inputs`` order and outputs read by name (``export/training_graph.py``
documents both). The AdamW moments live in the trainer and persist across ``fit`` calls; build a new
trainer for a round that must start with fresh moments.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Iterable

import numpy as np

from device_runtime.bundle import WEIGHTS_FILE, Bundle, load_bundle
from device_runtime.data import IGNORE_INDEX, Batch
from device_runtime.errors import BundleError, ConfigError, DataError
from device_runtime.stats import RoutingStats
from device_runtime.trainer import EvaluateResult, FitResult, Trainer, peak_rss_bytes

LOSS, CE_LOSS, NUM_TOKENS = "loss", "ce_loss", "num_tokens"
ROUTING_STATS, ROUTING_PRIOR = "routing_stats_{}", "routing_prior_{}"
ANCHOR_SUFFIX = ".anchor"
DTYPES = {"float32": np.float32, "float16": np.float16}


class OrtTrainer(Trainer):
    """Trains a bundle's pruned expert subset with ORT training (no torch in the process).

    Args:
        bundle: a :class:`~device_runtime.bundle.Bundle` (verified) or a bundle directory (verified here).
        threads: ORT intra-op threads (None: ORT's default, one per core).
        progress: show a rich progress bar during ``fit``.

    Raises:
        BundleError / BundleIntegrityError: the bundle is malformed, corrupted, or its weights disagree with
            its manifest (checked before any training).
        ConfigError: ORT training is not installed or ``threads < 1``.
    """

    def __init__(self, bundle: Bundle | str, *, threads: int | None = None, progress: bool = True):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.manifest = self.bundle.manifest
        self.progress = progress
        self._specs = {spec.name: spec for spec in self.manifest.tensors}
        self._state, self._module, self._optimizer = _build_session(self.bundle, threads)
        self._output_index = self._check_graph_names()
        self.set_parameters(_read_weights(self.bundle))

    def _check_graph_names(self) -> dict[str, int]:
        """Map output name -> position; raise BundleError if the graph and manifest disagree."""
        inputs, outputs = tuple(self._module.input_names()), tuple(self._module.output_names())
        if inputs != self.manifest.inputs:
            raise BundleError(f"training graph inputs {inputs[:6]}... differ from the manifest's "
                              f"{self.manifest.inputs[:6]}...; re-export the bundle")
        missing = [n for n in (LOSS, NUM_TOKENS, *self._stats_names()) if n not in outputs]
        unknown = [n for n in self._specs if n not in self._state.parameters]
        if missing or unknown:
            raise BundleError(f"bundle graph lacks outputs {missing} or parameters {unknown[:5]}")
        return {name: i for i, name in enumerate(outputs)}

    def _stats_names(self) -> list[str]:
        return [ROUTING_STATS.format(l) for l in range(len(self.manifest.moe_layers))]

    # -- parameters -------------------------------------------------------------------------------------

    def get_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the manifest's tensors, by name, each of its manifest shape and dtype."""
        return {name: np.array(self._state.parameters[name].data, dtype=DTYPES[spec.dtype])
                for name, spec in self._specs.items()}

    def set_parameters(self, parameters: dict[str, np.ndarray]) -> None:
        """Write tensors into the ORT state (cast to the graph's dtype).

        Raises:
            BundleError: an unknown name, a shape differing from the manifest, or a non-finite value.
        """
        for name, value in parameters.items():
            spec = self._specs.get(name)
            if spec is None:
                raise BundleError(f"tensor {name!r} is not in the bundle manifest")
            value = np.asarray(value)
            if value.shape != spec.shape or not np.all(np.isfinite(value)):
                raise BundleError(f"tensor {name}: shape {value.shape} (manifest {spec.shape}) or non-finite values")
            current = self._state.parameters[name].data
            self._state.parameters[name] = np.ascontiguousarray(value, dtype=current.dtype)

    # -- training ---------------------------------------------------------------------------------------

    def fit(self, batches: Iterable[Batch], *, steps: int, learning_rate: float, aux_loss_coef: float = 0.01,
            routing_prior: list[np.ndarray] | None = None, routing_kl_coef: float = 0.0,
            prox_mu: float = 0.0) -> FitResult:
        """See :meth:`Trainer.fit`. Shapes: ``routing_prior[l]`` is ``(E_l,)``.

        Raises:
            ConfigError: ``steps < 1``, a non-positive or non-finite learning rate, a bad prior or
                ``prox_mu > 0`` without a FedProx graph.
            DataError: ``batches`` ran out before ``steps`` batches.
        """
        if steps < 1 or not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ConfigError(f"need steps >= 1 and a finite learning rate > 0, got {steps}, {learning_rate}")
        constants = self._constant_inputs(aux_loss_coef, routing_prior, routing_kl_coef, prox_mu)
        self._optimizer.set_learning_rate(float(learning_rate))
        self._module.train()
        routing = RoutingStats(self.manifest.shape_key.experts_per_layer, self.manifest.expert_ids)
        losses, examples, tokens, elapsed = [], 0, 0, 0.0
        with _ProgressBar(self.progress, steps) as advance:
            for batch in itertools.islice(batches, steps):
                start = time.perf_counter()
                outputs = self._module(*self._feeds(batch, constants))
                self._optimizer.step()
                self._module.lazy_reset_grad()
                elapsed += time.perf_counter() - start
                losses.append(float(outputs[self._output_index[LOSS]]))
                routing.update([outputs[self._output_index[n]] for n in self._stats_names()],
                               int(outputs[self._output_index[NUM_TOKENS]]))
                examples, tokens = examples + batch.num_examples, tokens + batch.num_tokens
                advance(losses[-1])
        if len(losses) < steps:
            raise DataError(f"local data gave only {len(losses)} batches for {steps} steps")
        return FitResult(
            num_examples=examples, num_tokens=tokens, losses=tuple(losses), step_time_s=elapsed / steps,
            peak_rss_bytes=peak_rss_bytes(), routing=routing,
            trained_experts=tuple(tuple(t) for t in routing.trained_experts()),
        )

    def evaluate(self, batches: Iterable[Batch]) -> EvaluateResult:
        """Mean cross-entropy (``ce_loss``, else ``loss``) weighted by each batch's target tokens.

        Raises:
            DataError: ``batches`` is empty or holds no target token.
        """
        constants = self._constant_inputs(0.0, None, 0.0, 0.0)
        key = self._output_index.get(CE_LOSS, self._output_index[LOSS])
        self._module.eval()
        total, targets, examples, tokens = 0.0, 0, 0, 0
        for batch in batches:
            count = target_tokens(batch)
            if count:
                total += float(self._module(*self._feeds(batch, constants))[key]) * count
            targets, examples, tokens = targets + count, examples + batch.num_examples, tokens + batch.num_tokens
        self._module.train()
        if targets == 0:
            raise DataError("no evaluation batch holds a target (completion) token")
        return EvaluateResult(loss=total / targets, num_examples=examples, num_tokens=tokens)

    def _constant_inputs(self, aux_loss_coef, routing_prior, routing_kl_coef, prox_mu) -> dict[str, np.ndarray]:
        """Every graph input except the batch, by name (FedProx anchors = current parameters)."""
        scalar = lambda v: np.array(float(v), dtype=np.float32)  # noqa: E731
        feeds = {"aux_loss_coef": scalar(aux_loss_coef), "routing_kl_coef": scalar(routing_kl_coef)}
        counts = self.manifest.shape_key.experts_per_layer
        for l, prior in enumerate(_check_priors(routing_prior, counts)):
            feeds[ROUTING_PRIOR.format(l)] = prior
        if self.manifest.shape_key.prox:
            feeds["prox_mu"] = scalar(prox_mu)
            feeds.update({n + ANCHOR_SUFFIX: v.astype(np.float32) for n, v in self.get_parameters().items()})
        elif prox_mu:
            raise ConfigError("prox_mu > 0 needs a FedProx bundle (shape key with prox); ask for one")
        return feeds

    def _feeds(self, batch: Batch, constants: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
                 **constants}
        try:
            return [feeds[name] for name in self.manifest.inputs]
        except KeyError as exc:
            raise BundleError(f"the bundle's graph wants input {exc} that this runtime cannot feed; "
                              "upgrade fedmoe on the device") from exc


def target_tokens(batch: Batch) -> int:
    """Targets the causal-LM loss counts: positions t >= 1 with a label and a real token (labels shift by one)."""
    valid = (batch.labels[:, 1:] != IGNORE_INDEX) & (batch.attention_mask[:, 1:] == 1)
    return int(valid.sum())


def _check_priors(priors: list[np.ndarray] | None, counts: tuple[int, ...]) -> list[np.ndarray]:
    """Validated ``(E_l,)`` float32 priors (uniform when None).

    Raises:
        ConfigError: wrong count or shape, negative or non-finite entries.
    """
    if priors is None:
        return [np.full(c, 1.0 / c, dtype=np.float32) for c in counts]
    priors = [np.asarray(p, dtype=np.float32) for p in priors]
    if [p.shape for p in priors] != [(c,) for c in counts] or any(
            not np.all(np.isfinite(p)) or np.any(p < 0) for p in priors):
        raise ConfigError(f"routing_prior must be finite non-negative arrays of shapes {[(c,) for c in counts]}")
    return priors


def _read_weights(bundle: Bundle) -> dict[str, np.ndarray]:
    """``weights.safetensors`` as numpy arrays, checked against the manifest (names, shapes, dtypes).

    Raises:
        BundleError: a manifest tensor is missing, an extra tensor is present, or a shape / dtype differs.
    """
    from safetensors.numpy import load_file

    try:
        weights = load_file(str(bundle.path(WEIGHTS_FILE)))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise BundleError(f"cannot read {WEIGHTS_FILE}: {exc}") from exc
    specs = {t.name: t for t in bundle.manifest.tensors}
    if set(weights) != set(specs):
        raise BundleError(f"{WEIGHTS_FILE} tensors differ from the manifest: missing "
                          f"{sorted(set(specs) - set(weights))[:5]}, extra {sorted(set(weights) - set(specs))[:5]}")
    for name, value in weights.items():
        if value.shape != specs[name].shape or value.dtype != DTYPES[specs[name].dtype]:
            raise BundleError(f"{WEIGHTS_FILE}: {name} is {value.dtype}{value.shape}, manifest says "
                              f"{specs[name].dtype}{specs[name].shape}")
    return weights


def _build_session(bundle: Bundle, threads: int | None):
    """``(CheckpointState, Module, Optimizer)`` of a bundle, in the only safe order."""
    from device_runtime.ort_api import load_api

    api = load_api()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_cpu_mem_arena = False  # the arena reserves far beyond use: RLIMIT_DATA budgets then fail
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    try:
        state = api.CheckpointState.load_checkpoint(str(bundle.path("checkpoint")))
        module = api.Module(str(bundle.path("training_model.onnx")), state, str(bundle.path("eval_model.onnx")),
                            device="cpu", session_options=options)
        optimizer = api.Optimizer(str(bundle.path("optimizer_model.onnx")), module)
    except Exception as exc:  # ORT raises its own Fail / InvalidGraph types
        raise BundleError(f"ONNX Runtime cannot load bundle {bundle.root}: {exc}") from exc
    return state, module, optimizer


class _ProgressBar:
    """A rich progress bar over ``steps`` showing the last loss; a no-op when disabled."""

    def __init__(self, enabled: bool, steps: int):
        self.enabled, self.steps = enabled, steps

    def __enter__(self):
        if not self.enabled:
            return lambda loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("local training"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=True)
        self._progress.__enter__()
        task = self._progress.add_task("fit", total=self.steps, loss="-")
        return lambda loss: self._progress.update(task, advance=1, loss=f"{loss:.4f}")

    def __exit__(self, *exc):
        if self.enabled:
            self._progress.__exit__(*exc)
        return False
