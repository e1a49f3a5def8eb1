"""FedAvg, FedProx and FedMoE against hand-computed values (tiny_global: experts 0..3 rows [10e, 10e])."""

import numpy as np

from coordinator.strategy import FedAvg, FedMoE, FedProx
from helpers import make_update, tiny_context, tiny_global


def _two_clients():
    a = make_update("a", 1, (0, 1), [[1, 2], [3, 4]], [[1, 0], [0, 1]], [1, 1])
    b = make_update("b", 3, (1, 2), [[5, 6], [7, 8]], [[2, 2], [4, 4]], [5, 5])
    return [a, b]


def test_fedavg_by_hand():
    out, metrics = FedAvg().aggregate_fit(1, _two_clients(), [], tiny_global())
    np.testing.assert_allclose(out["experts.w"], [[1, 2],          # only a holds expert 0
                                                  [4.5, 5.5],      # (1*[3,4] + 3*[5,6]) / 4
                                                  [7, 8],          # only b holds expert 2
                                                  [30, 30]])       # nobody: unchanged
    np.testing.assert_allclose(out["gate.weight"], [[1, 0], [1.5, 1.75], [4, 4], [9, 9]])
    np.testing.assert_allclose(out["attn.w"], [4, 4])               # (1*1 + 3*5) / 4
    assert metrics["experts_updated"] == {0: 3} and metrics["num_examples"] == 4


def test_fedavg_dense_is_plain_weighted_mean():
    rng = np.random.default_rng(1)
    rows = [rng.normal(size=(4, 2)) for _ in range(3)]
    n = [2, 5, 3]
    updates = [make_update(f"c{i}", n[i], (0, 1, 2, 3), rows[i], rows[i], rows[i][0]) for i in range(3)]
    out, _ = FedAvg().aggregate_fit(1, updates, [], tiny_global())
    expected = (2 * rows[0] + 5 * rows[1] + 3 * rows[2]) / 10
    np.testing.assert_allclose(out["experts.w"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["attn.w"], expected[0], rtol=1e-6)


def test_fedprox_sends_mu_and_aggregates_like_fedavg():
    strategy = FedProx(prox_mu=0.05)
    assert strategy.bind(tiny_context()).fit_config(1).prox_mu == 0.05
    prox, _ = strategy.aggregate_fit(1, _two_clients(), [], tiny_global())
    avg, _ = FedAvg().aggregate_fit(1, _two_clients(), [], tiny_global())
    for name in avg:
        np.testing.assert_array_equal(prox[name], avg[name])


def test_fedmoe_unheld_unchanged_single_copied_shared_averaged():
    a = make_update("a", 2, (0, 1), [[1, 1], [2, 2]], [[1, 1], [1, 1]], [0, 0])
    b = make_update("b", 6, (1,), [[6, 6]], [[5, 5]], [0, 0])
    out, _ = FedMoE().aggregate_fit(1, [a, b], [], tiny_global())
    np.testing.assert_allclose(out["experts.w"], [[1, 1],    # held by a only: copied
                                                  [5, 5],    # shared: (2*2 + 6*6) / 8
                                                  [20, 20],  # unheld: unchanged
                                                  [30, 30]])
    np.testing.assert_allclose(out["gate.weight"][1], [4, 4])  # (2*1 + 6*5) / 8
