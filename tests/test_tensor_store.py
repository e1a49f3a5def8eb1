"""Content-addressed tensor store: layout, dedup, hash verification, atomic writes."""

import hashlib
import os

import numpy as np
import pytest

from coordinator.tensor_store import TensorStore
from device_runtime.errors import ModelError, ProtocolError
from device_runtime.wire import tensors_to_bytes

W = {"experts.0.w": np.arange(6, dtype=np.float32).reshape(2, 3), "gate": np.ones(4, dtype=np.float16)}


def test_put_get_layout_and_dedup(tmp_path):
    store = TensorStore(tmp_path / "tensors")
    sha = store.put(W)
    blob = tensors_to_bytes(W)
    assert sha == hashlib.sha256(blob).hexdigest()
    assert store.path(sha) == tmp_path / "tensors" / sha[:2] / f"{sha}.safetensors"
    assert store.get(sha) == blob and store.has(sha)
    loaded = store.load(sha)
    assert loaded["gate"].dtype == np.float16
    np.testing.assert_array_equal(loaded["experts.0.w"], W["experts.0.w"])
    mtime = store.path(sha).stat().st_mtime_ns
    assert store.put(blob) == sha and store.path(sha).stat().st_mtime_ns == mtime  # same bytes: no rewrite
    assert sorted(p.name for p in store.path(sha).parent.iterdir()) == [f"{sha}.safetensors"]


def test_get_verifies_hash(tmp_path):
    store = TensorStore(tmp_path)
    sha = store.put(W)
    data = bytearray(store.path(sha).read_bytes())
    data[-1] ^= 0xFF
    store.path(sha).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupted"):
        store.get(sha)
    with pytest.raises(ModelError, match="not in the store"):
        store.get("0" * 64)
    for bad in ("../../etc/passwd", "A" * 64, "0" * 63):
        with pytest.raises(ModelError, match="not a sha256"):
            store.get(bad)


def test_discard_deletes_named_files_only_and_counts_bytes(tmp_path):
    store = TensorStore(tmp_path)
    keep, drop = store.put(W), store.put({"x": np.zeros(3, dtype=np.float32)})
    size = store.path(drop).stat().st_size
    assert store.discard([drop, drop, "0" * 64]) == size  # a repeat and an absent sha are skipped
    assert not store.has(drop) and store.has(keep)
    assert store.discard([drop]) == 0
    with pytest.raises(ModelError, match="not a sha256"):
        store.discard(["../x"])


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """A crash between writing and renaming (simulated: fsync fails) leaves no file and no temp file."""
    store = TensorStore(tmp_path)

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.put(W)
    sha = hashlib.sha256(tensors_to_bytes(W)).hexdigest()
    assert not store.has(sha)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    assert store.put(W) == sha and store.get(sha) == tensors_to_bytes(W)


def test_put_rejects_non_wire_tensors(tmp_path):
    with pytest.raises(ProtocolError):
        TensorStore(tmp_path).put({"w": np.zeros(2, dtype=np.float64)})


def test_damaged_finds_truncated_files_from_their_header_alone(tmp_path):
    store = TensorStore(tmp_path / "tensors")
    whole, cut = store.put(W), store.put({"other": np.zeros(64, dtype=np.float32)})
    data = store.path(cut).read_bytes()
    store.path(cut).write_bytes(data[:-10])
    absent = "0" * 64
    assert store.damaged([whole, cut, absent]) == [cut]  # an absent file is "missing", not damaged


def test_serve_reports_a_truncated_older_version_at_start(tmp_path, caplog):
    """Old code found it only when the version was read (an export, a comparison)."""
    pytest.importorskip("torch")
    from helpers import ServerThread, initialised_coordinator

    from coordinator.federation import tensor_store
    from coordinator.registry import Registry

    cfg = initialised_coordinator(tmp_path, tmp_path / "state")
    registry, store = Registry(cfg.registry_url), tensor_store(cfg)
    old = registry.latest_model_version().tensor_sha256
    registry.add_model_version(store.put({n: a + 1 for n, a in store.load(old).items()}))  # version 1
    registry.close()
    store.path(old).write_bytes(store.path(old).read_bytes()[:1000])
    ServerThread(cfg).stop()
    assert f"tensor file {store.path(old)} is truncated or damaged; restore it from a backup" in caplog.text
