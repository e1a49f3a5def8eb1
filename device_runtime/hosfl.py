"""The HO-SFL step's math, shared by a split device and the coordinator (one definition for both sides).

HO-SFL (Chen, Wu, Wang, Chen, "Hybrid-Order Split Federated Learning with Backprop-Free Clients and
Dimension-Free Aggregation", arXiv 2603.14773, ICML 2026). The model is cut after decoder layer K-1: the device
computes the smashed data ``z = f_c(x; theta_c)`` ``(batch, seq_len, hidden)`` forward-only, the coordinator runs
the top with backprop and returns ``lambda = dL/dz``. The device's objective becomes the surrogate
``lambda^T f_c(x; theta_c)``, whose directional derivative along a shared direction ``u_p`` it estimates with one
perturbed forward (the paper's eq. for the client estimate, one-sided)::

    v_p = <lambda, f_c(x; theta + mu u_p) - z> / mu          p = 1..P

The coordinator averages ``v_p`` over the step's devices and every holder of ``theta`` (devices and the
coordinator's copy of the bottom) applies the same update (the paper's "dimension-free aggregation")::

    theta <- theta - lr * (1/P) * sum_p vbar_p u_p

``u_p`` is regenerated from :func:`step_seeds` over the global expert rows (``zo_directions.perturb_rows``), so
it never travels and a device holding any subset of the experts sees the rows it holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from device_runtime.zo_directions import perturb_rows

RowTensors = Sequence[tuple[str, np.ndarray, Sequence[int]]]  # (global name, (R, ...) float32, R global rows)


def step_seeds(seed: int, round_id: int, step: int, count: int) -> tuple[int, ...]:
    """The ``count`` (P) direction seeds of HO-SFL step ``step`` of round ``round_id`` (63-bit), derived from the
    round's FitConfig ``seed`` on both sides: they never travel."""
    state = np.random.SeedSequence([seed, round_id, step]).generate_state(count, np.uint64)
    return tuple(int(s) >> 1 for s in state)


def projected_scalar(gradient: np.ndarray, perturbed: np.ndarray, smashed: np.ndarray, mu: float) -> float:
    """``v = <lambda, f(theta + mu u) - z> / mu`` over all entries (float64 accumulation).

    Args:
        gradient: lambda, ``(batch, seq_len, hidden)``. perturbed: the smashed data at ``theta + mu u``.
        smashed: ``z`` at ``theta``, same shape. mu: the perturbation scale (> 0).
    """
    diff = perturbed.astype(np.float64) - smashed
    return float(np.vdot(gradient.astype(np.float64), diff) / mu)


def apply_step(tensors: RowTensors, seeds: Sequence[int], scalars: Sequence[float], learning_rate: float) -> None:
    """``theta <- theta - lr (1/P) sum_p scalars[p] u_p`` in place, with ``u_p`` regenerated from ``seeds[p]``."""
    for seed, scalar in zip(seeds, scalars):
        perturb_rows(tensors, seed, -learning_rate * float(scalar) / len(seeds))
