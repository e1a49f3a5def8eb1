"""``coordinator.federation.aggregate_round`` on a real registry and tensor store: the new global version does
not depend on the order in which the updates arrived."""

import numpy as np
from helpers import MOE_EXPERTS as EXPERTS
from helpers import MOE_GATE as GATE
from helpers import stored_update_row as _row

from coordinator.federation import GlobalModel, aggregate_round
from coordinator.registry import Registry
from coordinator.strategy import FedAvg
from coordinator.tensor_store import TensorStore


def test_the_new_version_is_the_same_whatever_the_arrival_order(tmp_path):
    store = TensorStore(tmp_path / "tensors")
    base = {EXPERTS: np.zeros((2, 3), np.float32), GATE: np.zeros((2, 3), np.float32)}
    # float64 sums of expert 0 depend on the order: (1e20 + 1) - 1e20 is 0, (1e20 - 1e20) + 1 is 1
    rows = [_row(store, "a", 1, (1e20, 0.1)), _row(store, "b", 1, (1.0, 0.7)), _row(store, "c", 1, (-1e20, 0.3))]
    states = []
    for attempt, order in enumerate(([0, 1, 2], [0, 2, 1], [2, 0, 1])):
        registry = Registry(f"sqlite:///{tmp_path / f'registry-{attempt}.db'}")
        registry.add_model_version(store.put(base))
        model = GlobalModel(registry, store)
        round_id = registry.start_round("fedavg", {}).id
        version = aggregate_round(model, FedAvg(), [rows[i] for i in order], [], server_round=1, round_id=round_id)
        states.append(store.get(version.tensor_sha256))
        registry.close()
    assert states[0] == states[1] == states[2]  # byte-identical safetensors
    merged = store.load(version.tensor_sha256)[EXPERTS]
    np.testing.assert_array_equal(merged[0], 0.0)  # device order a, b, c: (1e20 + 1) - 1e20
    np.testing.assert_allclose(merged[1], (0.1 + 0.7 + 0.3) / 3, rtol=1e-6)
