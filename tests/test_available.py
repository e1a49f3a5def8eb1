"""``Coordinator._available``: the connected devices a round may select, revoked ones left out as of the last
presence sweep (``coordinator.presence``: one registry query for every connection, whatever the number)."""

from helpers import InboxDevice, initialised_coordinator

from coordinator.service import Coordinator


def test_available_is_the_connected_devices_minus_the_revoked(tmp_path):
    cfg = initialised_coordinator(tmp_path, tmp_path / "state")
    coord = Coordinator.from_config(cfg)
    try:
        registry = coord.registry
        devices = [InboxDevice(registry, f"d{i}", {}) for i in range(3)]
        ids = [d.device.id for d in devices]
        coord.sessions.update({d.device.id: d.session for d in devices[:2]})  # d2 is enrolled but not connected
        assert sorted(coord._available()) == sorted(ids[:2])
        registry.revoke_device(ids[0])  # revoked while connected: selectable until the next sweep ends it
        coord.presence.sweep()
        assert coord._available() == [ids[1]] and devices[0].revocations == 1
    finally:
        coord.close()
