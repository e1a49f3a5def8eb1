"""HFedMoE aggregation against hand-computed values (the importance math: tests/test_device_stats.py)."""

from dataclasses import replace

import numpy as np
import pytest
from helpers import make_update, tiny_context, tiny_global

from coordinator.strategy import ClientInfo, FedAvg, HFedMoE, hfedmoe_alpha
from device_runtime.errors import ConfigError

GATE_A = [[1, 0], [0, 1]]
GATE_B = [[2, 0], [0, 2]]
GATE_C = [[4, 4], [8, 8]]


def _three_clients():
    a = make_update(
        "a", 1, (0, 1), [[1, 2], [3, 4]], GATE_A, [1, 1], trained=(0, 1), usage=[0.7, 0.3], s_spec=[0.9, 0.5]
    )
    b = make_update(
        "b", 3, (1, 2), [[5, 6], [7, 8]], GATE_B, [5, 5], trained=(2,), usage=[0.6, 0.4], s_spec=[0.8, 0.6]
    )  # holds expert 1 but did not train it
    c = make_update(
        "c", 2, (0, 2), [[9, 10], [11, 12]], GATE_C, [2, 2], trained=(0, 2), usage=[0.9, 0.1], s_spec=[1.0, 0.3]
    )  # expert 2 below tau
    return [a, b, c]


def test_hfedmoe_experts_by_hand():
    out, metrics, _ = HFedMoE(tau=0.2, lam=0.5).aggregate_fit(1, _three_clients(), [], tiny_global())
    np.testing.assert_allclose(
        out["experts.w"],
        [
            [19 / 3, 22 / 3],  # (1*[1,2] + 2*[9,10]) / 3
            [3, 4],  # b held 1 untrained: a only
            [7, 8],  # c's usage 0.1 < tau: b only
            [30, 30],
        ],
    )  # unheld: unchanged
    np.testing.assert_allclose(out["attn.w"], [20 / 6, 20 / 6])  # (1*1 + 3*5 + 2*2) / 6
    assert metrics["experts_updated"] == {0: 3}


def test_hfedmoe_router_rows_by_hand():
    # s = 0.5 s_cum + 0.5 s_spec; alpha = sum(u * s) / 4
    alpha_a = (0.7 * 0.8 + 0.3 * 0.4) / 4  # 0.17
    alpha_b = (0.6 * 0.7 + 0.4 * 0.5) / 4  # 0.155
    alpha_c = (0.9 * 0.95 + 0.1 * 0.2) / 4  # 0.21875
    assert (alpha_a, alpha_b, alpha_c) == pytest.approx((0.17, 0.155, 0.21875))
    out, _, _ = HFedMoE(tau=0.2, lam=0.5).aggregate_fit(1, _three_clients(), [], tiny_global())
    # local rows: a e0 [1,0], a e1 [0,1]; b e1 [2,0], b e2 [0,2]; c e0 [4,4], c e2 [8,8]
    expected = [
        [(0.17 * 1 + 0.21875 * 4) / 0.38875, (0.17 * 0 + 0.21875 * 4) / 0.38875],  # expert 0: holders a, c
        [(0.17 * 0 + 0.155 * 2) / 0.325, (0.17 * 1 + 0.155 * 0) / 0.325],  # expert 1: holders a, b
        [(0.155 * 0 + 0.21875 * 8) / 0.37375, (0.155 * 2 + 0.21875 * 8) / 0.37375],  # expert 2: b, c
        [9, 9],  # unheld: unchanged
    ]
    np.testing.assert_allclose(out["gate.weight"], expected, rtol=1e-6)


def test_a_one_expert_router_row_does_not_count():
    # d held only expert 0: its router row is untrainable (softmax over one logit), so it gets weight 0;
    # its expert row and unindexed tensor count as usual
    d = make_update("d", 4, (0,), [[41, 42]], [[100, 100]], [9, 9], usage=[1.0], s_spec=[1.0])
    out, _, _ = HFedMoE(tau=0.2, lam=0.5).aggregate_fit(1, _three_clients() + [d], [], tiny_global())
    np.testing.assert_allclose(
        out["gate.weight"][0], [(0.17 * 1 + 0.21875 * 4) / 0.38875, (0.17 * 0 + 0.21875 * 4) / 0.38875], rtol=1e-6
    )
    np.testing.assert_allclose(out["experts.w"][0], [(1 * 1 + 2 * 9 + 4 * 41) / 7, (1 * 2 + 2 * 10 + 4 * 42) / 7])
    alone, _, _ = HFedMoE().aggregate_fit(1, [d], [], tiny_global())
    np.testing.assert_array_equal(alone["gate.weight"], tiny_global()["gate.weight"])  # no trained row: unchanged


def test_hfedmoe_equals_fedavg_when_everyone_holds_and_trains_everything():
    rng = np.random.default_rng(2)
    rows = [rng.normal(size=(4, 2)) for _ in range(3)]

    def updates(n):
        return [
            make_update(
                f"c{i}", n[i], (0, 1, 2, 3), rows[i], rows[i] + 1, rows[i][0], usage=[0.25] * 4, s_spec=[0.5] * 4
            )
            for i in range(3)
        ]

    same_n = [4, 4, 4]
    h, _, _ = HFedMoE(tau=0.1).aggregate_fit(1, updates(same_n), [], tiny_global())
    f, _, _ = FedAvg().aggregate_fit(1, updates(same_n), [], tiny_global())
    for name in f:
        np.testing.assert_allclose(h[name], f[name], rtol=1e-6)
    # unequal |D_c|: experts still agree (both weight by num_examples); the router uses alpha instead
    h, _, _ = HFedMoE(tau=0.1).aggregate_fit(1, updates([1, 2, 7]), [], tiny_global())
    f, _, _ = FedAvg().aggregate_fit(1, updates([1, 2, 7]), [], tiny_global())
    np.testing.assert_allclose(h["experts.w"], f["experts.w"], rtol=1e-6)
    assert not np.allclose(h["gate.weight"], f["gate.weight"])


def test_hfedmoe_config_and_parameter_checks():
    context, client = tiny_context(), ClientInfo("a", {"memory_mib": 1e6})
    fit = HFedMoE(lam=0.3, beta=0.2).bind(context).configure_fit(1, tiny_global(), [client])["a"]
    assert fit.expert_ids == ((0, 1, 2, 3),) and fit.config == replace(context.fit, seed=8)
    with pytest.raises(ConfigError):
        HFedMoE(tau=1.5)


def test_alpha_by_hand():
    assert hfedmoe_alpha(np.array([0.5, 0.5]), np.array([0.2, 0.6]), 8) == pytest.approx(0.05)
