"""HFedMoE routing statistics (Fang et al., arXiv 2601.00583) against direct numpy computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_runtime.errors import ProtocolError
from device_runtime.stats import IMPORTANCE_BETA, IMPORTANCE_LAMBDA, RoutingStats, kl_from_sums

TOP_K = 2


def graph_output(probs: np.ndarray) -> np.ndarray:
    """What a training graph emits for ``probs`` of shape (B, E): the (4, E) routing_stats rows."""
    top = np.argsort(-probs, axis=1)[:, :TOP_K]
    routed = np.zeros(probs.shape[1])
    np.add.at(routed, top.ravel(), 1)
    return np.stack([probs.sum(0), probs.max(0), (probs * np.log(probs)).sum(0), routed])


def random_probs(rng, tokens, experts):
    logits = rng.normal(size=(tokens, experts)) * 2
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_accumulated_stats_equal_direct_computation_over_all_tokens():
    rng = np.random.default_rng(0)
    sizes = (5, 3)
    stats = RoutingStats(sizes, expert_ids=[(0, 4, 7, 9, 11), (2, 3, 5)])
    batches = [[random_probs(rng, b, e) for e in sizes] for b in (7, 13, 1)]
    for per_layer in batches:
        stats.update([graph_output(p) for p in per_layer], len(per_layer[0]))
    assert stats.num_tokens == 21
    for l in range(len(sizes)):
        g = np.concatenate([per_layer[l] for per_layer in batches])  # (B, E)
        p = g.mean(axis=0)
        layer = stats.layer(l)
        np.testing.assert_allclose(layer.usage, p, rtol=1e-12)
        np.testing.assert_allclose(layer.specific, g.max(axis=0), rtol=1e-12)
        np.testing.assert_allclose(layer.kl, (g * np.log(g / p)).mean(axis=0), rtol=1e-9, atol=1e-14)
        top = np.argsort(-g, axis=1)[:, :TOP_K]
        np.testing.assert_array_equal(layer.tokens_routed, np.bincount(top.ravel(), minlength=sizes[l]))
        lam, beta = 0.3, 0.7
        np.testing.assert_allclose(
            layer.information_score(lam, beta),
            lam * p + (1 - lam) * g.max(axis=0) - beta * (g * np.log(g / p)).mean(axis=0),
        )


def test_importance_by_hand():
    # G = [[0.5, 0.5], [1.0, 0.0]]: s_cum (0.75, 0.25), s_spec (1, 0.5),
    # KL_0 = (1/2)(0.5 ln(0.5/0.75) + 1 ln(1/0.75)), KL_1 = (1/2)(0.5 ln(0.5/0.25) + 0)
    stats = RoutingStats([2])
    half = 0.5 * np.log(0.5)
    stats.update([np.array([[1.5, 0.5], [1.0, 0.5], [half, half], [2, 1]])], 2)
    layer = stats.layer(0)
    np.testing.assert_allclose(layer.kl, [0.0424747, 0.1732868], rtol=1e-5)
    np.testing.assert_allclose(layer.importance(), [0.875, 0.375])  # lam = IMPORTANCE_LAMBDA = 0.5
    np.testing.assert_allclose(layer.information_score(0.5, 1.0), [0.8325253, 0.2017132], rtol=1e-5)
    assert (IMPORTANCE_LAMBDA, IMPORTANCE_BETA) == (0.5, 0.1)  # HFedMoE's defaults, defined here only


def test_kl_hand_computed_and_zero_usage():
    # two tokens, G_0 = (0.5, 0.25): p = 0.375, KL = 0.5*(0.5 ln(0.5/0.375) + 0.25 ln(0.25/0.375))
    expected = 0.5 * (0.5 * np.log(0.5 / 0.375) + 0.25 * np.log(0.25 / 0.375))
    sum_glogg = 0.5 * np.log(0.5) + 0.25 * np.log(0.25)
    np.testing.assert_allclose(
        kl_from_sums(np.array([0.75, 0.0]), np.array([sum_glogg, 0.0]), 2), [expected, 0.0], rtol=1e-12
    )
    assert kl_from_sums(np.zeros(3), np.zeros(3), 0).tolist() == [0.0, 0.0, 0.0]


def test_trained_experts_are_those_with_routed_tokens():
    stats = RoutingStats([3])
    stats.update([np.array([[1.0, 0.5, 0.1], [0.9, 0.5, 0.1], [-0.2, -0.3, -0.2], [2, 0, 1]])], 2)
    assert stats.trained_experts() == [[0, 2]]


def test_dict_round_trip_through_json_and_keeps_accumulating():
    rng = np.random.default_rng(1)
    stats = RoutingStats([4])
    stats.update([graph_output(random_probs(rng, 6, 4))], 6)
    copy = RoutingStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    more = graph_output(random_probs(rng, 3, 4))
    stats.update([more], 3)
    copy.update([more], 3)
    np.testing.assert_allclose(copy.layer(0).kl, stats.layer(0).kl)
    assert copy.num_tokens == 9 and copy.expert_ids is None


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d["layers"][0][0].__setitem__(0, float("nan")),
        lambda d: d["layers"][0][1].__setitem__(0, 1.5),  # a probability above 1
        lambda d: d["layers"][0][0].__setitem__(0, 100.0),  # sum G above num_tokens
        lambda d: d["layers"][0].pop(),  # wrong shape
        lambda d: d.pop("num_tokens"),
        lambda d: d.__setitem__("expert_ids", [[1]]),  # disagrees with experts_per_layer
    ],
)
def test_from_dict_rejects_malformed(corrupt):
    rng = np.random.default_rng(2)
    stats = RoutingStats([2])
    stats.update([graph_output(random_probs(rng, 4, 2))], 4)
    data = json.loads(json.dumps(stats.to_dict()))
    corrupt(data)
    with pytest.raises(ProtocolError) as info:
        RoutingStats.from_dict(data)
    assert info.value.code == "bad_routing_stats"
