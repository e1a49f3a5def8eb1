"""What a bundle's graphs take and give: the one graph I/O contract, imported by the exporter
(``export/training_graph.py``, which documents every input and output with its shape) and every training backend.

Feeds in ``manifest.inputs`` order and outputs by name:
the batch, the loss coefficients, the FedAlign-MoE routing priors ``(E_l,)``, the logit adjustment of the answer
tokens (``answer_ids`` / ``answer_bias``, ``device_runtime.answer_prior``) and, for FedProx bundles,
``prox_mu`` and one ``<param>.anchor`` per trainable tensor. Also the bundle's ``weights.safetensors``
checked against the manifest, and the target-token count the loss averages over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from device_runtime.bundle import WEIGHTS_FILE, Bundle, Manifest, TensorSpec
from device_runtime.data import IGNORE_INDEX, Batch
from device_runtime.errors import BundleError, ConfigError

# inputs
INPUT_IDS, ATTENTION_MASK, LABELS = "input_ids", "attention_mask", "labels"  # the batch, (batch, seq_len)
AUX_LOSS_COEF, ROUTING_REG_COEF = "aux_loss_coef", "routing_reg_coef"  # FitConfig's coefficients, scalars
ROUTING_PRIOR = "routing_prior_{}"  # per MoE layer l: the FedAlign-MoE prior (E_l,)
ANSWER_IDS, ANSWER_BIAS = "answer_ids", "answer_bias"  # the logit adjustment of the first target, (A,) each
FROZEN_INPUTS = ("frozen_gate_up_{}", "frozen_down_{}")  # per MoE layer l of a resident bundle (export.prune)
PROX_MU, ANCHOR_SUFFIX = "prox_mu", ".anchor"  # FedProx bundles: mu, and one anchor per trainable tensor
# outputs
LOSS, CE_LOSS, NUM_TOKENS = "loss", "ce_loss", "num_tokens"
SMASHED = "smashed"  # a split bottom's output: the hidden states at the cut, (batch, seq_len, hidden)
ROUTING_STATS = "routing_stats_{}"  # per MoE layer l: (4, E_l) routing sums
NO_ANSWER_SHIFT = (np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float32))  # token 0 shifted by 0: none
DTYPES = {"float32": np.float32, "float16": np.float16}


def stats_names(manifest: Manifest) -> list[str]:
    """``routing_stats_{l}`` for each MoE layer, in layer order."""
    return [ROUTING_STATS.format(l) for l in range(len(manifest.moe_layers))]


def constant_inputs(
    manifest: Manifest,
    *,
    aux_loss_coef: float,
    routing_prior: list[np.ndarray] | None,
    routing_reg_coef: float,
    prox_mu: float,
    anchors: Callable[[], dict[str, np.ndarray]],
    answer_shift: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Every graph input except the batch (and the weights), by name.

    Args:
        anchors: returns the FedProx anchors (the parameters at the start of ``fit``); called only for
            FedProx bundles.
        answer_shift: ``(answer_ids (A,) int64, answer_bias (A,) float32)`` (``answer_prior.answer_shift``);
            None: no shift. A graph without these inputs (exported before them) is not fed them.

    Raises:
        ConfigError: a bad prior or answer shift, or ``prox_mu > 0`` for a bundle without FedProx inputs.
    """

    def scalar(v: float) -> np.ndarray:
        return np.array(float(v), dtype=np.float32)

    feeds = {AUX_LOSS_COEF: scalar(aux_loss_coef), ROUTING_REG_COEF: scalar(routing_reg_coef)}
    if ANSWER_IDS in manifest.inputs:
        feeds[ANSWER_IDS], feeds[ANSWER_BIAS] = check_answer_shift(answer_shift or NO_ANSWER_SHIFT)
    for l, prior in enumerate(check_priors(routing_prior, tuple(map(len, manifest.held_ids())))):
        feeds[ROUTING_PRIOR.format(l)] = prior
    if manifest.shape_key.prox:
        feeds[PROX_MU] = scalar(prox_mu)
        feeds.update({n + ANCHOR_SUFFIX: v.astype(np.float32) for n, v in anchors().items()})
    elif prox_mu:
        raise ConfigError("prox_mu > 0 needs a FedProx bundle (shape key with prox); ask for one")
    return feeds


