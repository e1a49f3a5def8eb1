"""The aggregation math as pure numpy, testable without a server (Flower's ``aggregate.py``).

:class:`RowAccumulator` is the streaming core: it takes client tensors one at a time and keeps, per
tensor, a running weighted sum in the global layout (float64) plus a weight total per expert row, so
memory is O(model size) whatever the number of clients. A row whose total weight stays 0 (no client
contributed it) keeps its base value, which is how every strategy leaves unheld experts unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from coordinator.strategy.types import Params
from device_runtime.bundle import TensorSpec

_EPS = 1e-12


RowCombine = Callable[[str, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``(tensor name, base rows (k, ...), sum rows (k, ...), totals (k,)) -> new rows (k, ...)`` of the k rows with a
positive total (float64); :meth:`RowAccumulator.finish` divides the sums by the totals without one."""


def expert_rows(tensor: np.ndarray, axis: int | None) -> np.ndarray:
    """View of ``tensor`` with the expert axis first: ``(E, ...)``; an unindexed tensor becomes ``(1, ...)``."""
    return tensor[None] if axis is None else np.moveaxis(tensor, axis, 0)


def _broadcast(weights: np.ndarray, ndim: int) -> np.ndarray:
    return weights.reshape(weights.shape + (1,) * (ndim - 1))


class RowAccumulator:
    """Running weighted sums per expert row and weight totals; ``finish`` turns them into averages.

    Memory: one float64 array per tensor touched (the global shape) plus one ``(E,)`` total per tensor.
    """

    def __init__(self, global_params: Params):
        self._global = global_params
        self._sums: dict[str, np.ndarray] = {}
        self._totals: dict[str, np.ndarray] = {}
        self._axes: dict[str, int | None] = {}

    def add(
        self, name: str, tensor: np.ndarray, meta: TensorSpec, ids: Sequence[int], weights: np.ndarray | float
    ) -> None:
        """Add ``weights * tensor`` to the sums of the rows ``ids``.

        Args:
            name: global tensor name (validated beforehand, see ``validate_update``).
            tensor: the client's pruned tensor, ``len(ids)`` entries on ``meta.expert_axis``.
            meta: the tensor's role, layer and expert axis.
            ids: global expert id of each local row (ignored for unindexed tensors).
            weights: ``(len(ids),)`` weight per local row, or a scalar for an unindexed tensor.
        """
        axis = meta.expert_axis
        if name not in self._sums:
            reference = self._global[name]
            self._sums[name] = np.zeros(reference.shape, np.float64)
            self._totals[name] = np.zeros(expert_rows(reference, axis).shape[0], np.float64)
            self._axes[name] = axis
        rows = expert_rows(tensor, axis)  # (k, ...)
        index = ids if axis is not None else (0,)
        w = np.broadcast_to(np.asarray(weights, np.float64), (len(index),))
        sums = expert_rows(self._sums[name], axis)  # (E, ...), a view
        for local, (row, weight) in enumerate(zip(index, w)):
            if weight != 0.0:  # one row at a time: temporaries stay the size of one expert
                sums[row] += weight * rows[local]
        self._totals[name][list(index)] += w

    def totals(self, name: str) -> np.ndarray | None:
        """Weight total per global row of ``name`` (``(E,)``, or ``(1,)`` unindexed); None if never added."""
        return self._totals.get(name)

    def added_totals(self, name: str) -> np.ndarray:
        """:meth:`totals` of a tensor known to have been added: ``(E,)``, or ``(1,)`` unindexed.

        Raises:
            KeyError: ``name`` was never added.
        """
        return self._totals[name]

    def finish(self, base: Params | None = None, combine: RowCombine | None = None) -> Params:
        """Weighted averages (or ``combine`` of the held rows); rows with zero total weight take ``base``
        (default: the global model).

        Call once: the running sums are released tensor by tensor as they are averaged (the weight
        totals stay readable).

        Returns:
            a new dict with every tensor of ``base``; tensors nobody touched are the same array objects.
        """
        base = self._global if base is None else base
        out = dict(base)
        for name in list(self._sums):
            sums = self._sums.pop(name)
            axis, totals = self._axes[name], self._totals[name]
            merged = expert_rows(base[name], axis).astype(np.float64)  # a copy: (E, ...)
            held = totals > 0
            if combine is None:
                merged[held] = expert_rows(sums, axis)[held] / _broadcast(totals[held], merged.ndim)
            else:
                merged[held] = combine(name, merged[held], expert_rows(sums, axis)[held], totals[held])
            restored = merged[0] if axis is None else np.moveaxis(merged, 0, axis)
            out[name] = restored.astype(self._global[name].dtype)
        return out


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) = sum_e p(e) log(p(e) / q(e)) of two distributions over the same experts (0 log 0 = 0).

    Both are normalised to sum 1 first; ``q`` is floored at 1e-12 to stay finite.
    """
    p = np.asarray(p, np.float64) / max(float(np.sum(p)), _EPS)
    q = np.maximum(np.asarray(q, np.float64) / max(float(np.sum(q)), _EPS), _EPS)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def cosine_similarity(dot: np.ndarray, sq_norm_a: np.ndarray, sq_norm_b: np.ndarray) -> np.ndarray:
    """Cosine from sufficient statistics: dot / sqrt(|a|^2 |b|^2), elementwise; 0 where a norm is 0."""
    denom = np.sqrt(np.asarray(sq_norm_a, np.float64) * np.asarray(sq_norm_b, np.float64))
    return np.where(denom > _EPS, np.asarray(dot, np.float64) / np.maximum(denom, _EPS), 0.0)


def weighted_loss_avg(results: Sequence[tuple[int, float]]) -> float:
    """Flower's ``weighted_loss_avg``: ``sum_c n_c * loss_c / sum_c n_c`` over ``(num_examples, loss)`` pairs.

    Raises:
        ValueError: no pair, or the examples sum to 0.
    """
    total = sum(int(n) for n, _ in results)
    if total <= 0:
        raise ValueError("weighted_loss_avg needs at least one result with num_examples > 0")
    return float(sum(int(n) * float(loss) for n, loss in results) / total)


def weighted_metrics_avg(results: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """Each metric's example-weighted mean over the clients that reported it (Flower's ``weighted_average`` of its
    examples, for every metric name): ``m = sum_c n_c * m_c / sum_c n_c`` with c over the clients whose metrics hold
    ``m``; a metric reported by no client with examples is absent."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for n, metrics in results:
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + int(n) * float(value)
            weights[name] = weights.get(name, 0) + int(n)
    return {name: sums[name] / weights[name] for name in sums if weights[name] > 0}
