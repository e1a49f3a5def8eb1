"""``Coordinator._available``: the connected devices a round may select, revoked ones left out, in one registry query
whatever the number connected (``Registry.revoked_device_ids``)."""

from helpers import initialised_coordinator

from coordinator.service import Coordinator
from device_runtime.auth import generate_keypair


def test_available_is_the_connected_devices_minus_the_revoked(tmp_path):
    cfg = initialised_coordinator(tmp_path, tmp_path / "state")
    coord = Coordinator.from_config(cfg)
    try:
        registry = coord.registry
        ids = [
            registry.redeem_token(registry.create_enroll_token(f"d{i}", 60), f"d{i}", {}, generate_keypair()[1]).id
            for i in range(3)
        ]
        coord.sessions = {device_id: object() for device_id in ids[:2]}  # d2 is enrolled but not connected
        assert sorted(coord._available()) == sorted(ids[:2])
        registry.revoke_device(ids[0])  # revoked while connected: no longer selectable
        assert coord._available() == [ids[1]]
    finally:
        coord.close()
