"""Device names and the texts they end up in (issue 19, item 4): one rule for every place a name is accepted,
the systemd unit the harness writes, and registry files that cannot be read."""

from __future__ import annotations

import shlex

import pytest
from click.testing import CliRunner

from android_harness.cli import main as harness
from android_harness.errors import DeployError
from android_harness.remote import Layout, systemd_unit
from coordinator.registry import Registry
from device_runtime.auth import check_device_name
from device_runtime.errors import ConfigError

BAD_NAMES = ["pi 1", "pi;reboot", "-rf", "pi%h", "x" * 101, "", "pi\nExecStartPre=/bin/true"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_the_registry_makes_no_token_for_a_name_no_device_can_enroll_with(tmp_path, name):
    """Old code made the token; the device then refused the name (``fedmoe-device enroll``) and it was spent."""
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        with pytest.raises(ConfigError, match="device name"):
            registry.create_enroll_token(name, 60)
        assert check_device_name("pi-kitchen.2") == "pi-kitchen.2"
    finally:
        registry.close()


def test_the_harness_refuses_a_bad_name_before_touching_the_target():
    result = CliRunner().invoke(
        harness, ["deploy", "ssh:pi@192.0.2.1", "--coordinator", "ws://192.0.2.2:8765", "--name", "pi;reboot"]
    )
    assert result.exit_code == 2 and "device name 'pi;reboot' must match" in result.output, result.output


def test_the_systemd_unit_quotes_paths_and_escapes_specifiers():
    """Old code wrote ``ExecStart=/bin/sh /home/pi/my dir%h/run.sh``: two arguments, and ``%h`` expanded."""
    unit = systemd_unit(Layout('/home/pi/my dir%h/"q"'), "pi%n")
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line)
    assert shlex.split(lines["ExecStart"]) == ["/bin/sh", '/home/pi/my dir%%h/"q"/run.sh']
    assert lines["Description"].startswith("fedmoe device runtime (pi%%n)")
    assert lines["StandardOutput"] == 'append:/home/pi/my dir%%h/"q"/device.log'
    with pytest.raises(DeployError, match="control character"):
        systemd_unit(Layout("/home/pi"), "pi\nExecStartPre=/bin/true")


def test_a_registry_file_that_is_not_a_database_is_one_clear_error(tmp_path):
    """Old code: sqlalchemy's DatabaseError traceback from ``fedmoe-coord serve``."""
    path = tmp_path / "registry.db"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError, match="cannot read the registry .*: file is not a database; restore it"):
        Registry(f"sqlite:///{path}")
