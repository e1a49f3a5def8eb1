import csv
import json

import pytest

from coordinator.simulation.profiles import load_profiles, parse_profiles
from coordinator.simulation.report import DeviceRound, RoundRecord, cumulative_bytes_up, plot_accuracy, write_metrics
from device_runtime.errors import ConfigError


def _records():
    dev = DeviceRound("pi-0", 1.5, 100, 300, 512.0, 2, eval_loss=2.25, eval_examples=3)
    return [
        RoundRecord("hfedmoe", 0, 0.2, 3.0, 0.0, 0, 0),
        RoundRecord("hfedmoe", 1, 0.5, 1.0, 12.0, 100, 300, (dev,), fed_loss=2.25, fed_examples=3),
        RoundRecord("hfedmoe", 2, 0.7, 0.8, 11.0, 150, 300, (dev,), fed_loss=1.5, fed_accuracy=0.6, fed_examples=3),
    ]


def test_cumulative_bytes_and_outputs(tmp_path):
    records = _records()
    assert cumulative_bytes_up(records) == [0, 100, 250]
    write_metrics(records, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert rows[1]["device"] == "pi-0" and rows[1]["device_peak_rss_mib"] == "512"
    assert rows[0]["fed_loss"] == "" and rows[0]["device"] == "" and rows[0]["frozen"] == ""  # zero-shot: no devices
    assert (rows[1]["fed_loss"], rows[1]["fed_accuracy"], rows[1]["fed_examples"]) == ("2.2500", "", "3")
    assert (rows[2]["fed_accuracy"], rows[1]["device_eval_loss"], rows[1]["device_eval_examples"]) == (
        "0.6000",
        "2.2500",
        "3",
    )
    assert rows[1]["frozen"] == "-" and rows[1]["experts_kept"] == "2"  # every column lines up with its header
    assert json.loads((tmp_path / "metrics.json").read_text())[2]["accuracy"] == 0.7
    from coordinator.simulation.cli import _round_table

    table = _round_table(records)
    assert [c.header for c in table.columns][2:5] == ["accuracy", "loss", "fed loss"]
    assert list(table.columns[4].cells) == ["-", "2.250", "1.500 (60.0%)"]
    png = plot_accuracy(records, tmp_path / "accuracy.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profiles_expand_counts_and_reject_bad_values():
    devices = load_profiles(None)
    assert [d.memory_mib for d in devices] == [1536, 1536, 3072, 3072, 8192]
    assert len({d.name for d in devices}) == 5
    assert [d.kind for d in load_profiles(None, num_devices=7)][5:] == ["raspberry-pi", "raspberry-pi"]
    with pytest.raises(ConfigError, match="memory_mib"):
        parse_profiles('[[device]]\nkind = "x"\nmemory_mib = 0\n')
    with pytest.raises(ConfigError, match="no \\[\\[device\\]\\]"):
        parse_profiles("")
