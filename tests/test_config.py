"""The coordinator's config file: the ``[rounds]`` table is ``RoundPolicy`` itself, and a config written before
it names where its keys went."""

from __future__ import annotations

import pytest

from coordinator.config import CoordinatorConfig, load_config, save_config
from coordinator.rounds import RoundPolicy
from device_runtime.errors import ConfigError


def test_the_rounds_table_round_trips(tmp_path):
    cfg = CoordinatorConfig(
        checkpoint=str(tmp_path / "m"),
        state_dir=str(tmp_path / "s"),
        rounds={"min_fit_clients": 3, "max_fit_clients": 5, "deadline_s": 42},
    )
    assert cfg.rounds == RoundPolicy(min_fit_clients=3, max_fit_clients=5, deadline_s=42)
    save_config(cfg, tmp_path / "c.toml")
    assert "[rounds]" in (tmp_path / "c.toml").read_text()
    assert load_config(tmp_path / "c.toml") == cfg


def test_top_level_round_keys_of_an_older_config_say_where_they_went(tmp_path):
    (tmp_path / "old.toml").write_text('checkpoint = "m"\nround_deadline_s = 300\nmin_fit_clients = 2\n')
    with pytest.raises(
        ConfigError, match=r"moved to the \[rounds\] table: write min_fit_clients = 2, deadline_s = 300"
    ):
        load_config(tmp_path / "old.toml")


@pytest.mark.parametrize(
    "table, field",
    [
        ("min_fit_clients = 3\nmax_fit_clients = 2", "max_fit_clients"),
        ("deadline_s = 0", "deadline_s"),
        ("max_attempts = 0", "max_attempts"),
        ("backoff_s = 700", "backoff_s"),
        ("deadlin_s = 5", "deadlin_s"),
    ],
)
def test_a_bad_rounds_table_names_the_field(tmp_path, table, field):
    (tmp_path / "bad.toml").write_text(f'checkpoint = "m"\n[rounds]\n{table}\n')
    with pytest.raises(ConfigError, match=rf"\[rounds\].*{field}"):
        load_config(tmp_path / "bad.toml")
