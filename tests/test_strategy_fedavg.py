"""FedAvg, FedProx and FedMoE against hand-computed values (tiny_global: experts 0..3 rows [10e, 10e])."""

import numpy as np
import pytest
from helpers import make_update, tiny_context, tiny_global

from coordinator.strategy import FedAvg, FedMoE, FedProx


def _two_clients():
    a = make_update("a", 1, (0, 1), [[1, 2], [3, 4]], [[1, 0], [0, 1]], [1, 1])
    b = make_update("b", 3, (1, 2), [[5, 6], [7, 8]], [[2, 2], [4, 4]], [5, 5])
    return [a, b]


def test_fedavg_by_hand():
    out, metrics, _ = FedAvg().aggregate_fit(1, _two_clients(), [], tiny_global())
    np.testing.assert_allclose(
        out["experts.w"],
        [
            [1, 2],  # only a holds expert 0
            [4.5, 5.5],  # (1*[3,4] + 3*[5,6]) / 4
            [7, 8],  # only b holds expert 2
            [30, 30],
        ],
    )  # nobody: unchanged
    np.testing.assert_allclose(out["gate.weight"], [[1, 0], [1.5, 1.75], [4, 4], [9, 9]])
    np.testing.assert_allclose(out["attn.w"], [4, 4])  # (1*1 + 3*5) / 4
    assert metrics["experts_updated"] == {0: 3} and metrics["num_examples"] == 4


def test_fedavg_dense_is_plain_weighted_mean():
    rng = np.random.default_rng(1)
    rows = [rng.normal(size=(4, 2)) for _ in range(3)]
    n = [2, 5, 3]
    updates = [make_update(f"c{i}", n[i], (0, 1, 2, 3), rows[i], rows[i], rows[i][0]) for i in range(3)]
    out, _, _ = FedAvg().aggregate_fit(1, updates, [], tiny_global())
    expected = (2 * rows[0] + 5 * rows[1] + 3 * rows[2]) / 10
    np.testing.assert_allclose(out["experts.w"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["attn.w"], expected[0], rtol=1e-6)


def test_fedprox_sends_mu_and_aggregates_like_fedavg():
    strategy = FedProx(prox_mu=0.05)
    assert strategy.bind(tiny_context()).fit_config(1).prox_mu == 0.05
    prox, _, _ = strategy.aggregate_fit(1, _two_clients(), [], tiny_global())
    avg, _, _ = FedAvg().aggregate_fit(1, _two_clients(), [], tiny_global())
    for name in avg:
        np.testing.assert_array_equal(prox[name], avg[name])


def test_fedmoe_unheld_unchanged_single_copied_shared_averaged():
    a = make_update("a", 2, (0, 1), [[1, 1], [2, 2]], [[1, 1], [1, 1]], [0, 0])
    b = make_update("b", 6, (1,), [[6, 6]], [[5, 5]], [0, 0])
    out, _, _ = FedMoE().aggregate_fit(1, [a, b], [], tiny_global())
    np.testing.assert_allclose(
        out["experts.w"],
        [
            [1, 1],  # held by a only: copied
            [5, 5],  # shared: (2*2 + 6*6) / 8
            [20, 20],  # unheld: unchanged
            [30, 30],
        ],
    )
    np.testing.assert_allclose(out["gate.weight"][1], [4, 4])  # (2*1 + 6*5) / 8


def test_fedadam_and_fedyogi_step_on_the_fedavg_delta_by_hand():
    from coordinator.strategy import from_name

    start = tiny_global()
    adam, yogi = (
        from_name("fedadam", eta=0.5, beta_1=0.5, beta_2=0.5),
        from_name("fedyogi", eta=0.5, beta_1=0.5, beta_2=0.5),
    )
    first, _, adam_state = adam.aggregate_fit(1, _two_clients(), [], start)
    # attn.w: delta = [4, 4] - 0; m = 2, v = 8; x = 0 + 0.5 * 2 / sqrt(8)
    np.testing.assert_allclose(first["attn.w"], [0.5 * 2 / np.sqrt(8)] * 2, rtol=1e-6)
    # expert 3 nobody holds: delta 0, so it stays
    np.testing.assert_allclose(first["experts.w"][3], [30, 30])
    yogi_first, _, yogi_state = yogi.aggregate_fit(1, _two_clients(), [], start)
    assert yogi_first["attn.w"] == pytest.approx(first["attn.w"])
    np.testing.assert_allclose(adam_state["m/attn.w"], [2, 2]) and np.testing.assert_allclose(adam_state["v/attn.w"], 8)
    # round 2 from the same start: Adam v = 0.5 * 8 + 0.5 * 16 = 12; Yogi v = 8 + 0.5 * 16 = 16 (v < delta^2)
    m = 0.5 * 2 + 0.5 * 4
    second = adam.aggregate_fit(2, _two_clients(), [], start, adam_state)
    assert second.params["attn.w"][0] == pytest.approx(0.5 * m / np.sqrt(12))
    assert yogi.aggregate_fit(2, _two_clients(), [], start, yogi_state)[0]["attn.w"][0] == pytest.approx(
        0.5 * m / np.sqrt(16)
    )
    # a state is a value: round 2 again from the same state gives the same step, and round 1's state is unchanged
    assert adam.aggregate_fit(2, _two_clients(), [], start, adam_state)[0]["attn.w"][0] == second.params["attn.w"][0]
    np.testing.assert_allclose(adam_state["m/attn.w"], [2, 2])
    assert adam.aggregate_fit(2, _two_clients(), [], start)[0]["attn.w"][0] == pytest.approx(first["attn.w"][0])
