"""The batched registry calls for the connected devices (``coordinator.presence``), on a real SQLite registry:
``last_seen`` of every due device in one write per sweep, the revoked devices in one query per sweep, their
sessions ended, and a sweep every ``SWEEP_S`` that survives a failing registry."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import InboxDevice
from sqlalchemy import event

from coordinator.presence import SWEEP_S, Presence
from coordinator.registry import Registry


@pytest.fixture
def registry(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    yield registry
    registry.close()


@pytest.fixture
def devices(registry):
    """Three enrolled devices, the first two connected."""
    return [InboxDevice(registry, f"d{i}", {}) for i in range(3)]


def presence_of(registry, devices) -> Presence:
    return Presence(registry, {d.device.id: d.session for d in devices[:2]})


def statements_of(registry) -> list[str]:
    """The SQL statements ``registry`` sends from now on (their first word), appended as they go."""
    statements: list[str] = []
    event.listen(registry.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql.split()[0]))
    return statements


def test_a_sweep_ends_the_sessions_of_connected_revoked_devices_only(registry, devices):
    presence = presence_of(registry, devices)
    presence.sweep()
    assert presence.revoked == set() and [d.revocations for d in devices] == [0, 0, 0]
    registry.revoke_device(devices[0].device.id)
    registry.revoke_device(devices[2].device.id)  # not connected: no session to end
    statements = statements_of(registry)
    presence.sweep()
    assert statements == ["SELECT"]  # nothing due: no write; one query for every connection
    assert presence.revoked == {devices[0].device.id, devices[2].device.id}
    assert [d.revocations for d in devices] == [1, 0, 0]


def test_last_seen_of_every_due_device_is_written_in_one_statement_per_sweep(registry, devices):
    presence = presence_of(registry, devices)
    statements = statements_of(registry)
    presence.seen(devices[0].device.id)
    presence.seen(devices[1].device.id)
    presence.seen(devices[0].device.id)
    assert statements == []  # nothing written before the sweep
    presence.sweep()
    assert statements == ["UPDATE", "SELECT"]
    assert [registry.get_device(d.device.id).last_seen is not None for d in devices] == [True, True, False]
    statements.clear()
    presence.sweep()
    assert statements == ["SELECT"]  # written once


def test_sweeps_run_every_sweep_s_and_survive_a_failing_registry(registry, devices, monkeypatch, caplog):
    """A revoked connected device's session ends within one ``SWEEP_S`` of the revocation; a sweep that fails
    (the registry is down) keeps the due ``last_seen`` stamps for the next."""
    presence = presence_of(registry, devices)
    device_id = devices[1].device.id
    presence.seen(device_id)
    real_touch = registry.touch_devices

    def down(_device_ids) -> None:
        raise OSError("registry down")

    monkeypatch.setattr(registry, "touch_devices", down)

    async def scenario() -> None:
        stop = asyncio.Event()
        sweeps = asyncio.create_task(presence.run(stop))
        await asyncio.sleep(0.1)  # the first sweep failed
        monkeypatch.setattr(registry, "touch_devices", real_touch)
        registry.revoke_device(device_id)
        await asyncio.sleep(SWEEP_S + 0.5)
        stop.set()
        await asyncio.wait_for(sweeps, SWEEP_S + 1)

    with caplog.at_level(logging.ERROR, logger="fedmoe.coord"):
        asyncio.run(scenario())
    assert "the registry sweep (last_seen, revocations) failed" in caplog.text
    assert devices[1].revocations >= 1 and devices[0].revocations == 0
    assert registry.get_device(device_id).last_seen is not None
