"""What a securely aggregated round gives a strategy: per-row sums over each row's holders, never one device's rows
(``coordinator.secagg``; a strategy merges them in ``Strategy.aggregate_secure``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.strategy.aggregate import RowCombine
from coordinator.strategy.types import Failure, Params


@dataclass
class SecureRows:
    """The unmasked sums of one secure round, per tensor in the global layout with the expert axis first and the
    rest flattened: ``(E, row size)``, ``(1, size)`` for a tensor not indexed by expert.

    Attributes:
        sums: the holders' weighted deltas summed per row (float64). totals: their weights summed per row
            ``(E,)``. holders: how many devices were summed per row ``(E,)`` (0: not aggregated).
        min_holders: rows with fewer holders are left unchanged. num_clients: devices summed (|S|).
        dropped: devices that sent shares but whose rows were not summed (|U2 \\ S|).
        rows_below_min: distinct (tensor, row) some assigned device trained that were not aggregated.
    """

    sums: dict[str, np.ndarray]
    totals: dict[str, np.ndarray]
    holders: dict[str, np.ndarray]
    min_holders: int
    num_clients: int
    dropped: int = 0
    rows_below_min: int = 0

    def apply(self, global_params: Params, combine: RowCombine, *, by_weight: bool) -> Params:
        """The new model: ``combine(name, base rows, sums, totals)`` on every aggregated row (``(k, row size)``
        each; ``totals`` the weight sums if ``by_weight``, else the holder counts), the global rows elsewhere.
        Tensors nobody aggregated are the same array objects."""
        out = dict(global_params)
        for name, sums in self.sums.items():
            reference = global_params[name]
            merged = reference.reshape(sums.shape).astype(np.float64)
            counts = self.holders[name]
            totals = self.totals[name] if by_weight else counts.astype(np.float64)
            held = (counts >= self.min_holders) & (totals > 0)
            if held.any():
                merged[held] = combine(name, merged[held], sums[held], totals[held])
            out[name] = merged.reshape(reference.shape).astype(reference.dtype)
        return out

    def metrics(self, server_round: int, failures: Sequence[Failure]) -> dict[str, Any]:
        """The round's metrics (``round``, ``num_clients``, ``num_failures``, ``failures`` as every strategy's, and
        ``secagg_dropped``, ``secagg_rows``: rows aggregated, ``secagg_rows_below_min``)."""
        return {
            "round": server_round,
            "num_clients": self.num_clients,
            "num_failures": len(failures),
            "failures": {str(client): str(reason) for client, reason in failures},
            "secagg_dropped": self.dropped,
            "secagg_rows": int(sum(int(np.sum(c >= self.min_holders)) for c in self.holders.values())),
            "secagg_rows_below_min": self.rows_below_min,
        }
