"""One round of local training: an ``Assignment`` + its cached bundle + local data -> an ``Update``.

Round step 5 (``docs/round.md``): check the assignment's tensors against the bundle manifest
(names, shapes), load them into the device's trainer (``device_runtime.trainer_cache``: kept from the last round
on the same bundle, with its AdamW moments, or built afresh; fresh step seeds for zeroth-order), score them on the
device's held-out split (federated evaluation, ``FitConfig.eval_fraction``: :func:`evaluate_received`), train
``local_steps`` (0: one epoch) on the rest and report the trainable tensors, the HFedMoE routing statistics (Fang
et al., arXiv 2601.00583), the trained experts, both in global expert ids, and the evaluation.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from device_runtime.answer_prior import local_answer_shift
from device_runtime.bundle import TOKENIZER_FILE, Bundle, Manifest
from device_runtime.data import DEFAULT_TEMPLATE, EVAL_SPLIT_SEED, Batch, LocalDataset
from device_runtime.errors import ConfigError, DataError, ProtocolError
from device_runtime.memory import training_heap
from device_runtime.modes import Order
from device_runtime.split_trainer import SplitLink, SplitTrainer
from device_runtime.trainer import FitResult, Trainer
from device_runtime.trainer_cache import TrainerCache
from device_runtime.units import MIB
from device_runtime.wire import Assignment, EvalResult, FitConfig, Update, ZoUpdate, to_float32
from device_runtime.wire.fields import MAX_EVAL_LOSS
from device_runtime.zo_directions import candidate_seeds


def assignment_tensors(manifest: Manifest, assignment: Assignment) -> dict[str, np.ndarray]:
    """The assignment's weights as float32 (frozen experts in their manifest dtype), after checking them against
    the bundle manifest.

    Raises:
        ProtocolError("bad_tensor"): another shape key, or a tensor set / shape differing from the manifest.
    """
    if manifest.shape_key != assignment.shape_key:
        raise ProtocolError(
            "bad_tensor", f"assignment shape key {assignment.shape_key.id} != bundle {manifest.shape_key.id}"
        )
    expected = {t.name: tuple(t.shape) for t in manifest.tensors}
    got = {name: tuple(a.shape) for name, a in assignment.tensors.items()}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
        raise ProtocolError(
            "bad_tensor",
            f"assignment tensors differ from bundle {manifest.shape_key.id}: "
            f"missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]}",
        )
    frozen = {t.name for t in manifest.tensors if t.dtype == "float16"}
    return {
        **to_float32({n: a for n, a in assignment.tensors.items() if n not in frozen}),
        **{n: np.asarray(a, dtype=np.float16) for n, a in assignment.tensors.items() if n in frozen},
    }


def local_prior(
    config: FitConfig, num_experts: int, expert_ids: tuple[tuple[int, ...], ...]
) -> list[np.ndarray] | None:
    """FedAlign-MoE's p_global restricted to the held experts ``expert_ids`` (local order) and renormalised,
    ``(E_l,)`` per layer.

    A pruned device's router is a softmax over its kept experts only, so the global distribution over all
    ``num_experts`` is conditioned on the kept set (a resident device holds them all: no change). None when the
    config carries no prior.

    Raises:
        ConfigError: the prior does not have one entry per global expert in every MoE layer.
    """
    if config.routing_prior is None:
        return None
    prior = config.routing_prior
    if len(prior) != len(expert_ids) or any(len(p) != num_experts for p in prior):
        raise ConfigError(
            f"routing_prior must give {num_experts} probabilities for each of {len(expert_ids)} MoE layers"
        )
    out = []
    for layer, ids in zip(prior, expert_ids):
        kept = np.asarray([layer[g] for g in ids], dtype=np.float64)
        total = kept.sum()
        kept = kept / total if total > 0 else np.full(len(ids), 1.0 / len(ids))
        out.append(kept.astype(np.float32))
    return out


def round_dataset(
    data_file: str | Path, tokenizer_file: str | Path, config: FitConfig, *, template: str = DEFAULT_TEMPLATE
) -> LocalDataset:
    """A device's local data for one round: ``config.eval_fraction`` of the records held out by the fixed
    :data:`~device_runtime.data.EVAL_SPLIT_SEED` (the same records every round, never trained on), the train
    batches shuffled by the round's ``config.seed``. The torch reference (``coordinator/simulation/reference.py``)
    trains on this same split.

    Raises:
        DataError: the file is unreadable or holds a malformed record.
    """
    return LocalDataset.from_jsonl(
        data_file,
        tokenizer_file,
        seq_len=config.seq_len,
        template=template,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        split_seed=EVAL_SPLIT_SEED,
    )


def evaluate_received(
    trainer: Trainer, dataset: LocalDataset, batch_size: int, stop: threading.Event | None = None
) -> tuple[EvalResult | None, float]:
    """Federated evaluation: the loss of the trainer's current parameters (the model the assignment carried, as
    the bundle holds it) on the held-out split, before any local step; and the seconds it took.

    The loss is the eval graph's ``ce_loss`` over completion tokens (nats per token, no answer shift: the
    trainer's ``evaluate``). No accuracy: the device graphs output scalar losses only, and label accuracy (the
    coordinator's ``export/evaluate.py``: the argmax over candidate labels) needs per-label scores, one forward per
    candidate label of every example with these graphs. None when nothing is held out, no held-out batch has a
    completion token, or the loss is not a finite number within ``[0, MAX_EVAL_LOSS]``.
    """
    if not dataset.eval:
        return None, 0.0
    start = time.perf_counter()
    try:
        scored = trainer.evaluate(until_stopped(dataset.eval_batches(batch_size), stop))
    except DataError:
        return None, time.perf_counter() - start
    seconds = time.perf_counter() - start
    if not (math.isfinite(scored.loss) and 0.0 <= scored.loss <= MAX_EVAL_LOSS) or scored.num_examples < 1:
        return None, seconds
    return EvalResult(loss=scored.loss, num_examples=scored.num_examples, num_tokens=scored.num_tokens), seconds


def until_stopped(batches: Iterator[Batch], stop: threading.Event | None) -> Iterator[Batch]:
    """``batches`` until ``stop`` is set (checked between steps: the current step always completes)."""
    for batch in batches:
        if stop is not None and stop.is_set():
            return
        yield batch


def fit_assignment(
    bundle: Bundle,
    assignment: Assignment,
    data_file: str | Path,
    *,
    threads: int | None = None,
    stop: threading.Event | None = None,
    template: str = DEFAULT_TEMPLATE,
    extra_metrics: dict[str, float] | None = None,
    backend: str | None = None,
    trainers: TrainerCache | None = None,
    link: SplitLink | None = None,
) -> Update:
    """Train ``assignment`` on ``data_file`` and build its ``Update``.

    Consumes the assignment's weights: ``assignment.tensors`` is emptied once they are loaded into the
    trainer, so that the decoded wire copy does not stay resident through training.

    Args:
        bundle: the verified cached bundle of ``assignment.shape_key``.
        assignment: the round's assignment (weights in ``tensors``, settings in ``config``).
        data_file: local JSONL data (see ``device_runtime.data``): ``config.eval_fraction`` of it held out and
            scored before training (:func:`round_dataset`), the rest trained on.
        threads: ORT intra-op threads. stop: set it to abandon after the current step.
        template: prompt template of classification records. extra_metrics: added to the metrics.
        backend: training backend name (None: ``backends.select_backend``'s choice).
        trainers: the device's kept trainer (``device_runtime.trainer_cache``); None: a fresh trainer.
        link: a split assignment's (``config.split``) line to the coordinator for its steps
            (``device_runtime.split_trainer``); its Update then carries no tensors.

    Raises:
        ProtocolError("bad_tensor"): the assignment does not fit the bundle.
        DataError: no usable local data, or ``stop`` was set (then the caller sees ``stop.is_set()``).
        BundleError / ConfigError: from the trainer (ConfigError also: the backend is not installed).
    """
    trainers = trainers or TrainerCache(reuse=False)
    try:
        update = _fit(
            bundle,
            assignment,
            data_file,
            threads=threads,
            stop=stop,
            template=template,
            extra_metrics=extra_metrics,
            backend=backend,
            trainers=trainers,
            link=link,
        )
    except BaseException:
        trainers.done(failed=True)
        raise
    trainers.done(upload_bytes=sum(a.nbytes for a in update.tensors.values()))
    return update


def _fit(
    bundle: Bundle,
    assignment: Assignment,
    data_file: str | Path,
    *,
    threads: int | None,
    stop: threading.Event | None,
    template: str,
    extra_metrics: dict[str, float] | None,
    backend: str | None,
    trainers: TrainerCache,
    link: SplitLink | None,
) -> Update:

    tensors = assignment_tensors(bundle.manifest, assignment)
    cfg = assignment.config
    held = bundle.manifest.held_ids(assignment.expert_ids)
    prior = local_prior(cfg, bundle.manifest.num_experts, held)
    dataset = round_dataset(data_file, bundle.path(TOKENIZER_FILE), cfg, template=template)
    if not dataset.train:
        raise DataError(f"{data_file} holds no training record")
    steps = cfg.local_steps or math.ceil(len(dataset.train) / cfg.batch_size)
    answer = local_answer_shift(dataset, cfg.labels, cfg.logit_adjustment)
    zeroth_order = {
        "seed": (cfg.seed, assignment.round_id),
        "candidates": candidate_seeds(cfg.seed, assignment.round_id, cfg.zo_seeds),
    }
    loading = time.perf_counter()
    trainer = trainers.trainer(bundle, backend=backend, threads=threads, zeroth_order=zeroth_order)
    trainer.set_parameters(tensors)
    del tensors
    assignment.tensors.clear()  # now copied into the trainer: free the wire copy (100s of MiB) before training
    load_seconds = time.perf_counter() - loading
    if cfg.split is not None:
        _join_split(trainer, assignment, link)
    is_zo = trainer.order in (Order.ZEROTH, Order.HYBRID)
    rate = cfg.split.learning_rate if cfg.split else (is_zo and cfg.zo_learning_rate) or cfg.learning_rate
    with training_heap():  # steps reuse freed buffers instead of mapping fresh ones
        evaluation, eval_seconds = evaluate_received(trainer, dataset, cfg.batch_size, stop)
        start = time.perf_counter()
        result = trainer.fit(
            until_stopped(dataset.train_batches(cfg.batch_size), stop),
            steps=steps,
            learning_rate=rate,
            aux_loss_coef=cfg.aux_loss_coef,
            routing_prior=prior,
            routing_reg_coef=cfg.routing_reg_coef,
            prox_mu=cfg.prox_mu,
            answer_shift=answer,
        )
        seconds = time.perf_counter() - start
    metrics = {
        **_metrics(result, seconds),
        "model_version": float(assignment.model_version),
        "zeroth_order": float(is_zo),
        "load_seconds": load_seconds,
        **({"eval_seconds": eval_seconds} if evaluation is not None else {}),
        **(extra_metrics or {}),
    }
    if is_zo and cfg.zo_seeds:  # seeds and scalars, expanded by the coordinator (coordinator.zo_updates)
        seeds, scalars = zip(*result.zo_coefficients)
        return build_update(
            assignment,
            result,
            {},
            metrics,
            zo=ZoUpdate(seeds=seeds, scalars=scalars, distribution=result.zo_distribution),
            held=held,
            evaluation=evaluation,
        )
    collecting = time.perf_counter()
    trainable = set(bundle.manifest.trainable_names) if cfg.split is None else set()  # split: the coordinator has it
    params = {n: a for n, a in trainer.get_parameters().items() if n in trainable}
    metrics["collect_seconds"] = time.perf_counter() - collecting  # the trained tensors out of the trainer
    return build_update(assignment, result, params, metrics, held=held, evaluation=evaluation)


def _join_split(trainer: Trainer, assignment: Assignment, link: SplitLink | None) -> None:
    """Give a split trainer its round. Raises ConfigError: not a split trainer, or no link to the coordinator."""
    cfg = assignment.config
    if not isinstance(trainer, SplitTrainer) or link is None or cfg.split is None:
        raise ConfigError(
            f"assignment {assignment.update_id} is split mode: train it with the split backend, connected "
            "(fedmoe-device run --backend split)"
        )
    trainer.join(
        link,
        update_id=assignment.update_id,
        round_id=assignment.round_id,
        seed=cfg.seed,
        config=cfg.split,
        expert_ids=assignment.expert_ids,
    )


def build_update(
    assignment: Assignment,
    result: FitResult,
    params: dict[str, np.ndarray],
    metrics: dict[str, float],
    *,
    zo: ZoUpdate | None = None,
    held: tuple[tuple[int, ...], ...] | None = None,
    evaluation: EvalResult | None = None,
) -> Update:
    """The ``Update`` of a fit: routing and trained experts in the assignment's global expert ids (the routing over
    ``held``, every expert the bundle holds in local order: ``Manifest.held_ids``; default the assignment's); the
    trained tensors as ``params`` or, for a seed-and-scalar update, as ``zo`` (then ``params`` is empty); the
    held-out score of the received model (:func:`evaluate_received`) or None."""
    ids = assignment.expert_ids if held is None else held
    routing = result.routing.to_dict()
    routing["expert_ids"] = [list(layer) for layer in ids]
    trained = tuple(tuple(ids[l][i] for i in local) for l, local in enumerate(result.trained_experts))
    return Update(
        update_id=assignment.update_id,
        round_id=assignment.round_id,
        num_examples=result.num_examples,
        num_tokens=result.num_tokens,
        metrics=metrics,
        routing=routing,
        trained_experts=trained,
        zo=zo,
        evaluation=evaluation,
        tensors=wire_tensors(params, assignment.config.update_dtype),
    )


def wire_tensors(params: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Cast to the update dtype; a tensor that would overflow float16 stays float32."""
    out = {}
    for name, value in params.items():
        value = np.asarray(value, dtype=np.float32)
        if dtype == "float16":
            with np.errstate(over="ignore"):
                half = value.astype(np.float16)
            value = half if np.all(np.isfinite(half)) else value
        out[name] = value
    return out


def _metrics(result: FitResult, seconds: float) -> dict[str, float]:
    losses = result.losses
    return {
        "loss": float(np.mean(losses)),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": float(len(losses)),
        "train_seconds": seconds,
        "step_time_s": result.step_time_s,
        "peak_rss_mb": result.peak_rss_bytes / MIB,
    }
