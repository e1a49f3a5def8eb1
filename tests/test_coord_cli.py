"""``fedmoe-coord`` commands and crash recovery of a round, on a tiny Mixtral (no websockets here)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from coordinator.cli import main, parse_duration
from coordinator.config import load_config
from coordinator.registry import Registry
from device_runtime.auth import generate_keypair
from device_runtime.errors import ConfigError
from device_runtime.tls import certificate_fingerprint
from device_runtime.wire import Assignment, EvalResult

pytest.importorskip("torch")
from helpers import InboxDevice, config_with, fake_update, init_by_cli, two_expert_memory  # noqa: E402


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = init_by_cli(root, "--min-fit-clients", "2")
    return {"config": config, "root": root, "memory": two_expert_memory(root / "checkpoint")}


def cli(coord, *args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, ["--config", str(coord["config"]), *args])


def test_parse_duration():
    assert (parse_duration("90s"), parse_duration("15m"), parse_duration("2h"), parse_duration("7")) == (
        90,
        900,
        7200,
        7,
    )
    with pytest.raises(ConfigError):
        parse_duration("soon")


def test_init_refuses_an_existing_config_and_commands_report(coord):
    again = cli(coord, "init", str(coord["root"] / "checkpoint"))
    assert again.exit_code != 0 and "exists" in str(again.exception)
    token = cli(coord, "enroll", "--name", "pi-9", "--expires", "1h")
    secret, fingerprint = token.output.strip().split(".")  # init made a CA: the token pins it
    assert token.exit_code == 0 and len(secret) == 43
    cfg = load_config(coord["config"])
    assert cfg.mutual_tls and fingerprint == certificate_fingerprint(Path(cfg.tls_ca_cert).read_bytes())
    status = cli(coord, "status")
    assert status.exit_code == 0 and "model version" in status.output and "0" in status.output
    assert cli(coord, "devices").exit_code == 0
    missing = cli(coord, "devices", "revoke", "d-nope")
    assert isinstance(missing.exception, ConfigError)


def test_devices_shows_a_device_supplied_profile_as_text_not_markup(coord):
    """Old code passed profile strings to rich as markup: "[/x]" crashed `devices` (MarkupError), "[red]..."
    was rendered (a device could restyle or hide its row)."""
    registry = Registry(load_config(coord["config"]).registry_url)
    registry.redeem_token(
        registry.create_enroll_token("markup", 60),
        "markup",
        {"memory_mib": "[red]64[/red]", "gflops": "[/x]"},
        generate_keypair()[1],
    )
    registry.close()
    listing = cli(coord, "devices")
    assert listing.exit_code == 0, listing.output
    assert "[red]64[/red]" in listing.output and "[/x]" in listing.output


def test_round_survives_a_coordinator_restart(coord):
    from coordinator.rounds import Aggregate, StartRound
    from coordinator.service import Coordinator

    cfg = config_with(load_config(coord["config"]), deadline_s=300, fit={"batch_size": 2, "seq_len": 8})
    profile = {"memory_mib": coord["memory"], "gflops": 5.0}
    registry = Registry(cfg.registry_url)
    a, b = InboxDevice(registry, "a", profile), InboxDevice(registry, "b", profile)
    registry.close()

    async def first_life():
        c = Coordinator.from_config(cfg)
        sessions = [a.session, b.session]
        for s in sessions:
            await c.attach(s)
        action = await c.step()
        assert isinstance(action, StartRound) and len(action.devices) == 2
        assignment = a.inbox[-1]
        assert isinstance(assignment, Assignment)
        manifest = c.bundles.manifest(assignment.shape_key.id)
        update = replace(
            fake_update(assignment, manifest), evaluation=EvalResult(loss=2.0, num_examples=3, num_tokens=9)
        )
        ack = await c.handle_update(sessions[0], update)
        assert ack.accepted
        c.close()  # crash: nothing else happens in this life
        return manifest

    async def second_life(manifest):
        c = Coordinator.from_config(cfg)
        assert c.engine.current.accepted == [a.inbox[-1].update_id] and len(c.engine.current.pending()) == 1
        sessions = {d: d.session for d in (a, b)}
        await c.attach(sessions[b])  # b reconnects and gets its assignment again
        resent = b.inbox[-1]
        assert resent.update_id == b.inbox[0].update_id
        np.testing.assert_array_equal(next(iter(resent.tensors.values())), next(iter(b.inbox[0].tensors.values())))
        replay = await c.handle_update(sessions[a], fake_update(a.inbox[-1], manifest))
        assert replay.accepted and replay.reason == "already recorded"
        scored = EvalResult(loss=1.0, num_examples=1, num_tokens=3)
        update = replace(fake_update(resent, manifest, trained_local=1), evaluation=scored)
        assert (await c.handle_update(sessions[b], update)).accepted
        round_id = c.engine.current.round_id
        assert await c.step() == Aggregate(round_id, (a.inbox[-1].update_id, resent.update_id))
        assert c.engine.current is None and c.engine.server_round == 2
        rounds = c.registry.list_rounds()
        c.close()
        return rounds[0]

    manifest = asyncio.run(first_life())
    finished = asyncio.run(second_life(manifest))
    assert finished.status == "finished" and finished.metrics["num_clients"] == 2
    assert finished.metrics["num_examples"] == 8 and finished.metrics["model_version"] == 1
    assert finished.metrics["fed_eval_loss"] == pytest.approx((3 * 2.0 + 1 * 1.0) / 4)  # federated evaluation
    listing = cli(coord, "rounds")
    assert listing.exit_code == 0 and "finished" in listing.output and "1.7500" in listing.output
    status = cli(coord, "status").output
    assert "1 finished" in status and "federated evaluation" in status and "1.7500" in status, status
    registry = Registry(load_config(coord["config"]).registry_url)
    for _ in range(3):  # [rounds] max_attempts consecutive failures: the coordinator backs off and alerts
        registry.finish_round(registry.start_round("hfedmoe", {}).id, metrics={"reason": "0 of 2"}, status="failed")
    registry.close()
    status = cli(coord, "status").output
    assert "ALERT: 3 consecutive rounds failed" in status and "0 of 2" in status and "back off" in status


def test_model_export(coord, tmp_path):
    result = cli(coord, "model", "export", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()


def test_enroll_refuses_a_name_no_device_can_enroll_with(coord):
    result = cli(coord, "enroll", "--name", "pi kitchen")
    assert isinstance(result.exception, ConfigError) and "device name 'pi kitchen' must match" in str(result.exception)


def test_serve_on_a_busy_port_is_one_clear_error(coord):
    """Old code: asyncio's OSError traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = cli(coord, "serve", "--port", str(busy.getsockname()[1]))
    assert isinstance(result.exception, ConfigError), result.exception
    assert "address already in use; stop the process using that port" in str(result.exception)
