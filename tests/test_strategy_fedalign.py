"""FedAlign-MoE against hand-computed values: aligned experts, fallback, router weighting, routing prior."""

import numpy as np
import pytest
from helpers import make_update, tiny_context

from coordinator.strategy import ClientInfo, FedAlign, cosine_similarity, kl_divergence
from device_runtime.errors import ConfigError


def _global():
    return {
        "experts.w": np.array([[1, 1], [0, 0], [0, 0], [7, 7]], np.float32),
        "gate.weight": np.array([[0, 0], [0, 0], [0, 0], [9, 9]], np.float32),
        "attn.w": np.array([0, 0], np.float32),
    }


def _clients():
    # update directions: expert 0: a [2,0], b [4,0], c [-3,0] -> mean [1,0]: cosines 1, 1, -1
    #                    expert 1: a [1,0], b [0,1] -> mean [.5,.5]: cosines 0.7071 (< 0.8: fallback)
    #                    expert 2: c [5,5] alone: cosine 1
    a = make_update("a", 1, (0, 1), [[3, 1], [1, 0]], [[1, 1], [2, 2]], [1, 1], usage=[0.75, 0.25])
    b = make_update("b", 1, (0, 1), [[5, 1], [0, 1]], [[3, 3], [4, 4]], [2, 2], usage=[0.5, 0.5])
    c = make_update("c", 1, (0, 2), [[-2, 1], [5, 5]], [[5, 5], [6, 6]], [6, 6], usage=[0.9, 0.1])
    return [a, b, c]


def test_expert_alignment_by_hand():
    strategy = FedAlign(threshold=0.8, num_experts=(4,))
    out, metrics, _ = strategy.aggregate_fit(1, _clients(), [], _global())
    np.testing.assert_allclose(
        out["experts.w"],
        [
            [4, 1],  # aligned a, b: ([3,1] + [5,1]) / 2
            [0.5, 0.5],  # none aligned: all holders
            [5, 5],  # c alone
            [7, 7],
        ],
    )  # unheld: unchanged
    np.testing.assert_allclose(out["attn.w"], [3, 3])  # (1 + 2 + 6) / 3
    assert metrics["aligned_fraction"] == pytest.approx(3 / 6)
    assert metrics["fallback_experts"] == 1


def test_router_usage_weighting_by_hand():
    out, _, _ = FedAlign(router_weighting="usage").aggregate_fit(1, _clients(), [], _global())
    e0 = (0.75 * 1 + 0.5 * 3 + 0.9 * 5) / (0.75 + 0.5 + 0.9)
    e1 = (0.25 * 2 + 0.5 * 4) / (0.25 + 0.5)
    np.testing.assert_allclose(out["gate.weight"], [[e0, e0], [e1, e1], [6, 6], [9, 9]], rtol=1e-6)


def test_router_kl_weighting_by_hand():
    out, _, _ = FedAlign(router_weighting="kl", num_experts=(4,)).aggregate_fit(1, _clients(), [], _global())
    # uniform prior restricted to two kept experts is [.5, .5]
    w_a = 1 / (1 + 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5))
    w_b = 1.0
    w_c = 1 / (1 + 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5))
    e0 = (w_a * 1 + w_b * 3 + w_c * 5) / (w_a + w_b + w_c)
    e1 = (w_a * 2 + w_b * 4) / (w_a + w_b)
    np.testing.assert_allclose(out["gate.weight"], [[e0, e0], [e1, e1], [6, 6], [9, 9]], rtol=1e-6)


def test_routing_prior_is_state_between_rounds():
    strategy = FedAlign(routing_reg_coef=0.05, num_experts=(4,)).bind(tiny_context())
    clients = [ClientInfo("a", {"memory_mib": 1e6})]
    config = strategy.configure_fit(1, _global(), clients)["a"].config
    assert (config.routing_reg_coef, config.routing_prior) == (0.05, ((0.25,) * 4,))
    _, _, state = strategy.aggregate_fit(1, _clients(), [], _global())
    mean_usage = np.array([(0.75 + 0.5 + 0.9) / 3, (0.25 + 0.5) / 2, 0.1, 0.25])  # expert 3 keeps 0.25
    prior = strategy.configure_fit(2, _global(), clients, state)["a"].config.routing_prior
    np.testing.assert_allclose(prior, [mean_usage / mean_usage.sum()])
    assert strategy.configure_fit(2, _global(), clients)["a"].config.routing_prior == ((0.25,) * 4,)  # no state


def test_two_passes_over_a_factory_and_one_shot_iterators_refused():
    clients = _clients()
    from_list, _, _ = FedAlign(threshold=0.8).aggregate_fit(1, clients, [], _global())
    from_factory, _, _ = FedAlign(threshold=0.8).aggregate_fit(1, lambda: iter(clients), [], _global())
    for name in from_list:
        np.testing.assert_array_equal(from_list[name], from_factory[name])
    with pytest.raises(TypeError, match="twice"):
        FedAlign().aggregate_fit(1, iter(clients), [], _global())


def test_helpers_and_parameter_checks():
    assert kl_divergence(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    assert kl_divergence(np.array([1.0, 0.0]), np.array([0.25, 0.75])) == pytest.approx(np.log(4))
    np.testing.assert_allclose(
        cosine_similarity(np.array([1.0, 0.0]), np.array([2.0, 0.0]), np.array([2.0, 4.0])), [0.5, 0.0]
    )
    with pytest.raises(ConfigError):
        FedAlign(router_weighting="entropy")
    with pytest.raises(ConfigError):
        FedAlign(threshold=2.0)
