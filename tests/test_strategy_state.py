"""Durable strategy state (issue 19, item 3), on a real SQLite registry and tensor store with hand-checkable
arrays: a coordinator killed between two rounds and re-created from its files produces the same next version
as an uninterrupted run, for FedAdam (server moments) and FedAlign-MoE (routing prior). The old coordinator
restarted them from their initial state: FedAdam's next step was a first step from zero moments."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from helpers import MOE_EXPERTS, MOE_GATE, stored_update_row

from coordinator.federation import GlobalModel, aggregate_round
from coordinator.registry import Registry
from coordinator.strategy import FedAlign, FedAvg
from coordinator.strategy.fedopt import FedAdam
from coordinator.tensor_store import TensorStore
from device_runtime.errors import ConfigError, ModelError

BASE = {MOE_EXPERTS: np.zeros((2, 3), np.float32), MOE_GATE: np.zeros((2, 3), np.float32)}


def two_rounds(store: TensorStore) -> list[list]:
    """Round 1 moves every weight by +1; round 2 by about +1 again from FedAdam's version 1 (0.001). The two
    devices route differently, so FedAlign's prior (and its KL router weights) depend on round 1."""
    return [
        [
            stored_update_row(store, "a", 1, (1.0, 1.0), usage=(1.8, 0.2)),
            stored_update_row(store, "b", 3, (1.0, 1.0), usage=(0.4, 1.6)),
        ],
        [
            stored_update_row(store, "a", 1, (1.001, 3.0), usage=(1.0, 1.0)),
            stored_update_row(store, "b", 3, (1.001, 0.5), usage=(0.2, 1.8)),
        ],
    ]


def run(tmp_path, name: str, make, *, kill: bool, restore: bool = True) -> list[dict[str, np.ndarray]]:
    """Versions 1 and 2 of two rounds of strategy ``make()``; ``kill``: between them the process dies (only the
    SQLite file and the tensor store survive) and a new coordinator builds a new strategy, restored from the
    registry unless not ``restore`` (what the old coordinator did)."""
    store, url = TensorStore(tmp_path / "tensors"), f"sqlite:///{tmp_path / f'{name}.db'}"
    registry = Registry(url)
    registry.add_model_version(store.put(BASE))
    strategy, versions = make(), []
    model = GlobalModel(registry, store)
    model.restore(strategy)  # version 0: the initial state
    for server_round, rows in enumerate(two_rounds(store), 1):
        if kill and server_round == 2:
            registry.close()
            registry, strategy = Registry(url), make()
            model = GlobalModel(registry, store)
            if restore:
                model.restore(strategy)
        round_id = registry.start_round(strategy.name, {}).id
        version = aggregate_round(model, strategy, rows, [], server_round=server_round, round_id=round_id)
        versions.append(store.load(version.tensor_sha256))
    registry.close()
    return versions


@pytest.mark.parametrize("make", [FedAdam, lambda: FedAlign(router_weighting="kl")], ids=["fedadam", "fedalign"])
def test_a_killed_coordinator_produces_the_same_next_version(tmp_path, make):
    uninterrupted = run(tmp_path, "uninterrupted", make, kill=False)
    killed = run(tmp_path, "killed", make, kill=True)
    reset = run(tmp_path, "reset", make, kill=True, restore=False)
    for name in BASE:
        np.testing.assert_array_equal(killed[1][name], uninterrupted[1][name])
    assert not np.array_equal(reset[1][MOE_GATE], uninterrupted[1][MOE_GATE])  # the defect: state lost


def test_fedadam_takes_its_second_step_after_a_restart_by_hand(tmp_path):
    """eta 1e-3, beta_1 0.9, beta_2 0.99, a pseudo-gradient of 1 twice (expert 0): the first step is eta (m 0.1,
    v 0.01), the second eta 0.19 / sqrt(0.0199) = 0.0013469; the old restart took a first step (eta) again."""
    killed, reset = (
        run(tmp_path, "killed", FedAdam, kill=True),
        run(tmp_path, "reset", FedAdam, kill=True, restore=False),
    )
    np.testing.assert_allclose(killed[0][MOE_EXPERTS][0], 0.001, rtol=1e-4)
    np.testing.assert_allclose(
        killed[1][MOE_EXPERTS][0] - killed[0][MOE_EXPERTS][0], 0.001 * 0.19 / np.sqrt(0.0199), rtol=1e-3
    )
    np.testing.assert_allclose(reset[1][MOE_EXPERTS][0] - reset[0][MOE_EXPERTS][0], 0.001, rtol=1e-3)


def test_state_files_are_committed_with_their_version_and_kept_by_the_store_sweep(tmp_path, caplog):
    store, url = TensorStore(tmp_path / "tensors"), f"sqlite:///{tmp_path / 'r.db'}"
    registry = Registry(url)
    registry.add_model_version(store.put(BASE))
    model, strategy = GlobalModel(registry, store), FedAlign()
    rows = two_rounds(store)[0]
    version = aggregate_round(
        model, strategy, rows, [], server_round=1, round_id=registry.start_round("fedalign", {}).id
    )
    assert version.strategy_state_sha256 in registry.referenced_shas()
    missing, _ = model.check_store(delete_orphans=True)  # the startup sweep: the state is no orphan
    assert missing == [] and store.has(version.strategy_state_sha256)
    caplog.set_level(logging.INFO, logger="fedmoe.coord")
    restored = GlobalModel(registry, store)
    restored.restore(FedAlign())
    assert "restored the fedalign state of model version 1 (1 arrays)" in caplog.text
    np.testing.assert_array_equal(restored.strategy_state["prior/0"], model.strategy_state["prior/0"])  # float64
    np.testing.assert_allclose(restored.strategy_state["prior/0"], [(0.9 + 3 * 0.2) / 4, (0.1 + 3 * 0.8) / 4])
    other = GlobalModel(registry, store)  # another strategy: starts from its initial state, with a warning
    other.restore(FedAdam())
    assert other.strategy_state == {} and "carries no fedadam state (made by fedalign)" in caplog.text
    store.path(version.strategy_state_sha256).write_bytes(b"garbage")
    with pytest.raises(ModelError, match="corrupted"):
        GlobalModel(registry, store).restore(FedAlign())
    registry.close()


def test_a_failed_commit_leaves_the_strategy_state_of_the_latest_version(tmp_path):
    store, registry = TensorStore(tmp_path / "tensors"), Registry(f"sqlite:///{tmp_path / 'r.db'}")
    registry.add_model_version(store.put(BASE))
    model, strategy = GlobalModel(registry, store), FedAdam()
    with pytest.raises(ConfigError, match="no round 99"):  # the version cannot be recorded
        aggregate_round(model, strategy, two_rounds(store)[0], [], server_round=1, round_id=99)
    assert model.strategy_state == {}  # the moments of a version that does not exist are not the model's
    registry.close()


def test_a_state_of_another_strategy_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="'prior/0'"):
        FedAdam().check_state({"prior/0": np.ones(2)})
    with pytest.raises(ConfigError, match="'m/w'"):
        FedAvg().check_state({"m/w": np.ones(2)})
    with pytest.raises(ConfigError, match="per MoE layer"):
        FedAlign().check_state({"prior/router": np.ones(2)})