def weight_inputs(manifest: Manifest) -> tuple[str, ...]:
    """The bundle tensors the graph takes as inputs rather than parameters (a resident bundle's frozen experts)."""
    return tuple(t.name for t in manifest.tensors if not t.trainable and t.name in manifest.inputs)


def batch_feeds(manifest: Manifest, batch: Batch, constants: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The manifest's inputs by name for one batch.

    Raises:
        BundleError: the graph wants an input this runtime cannot feed.
    """
    feeds = {INPUT_IDS: batch.input_ids, ATTENTION_MASK: batch.attention_mask, LABELS: batch.labels, **constants}
    missing = [name for name in manifest.inputs if name not in feeds]
    if missing:
        raise BundleError(
            f"the bundle's graph wants inputs {missing[:3]} that this runtime cannot feed; upgrade fedmoe on the device"
        )
    return {name: feeds[name] for name in manifest.inputs}


def target_tokens(batch: Batch) -> int:
    """Targets the causal-LM loss counts: positions t >= 1 with a label and a real token (labels shift by one)."""
    valid = (batch.labels[:, 1:] != IGNORE_INDEX) & (batch.attention_mask[:, 1:] == 1)
    return int(valid.sum())


def check_priors(priors: list[np.ndarray] | None, counts: tuple[int, ...]) -> list[np.ndarray]:
    """Validated ``(E_l,)`` float32 priors (uniform when None).

    Raises:
        ConfigError: wrong count or shape, negative or non-finite entries.
    """
    if priors is None:
        return [np.full(c, 1.0 / c, dtype=np.float32) for c in counts]
    priors = [np.asarray(p, dtype=np.float32) for p in priors]
    if [p.shape for p in priors] != [(c,) for c in counts] or any(
        not np.all(np.isfinite(p)) or np.any(p < 0) for p in priors
    ):
        raise ConfigError(f"routing_prior must be finite non-negative arrays of shapes {[(c,) for c in counts]}")
    return priors


def check_answer_shift(shift: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(answer_ids (A,) int64, answer_bias (A,) float32)``, A >= 1.

    Raises:
        ConfigError: other shapes, a negative id or a non-finite bias.
    """
    ids, bias = np.asarray(shift[0], dtype=np.int64), np.asarray(shift[1], dtype=np.float32)
    if ids.ndim != 1 or ids.shape != bias.shape or not ids.size or np.any(ids < 0) or not np.all(np.isfinite(bias)):
        raise ConfigError("answer_shift must be two equal-length 1-D arrays: token ids >= 0 and finite biases")
    return ids, bias


def read_weights(bundle: Bundle) -> dict[str, np.ndarray]:
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
        raise BundleError(
            f"{WEIGHTS_FILE} tensors differ from the manifest: missing "
            f"{sorted(set(specs) - set(weights))[:5]}, extra {sorted(set(weights) - set(specs))[:5]}"
        )
    for name, value in weights.items():
        if value.shape != specs[name].shape or value.dtype != DTYPES[specs[name].dtype]:
            raise BundleError(
                f"{WEIGHTS_FILE}: {name} is {value.dtype}{value.shape}, manifest says "
                f"{specs[name].dtype}{specs[name].shape}"
            )
    return weights


def checked_parameters(
    specs: Mapping[str, TensorSpec], parameters: Mapping[str, np.ndarray]
) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` of ``parameters``, each checked against its manifest spec (a backend's ``set_parameters``).

    Raises:
        BundleError: an unknown name, a shape differing from the manifest, or a non-finite value.
    """
    for name, value in parameters.items():
        if name not in specs:
            raise BundleError(f"tensor {name!r} is not in the bundle manifest")
        value = np.asarray(value)
        check_tensor(specs[name].shape, name, value)
        yield name, value


def check_tensor(manifest_shape: tuple[int, ...], name: str, value: np.ndarray) -> None:
    """Raise BundleError unless ``value`` has the manifest shape and only finite values."""
    if value.shape != manifest_shape or not np.all(np.isfinite(value)):
        raise BundleError(f"tensor {name}: shape {value.shape} (manifest {manifest_shape}) or non-finite values")
