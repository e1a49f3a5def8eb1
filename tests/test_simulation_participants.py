"""Which simulated devices a strategy's round 1 gives work: the others are not started and not in the quorum."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from helpers import initialised_coordinator, two_expert_memory  # noqa: E402

from coordinator.simulation.profiles import SimulatedDevice  # noqa: E402
from coordinator.simulation.runner import Federation, participants  # noqa: E402
from device_runtime.errors import FedmoeError  # noqa: E402
from device_runtime.wire import FitConfig  # noqa: E402


def _federation(cfg, strategy, devices):
    return Federation(
        strategy=strategy,
        rounds=1,
        checkpoint=Path(cfg.checkpoint),
        devices=tuple(devices),
        data_files=tuple(Path(f"{d.name}.jsonl") for d in devices),
        fit=FitConfig(batch_size=2, seq_len=8),
        eval_data=Path("test.jsonl"),
    )


def test_dense_fedavg_starts_only_the_devices_that_hold_every_expert(tmp_path):
    cfg = initialised_coordinator(tmp_path, tmp_path / "state")
    small = SimulatedDevice("small", "pi", two_expert_memory(cfg.checkpoint), 5.0)  # MiB: 2 of the 4 experts
    large = SimulatedDevice("large", "laptop", 8192, 40.0)
    chosen = participants(_federation(cfg, "dense-fedavg", [small, large]), cfg)
    assert chosen == [(large, Path("large.jsonl"))]
    assert [d for d, _ in participants(_federation(cfg, "hfedmoe", [small, large]), cfg)] == [small, large]
    with pytest.raises(FedmoeError, match="none of the 1 devices"):
        participants(_federation(cfg, "dense-fedavg", [small]), cfg)
