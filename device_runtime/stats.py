"""Routing statistics of local training: the HFedMoE expert-importance quantities per MoE layer.

Source: Fang et al., "HFedMoE: Resource-aware Heterogeneous Federated Learning with Mixture-of-Experts",
arXiv 2601.00583 (``docs/algorithms.md``). With router probabilities ``G(x) = Softmax(gate(x))`` over a
layer's E kept experts and B (non-padding) tokens x_1..x_B:

- usage / cumulative importance  ``u(e) = s_cum(e) = (1/B) sum_i G_e(x_i)``
- specific importance            ``s_spec(e) = max_i G_e(x_i)``
- routing KL                     ``KL_e = (1/B) sum_i G_e(x_i) log(G_e(x_i) / p(e))``, ``p(e) = s_cum(e)``.
  Since ``(1/B) sum_i G_e(x_i) = p(e)``, this is exactly
  ``KL_e = (1/B) sum_i G_e log G_e  -  p(e) log p(e)``  (with ``0 log 0 = 0``),
  so it accumulates over batches from the running sum of ``G log G``.
- batch importance ``s_b(e) = lam * s_cum(e) + (1 - lam) * s_spec(e)`` and information-bottleneck
  score ``I_b(e) = s_b(e) - beta * KL_e``.
- tokens_routed(e): tokens whose top-k holds e (e received gradient iff this is > 0).

Each training step's graph outputs ``routing_stats_{l}`` of shape ``(4, E_l)`` =
``[sum_i G_e, max_i G_e, sum_i G_e log G_e, tokens routed to e]`` and ``num_tokens`` (B of the batch);
:class:`RoutingStats` adds them up over steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_runtime.errors import ProtocolError

ROWS = 4  # sum G, max G, sum G log G, tokens routed
IMPORTANCE_LAMBDA = 0.5  # lambda of s_b (HFedMoE's default weight of s_cum against s_spec)
IMPORTANCE_BETA = 0.1  # beta of I_b (HFedMoE's default weight of the routing KL)


@dataclass(frozen=True)
class LayerRouting:
    """The HFedMoE quantities of one MoE layer, each of shape ``(E_l,)`` (local expert order).

    Attributes:
        usage: ``s_cum(e) = p(e) = u(e)``. specific: ``s_spec(e)``. kl: ``KL_e`` (nats).
        tokens_routed: int64 count of tokens whose top-k held e. num_tokens: B.
    """

    usage: np.ndarray
    specific: np.ndarray
    kl: np.ndarray
    tokens_routed: np.ndarray
    num_tokens: int

    def importance(self, lam: float = IMPORTANCE_LAMBDA) -> np.ndarray:
        """``s_b(e) = lam * s_cum(e) + (1 - lam) * s_spec(e)``, shape ``(E_l,)``."""
        return lam * self.usage + (1.0 - lam) * self.specific

    def information_score(self, lam: float = IMPORTANCE_LAMBDA, beta: float = IMPORTANCE_BETA) -> np.ndarray:
        """``I_b(e) = s_b(e) - beta * KL_e``, shape ``(E_l,)``."""
        return self.importance(lam) - beta * self.kl


def kl_from_sums(sum_g: np.ndarray, sum_glogg: np.ndarray, num_tokens: int) -> np.ndarray:
    """``KL_e = sum_glogg / B - p log p`` with ``p = sum_g / B`` and ``0 log 0 = 0``; shape ``(E,)``."""
    if num_tokens == 0:
        return np.zeros_like(sum_g, dtype=np.float64)
    p = np.asarray(sum_g, dtype=np.float64) / num_tokens
    p_log_p = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.asarray(sum_glogg, dtype=np.float64) / num_tokens - p_log_p


class RoutingStats:
    """Accumulates per-step routing statistics of every MoE layer.

    Args:
        experts_per_layer: E_l of each MoE layer (the bundle's ``shape_key.experts_per_layer``).
        expert_ids: optional global expert id of each local expert, per layer (travels in ``to_dict``).
    """

    def __init__(self, experts_per_layer: Sequence[int], expert_ids: Sequence[Sequence[int]] | None = None):
        self.experts_per_layer = tuple(int(e) for e in experts_per_layer)
        self.expert_ids = None if expert_ids is None else tuple(tuple(int(g) for g in ids) for ids in expert_ids)
        if self.expert_ids is not None and tuple(map(len, self.expert_ids)) != self.experts_per_layer:
            raise ValueError(f"expert_ids {self.expert_ids} disagree with experts_per_layer {self.experts_per_layer}")
        self._raw = [np.zeros((ROWS, e), dtype=np.float64) for e in self.experts_per_layer]
        self.num_tokens = 0

    def update(self, per_layer: Sequence[np.ndarray], num_tokens: int) -> None:
        """Add one batch: ``per_layer[l]`` of shape ``(4, E_l)`` (graph output ``routing_stats_{l}``).

        Raises:
            ValueError: wrong number of layers or a wrong shape.
        """
        if len(per_layer) != len(self._raw):
            raise ValueError(f"got stats of {len(per_layer)} layers, expected {len(self._raw)}")
        for raw, batch in zip(self._raw, per_layer):
            batch = np.asarray(batch, dtype=np.float64)
            if batch.shape != raw.shape:
                raise ValueError(f"routing stats of shape {batch.shape}, expected {raw.shape}")
            raw[0] += batch[0]
            raw[1] = np.maximum(raw[1], batch[1])
            raw[2] += batch[2]
            raw[3] += batch[3]
        self.num_tokens += int(num_tokens)

    def layer(self, index: int) -> LayerRouting:
        """The HFedMoE quantities of MoE layer ``index`` (position in the bundle's ``moe_layers``)."""
        raw, b = self._raw[index], self.num_tokens
        return LayerRouting(
            usage=raw[0] / b if b else np.zeros_like(raw[0]),
            specific=raw[1].copy(),
            kl=kl_from_sums(raw[0], raw[2], b),
            tokens_routed=np.rint(raw[3]).astype(np.int64),
            num_tokens=b,
        )

    @property
    def layers(self) -> list[LayerRouting]:
        return [self.layer(i) for i in range(len(self._raw))]

    def trained_experts(self) -> list[list[int]]:
        """Per layer, the local indices of experts that received at least one routed token (a gradient)."""
        return [np.flatnonzero(np.rint(raw[3]) > 0).tolist() for raw in self._raw]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able raw sums (exact: a receiver can keep accumulating)."""
        return {
            "num_tokens": self.num_tokens,
            "experts_per_layer": list(self.experts_per_layer),
            "expert_ids": None if self.expert_ids is None else [list(ids) for ids in self.expert_ids],
            "layers": [raw.tolist() for raw in self._raw],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingStats:
        """Parse and validate (finite, non-negative where it must be, shapes as declared).

        Raises:
            ProtocolError: code ``"bad_routing_stats"`` on any malformed field.
        """
        try:
            stats = cls(data["experts_per_layer"], data.get("expert_ids"))
            stats.num_tokens = int(data["num_tokens"])
            layers = [np.asarray(layer, dtype=np.float64) for layer in data["layers"]]
            _check_layers(layers, stats.experts_per_layer, stats.num_tokens)
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("bad_routing_stats", f"malformed routing statistics: {exc}") from exc
        stats._raw = layers
        return stats


def _check_layers(layers: list[np.ndarray], experts_per_layer: tuple[int, ...], num_tokens: int) -> None:
    """Raise ProtocolError unless every layer is a finite ``(4, E_l)`` array consistent with ``num_tokens``."""
    if num_tokens < 0 or len(layers) != len(experts_per_layer):
        raise ProtocolError("bad_routing_stats", "negative num_tokens or wrong number of layers")
    for layer, experts in zip(layers, experts_per_layer):
        if layer.shape != (ROWS, experts) or not np.all(np.isfinite(layer)):
            raise ProtocolError(
                "bad_routing_stats", f"layer of shape {layer.shape} (need {(ROWS, experts)}) or non-finite values"
            )
        sum_g, max_g, sum_glogg, routed = layer
        tol = 1e-6 * max(1, num_tokens)
        if (
            np.any(sum_g < 0)
            or np.any(sum_g > num_tokens + tol)
            or np.any((max_g < 0) | (max_g > 1 + 1e-6))
            or np.any(sum_glogg > tol)
            or np.any(sum_glogg < -num_tokens / math.e - tol)
            or np.any(routed < 0)
            or np.any(routed > num_tokens + tol)
        ):
            raise ProtocolError("bad_routing_stats", "routing statistics outside their possible range")
