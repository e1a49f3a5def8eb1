"""Logit adjustment of a device's answer tokens by its own label prior (balanced softmax).

Under label skew each device's local steps learn its own label prior, and the average of those priors is wrong:
the averaged model predicts one or two labels for almost every input (``docs/algorithms.md``, "Label skew").
Balanced softmax (Ren et al., NeurIPS 2020) / logit adjustment (Menon et al., ICLR 2021, eq. 10) trains on
``softmax(z + tau * log pi)`` where ``pi`` is the device's label distribution, so the model itself learns
``p(y | x) / pi(y)``; evaluation uses the plain logits. Labels the device never sees get ``log pi`` at
:data:`LOG_PRIOR_FLOOR`: their softmax mass in training is negligible, so local training does not push them down
(the effect FedRS, Li & Zhan, KDD 2021, obtains by scaling absent labels' logits).

Here a label is identified by the first token of its completion (``format_example``: ``" " + label``); the
training graph shifts that token's logit at each row's first target (``export/training_graph.py``,
``answer_ids`` / ``answer_bias``). Labels sharing a first token are counted together.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import numpy as np

from device_runtime.data import IGNORE_INDEX, LocalDataset, TextEncoder, format_example
from device_runtime.errors import ConfigError

LOG_PRIOR_FLOOR = -20.0  # log pi of a label with no local example (pi ~ 2e-9): finite, so 0 * floor stays 0


def answer_token_ids(encoder: TextEncoder, labels: Sequence[str]) -> list[int]:
    """The distinct first completion tokens of ``labels``, in first-seen order.

    Raises:
        ConfigError: fewer than two labels, or a label whose completion has no token.
    """
    if len(set(labels)) < 2:
        raise ConfigError(f"logit adjustment needs at least two labels, got {list(labels)}")
    ids = []
    for label in labels:
        _, completion = format_example({"text": "", "label": label})
        tokens = encoder.tokenizer.encode(completion, add_special_tokens=False).ids
        if not tokens:
            raise ConfigError(f"label {label!r} has no token")
        if tokens[0] not in ids:
            ids.append(tokens[0])
    return ids


def first_targets(examples: Sequence[tuple[list[int], list[int]]]) -> list[int]:
    """The first target token of each encoded ``(input_ids, labels)`` example that has one."""
    firsts = []
    for _, labels in examples:
        first = next((t for t in labels if t != IGNORE_INDEX), None)
        if first is not None:
            firsts.append(first)
    return firsts


def answer_shift(answer_ids: Sequence[int], firsts: Sequence[int], tau: float) -> tuple[np.ndarray, np.ndarray]:
    """``(answer_ids (A,) int64, answer_bias (A,) float32)`` with ``answer_bias = tau * log pi``.

    ``pi`` is the share of each answer token among the local examples' first targets that are answer tokens;
    a token with no example gets :data:`LOG_PRIOR_FLOOR`. With no such example at all, every bias is 0.

    Raises:
        ConfigError: ``tau`` negative or not finite, or no answer id.
    """
    if not (math.isfinite(tau) and tau >= 0) or not answer_ids:
        raise ConfigError(f"logit adjustment needs answer ids and a finite tau >= 0, got {list(answer_ids)}, {tau}")
    wanted = set(answer_ids)
    counts = collections.Counter(t for t in firsts if t in wanted)
    total = sum(counts.values())
    log_prior = (
        [math.log(counts[t] / total) if counts[t] else LOG_PRIOR_FLOOR for t in answer_ids]
        if total
        else [0.0] * len(answer_ids)
    )
    return np.asarray(answer_ids, dtype=np.int64), (tau * np.asarray(log_prior)).astype(np.float32)


def local_answer_shift(
    dataset: LocalDataset, labels: Sequence[str] | None, tau: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """The answer shift of ``dataset``'s training split (a round's ``FitConfig.labels`` and ``logit_adjustment``);
    None when ``tau`` is 0.

    Raises:
        ConfigError: ``tau > 0`` without labels, or as :func:`answer_token_ids` / :func:`answer_shift`.
    """
    if not tau:
        return None
    if not labels:
        raise ConfigError("logit_adjustment > 0 needs the candidate labels (FitConfig.labels)")
    return answer_shift(answer_token_ids(dataset.encoder, labels), first_targets(dataset.train), tau)
