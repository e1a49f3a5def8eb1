"""HFedMoE expert importance and budgeted expert selection (Fang et al., arXiv 2601.00583), pure numpy.

With router probabilities G(x) = Softmax(gate(x)) over E experts and a batch of B tokens:

- cumulative score   s_cum(e)  = (1/B) sum_i G_e(x_i)
- specific score     s_spec(e) = max_i G_e(x_i)
- importance score   s_b(e)    = lambda s_cum(e) + (1 - lambda) s_spec(e)
- bottleneck term    KL_e      = (1/B) sum_i G_e(x_i) log(G_e(x_i) / p(e)),  p(e) = (1/B) sum_j G_e(x_j)
- information score  I_b(e)    = s_b(e) - beta KL_e

Budgeted selection maximises sum_e I_b(e) under the device's budget; with equal-size experts that is the
top-C experts of each layer, C = the number of experts the budget affords per layer.
"""

from __future__ import annotations

import numpy as np

from device_runtime.errors import BudgetError, ConfigError


def routing_statistics(gate_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(s_cum, s_spec, kl)`` of one layer's router probabilities.

    Args:
        gate_probs: G(x_i), ``(num_tokens, num_experts)``, rows summing to 1.
    Returns:
        three ``(num_experts,)`` arrays; s_cum is also the usage u(e). 0 log 0 counts as 0.
    Raises:
        ConfigError: ``gate_probs`` is not 2-D with at least one token.
    """
    probs = np.asarray(gate_probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ConfigError(f"gate_probs must be (num_tokens, num_experts), got shape {probs.shape}")
    s_cum = probs.mean(axis=0)
    s_spec = probs.max(axis=0)
    ratio = np.divide(probs, s_cum, out=np.ones_like(probs), where=probs > 0)
    kl = (probs * np.log(ratio)).mean(axis=0)
    return s_cum, s_spec, kl


def importance(s_cum: np.ndarray, s_spec: np.ndarray, kl: np.ndarray, lam: float, beta: float) -> np.ndarray:
    """I(e) = lam * s_cum(e) + (1 - lam) * s_spec(e) - beta * KL_e, elementwise ``(num_experts,)``.

    Raises:
        ConfigError: ``lam`` outside [0, 1] or ``beta`` negative.
    """
    if not 0.0 <= lam <= 1.0 or not beta >= 0.0:
        raise ConfigError(f"need 0 <= lam <= 1 and beta >= 0, got lam={lam}, beta={beta}")
    return (lam * np.asarray(s_cum, np.float64) + (1.0 - lam) * np.asarray(s_spec, np.float64)
            - beta * np.asarray(kl, np.float64))


def top_c(scores: np.ndarray, c: int) -> tuple[int, ...]:
    """Ids of the ``c`` highest scores, ascending by id; ties go to the lower id.

    Raises:
        BudgetError: ``c`` is not in [1, len(scores)].
    """
    scores = np.asarray(scores, np.float64)
    if not 1 <= c <= scores.shape[0]:
        raise BudgetError(f"cannot keep {c} of {scores.shape[0]} experts")
    order = np.argsort(-scores, kind="stable")
    return tuple(sorted(int(e) for e in order[:c]))


def experts_per_layer(budget_bytes: int, expert_bytes: int, num_moe_layers: int, num_experts: int) -> int:
    """C: experts per layer that equal-size experts fit in ``budget_bytes`` (the same C in every layer).

    Args:
        budget_bytes: memory the device can give to trainable expert weights (bytes).
        expert_bytes: size of one expert's trainable state (bytes), > 0.
        num_moe_layers: MoE layers in the model. num_experts: experts per layer.
    Returns:
        min(num_experts, budget_bytes // (expert_bytes * num_moe_layers)).
    Raises:
        BudgetError: the budget does not afford one expert per layer.
    """
    if expert_bytes <= 0 or num_moe_layers <= 0:
        raise ConfigError("expert_bytes and num_moe_layers must be positive")
    c = min(num_experts, budget_bytes // (expert_bytes * num_moe_layers))
    if c < 1:
        raise BudgetError(f"a budget of {budget_bytes / 2**20:.1f} MiB does not fit one expert per layer "
                          f"({expert_bytes * num_moe_layers / 2**20:.1f} MiB); raise the budget or use LoRA mode")
    return int(c)


def select_experts(scores_per_layer: list[np.ndarray], c: int) -> tuple[tuple[int, ...], ...]:
    """Budgeted selection with equal-size experts: the top-``c`` experts by I(e) in every layer.

    Args:
        scores_per_layer: I(e) of each MoE layer, each ``(num_experts,)``.
        c: experts kept per layer (see :func:`experts_per_layer`).
    Returns:
        per layer, the kept global expert ids in ascending order (a ``Manifest.expert_ids``).
    """
    return tuple(top_c(scores, c) for scores in scores_per_layer)
