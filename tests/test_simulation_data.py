import json

import pytest

from coordinator.simulation.data import dirichlet_split, label_histogram, train_test_split
from device_runtime.data import load_records
from device_runtime.errors import ConfigError, DataError


def _records(per_label=40, labels=("a", "b", "c")):
    return [{"text": f"{lab} {i}", "label": lab} for lab in labels for i in range(per_label)]


def test_dirichlet_split_is_a_seeded_partition():
    records = _records()
    parts = dirichlet_split(records, 4, alpha=0.5, seed=3)
    flat = sorted(r["text"] for p in parts for r in p)
    assert flat == sorted(r["text"] for r in records)  # every record exactly once
    assert parts == dirichlet_split(records, 4, alpha=0.5, seed=3)
    assert parts != dirichlet_split(records, 4, alpha=0.5, seed=4)
    assert min(len(p) for p in parts) >= 8


def test_small_alpha_is_more_skewed_than_large_alpha():
    records = _records(per_label=200)

    def skew(alpha):
        hist = label_histogram(dirichlet_split(records, 5, alpha=alpha, seed=0), ["a", "b", "c"])
        return sum(max(h) / sum(h) for h in hist) / len(hist)  # mean share of the dominant label

    assert skew(0.1) > skew(100.0) + 0.2
    assert skew(100.0) < 0.45  # near IID: 1/3 each


def test_bad_split_parameters_raise():
    with pytest.raises(ConfigError):
        dirichlet_split(_records(), 3, alpha=0, seed=0)
    with pytest.raises(ConfigError):
        dirichlet_split(_records(per_label=2), 3, alpha=1.0, seed=0, min_size=10)
    with pytest.raises(ConfigError):
        train_test_split(_records(), 0, seed=0)


def test_train_test_split_holds_out_disjoint_records():
    train, test = train_test_split(_records(), 30, seed=1)
    assert len(test) == 30 and len(train) == 90
    assert not {r["text"] for r in test} & {r["text"] for r in train}


def test_load_records_maps_fields_and_names_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x", "topic": "t"}) + "\n\n" + json.dumps({"body": "y"}) + "\n")
    with pytest.raises(DataError, match=":3:"):
        load_records(path, text_field="body", label_field="topic")
    path.write_text(json.dumps({"body": "x", "topic": "t"}) + "\n")
    assert load_records(path, text_field="body", label_field="topic") == [{"text": "x", "label": "t"}]
