"""The simulation gives up, with a message, when a failed round leaves the federation unable to start another."""

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from coordinator.registry import Registry
from coordinator.simulation.runner import _check_failed_rounds
from device_runtime.errors import FedmoeError


def _registry_with_a_round(tmp_path, *, status: str, minutes_ago: float) -> Registry:
    when = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", clock=lambda: when)
    registry.finish_round(
        registry.start_round("hfedmoe", {}).id, metrics={"rejected": {"d-1": "bad_alloc"}}, status=status
    )
    return registry


def test_a_failed_round_with_no_successor_for_minutes_stops_the_simulation(tmp_path):
    registry = _registry_with_a_round(tmp_path, status="failed", minutes_ago=5)
    with pytest.raises(FedmoeError, match="no round started in the .* since"):
        _check_failed_rounds(SimpleNamespace(registry=registry), "hfedmoe")
    registry.close()


@pytest.mark.parametrize("status, minutes_ago", [("failed", 0.5), ("finished", 30)])
def test_a_fresh_failure_or_a_finished_round_does_not(tmp_path, status, minutes_ago):
    registry = _registry_with_a_round(tmp_path, status=status, minutes_ago=minutes_ago)
    _check_failed_rounds(SimpleNamespace(registry=registry), "hfedmoe")
    registry.close()
