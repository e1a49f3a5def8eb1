"""Bundle transfer to disk: chunks stream into files this side names, sha256 checked as they arrive, and
every failure leaves no partial file behind (issue 11: a Pi died assembling a 635 MB bundle in memory)."""

import hashlib
import os
import tracemalloc

import pytest

from device_runtime.bundle import ShapeKey
from device_runtime.bundle_cache import BundleCache
from device_runtime.errors import ProtocolError
from device_runtime.session import DeviceSession, InstallBundle
from device_runtime.wire import Assignment, BundleAssembler, FitConfig, bundle_chunks

FILES = {"manifest.json": b"{}", "sub/graph.onnx": bytes(range(256)) * 40, "empty.bin": b""}


def _receive(directory, chunks, **kwargs):
    assembler = BundleAssembler("k", directory, max_total_bytes=kwargs.pop("max_total_bytes", 1 << 20))
    out = None
    for chunk in chunks:
        out = assembler.add(chunk)
    return out


def test_files_stream_to_names_this_side_chooses(tmp_path):
    received = _receive(tmp_path / "rx", bundle_chunks("k", FILES, chunk_bytes=999))
    assert {name: path.read_bytes() for name, path in received.items()} == FILES
    assert sorted(p.name for p in (tmp_path / "rx").iterdir()) == ["0.part", "1.part", "2.part"]
    assert all(path.parent == tmp_path / "rx" for path in received.values())  # never a peer-named path


@pytest.mark.parametrize("position", [0, 5, 10])  # first, middle and last chunk of the 10,240-byte file
def test_a_tampered_chunk_is_refused_and_nothing_is_left(tmp_path, position):
    chunks = list(bundle_chunks("k", FILES, chunk_bytes=1024))
    graph = [i for i, c in enumerate(chunks) if c.name == "sub/graph.onnx"]
    index = graph[min(position, len(graph) - 1)]
    data = bytearray(chunks[index].data)
    data[0] ^= 1  # same size, one bit flipped
    chunks[index] = chunks[index].__class__(**{**chunks[index].__dict__, "data": bytes(data)})
    with pytest.raises(ProtocolError) as info:
        _receive(tmp_path / "rx", chunks)
    assert info.value.code == "bad_payload" and not (tmp_path / "rx").exists()


def test_abort_and_session_drops_delete_partial_files(tmp_path):
    cache = BundleCache(tmp_path / "cache")
    chunks = list(bundle_chunks("k", FILES, chunk_bytes=1024))
    assembler = BundleAssembler("k", cache.staging_dir(), max_total_bytes=1 << 20)
    assembler.add(chunks[0])
    assembler.add(chunks[1])
    assert any(assembler.directory.iterdir())
    assembler.abort()
    assert not assembler.directory.exists()

    session = DeviceSession(cached=[], known_updates=[], max_bundle_bytes=1 << 20, staging=cache.staging_dir)
    for drop in (session.connection_lost, lambda: session.on_frame_error(ProtocolError("bad_frame", "truncated"))):
        session.on_message(_assignment("experts-1"))
        session.on_message(next(iter(bundle_chunks("experts-1", FILES, chunk_bytes=1024))))
        assert _staging(cache)  # a partial file exists
        drop()
        assert not _staging(cache)
        session.known.clear()


def test_memory_stays_at_one_chunk_whatever_the_bundle_size(tmp_path):
    blob = os.urandom(16 << 20)
    chunks = bundle_chunks("k", {"weights.safetensors": blob}, chunk_bytes=256 << 10)
    tracemalloc.start()
    try:
        received = _receive(tmp_path / "rx", chunks, max_total_bytes=32 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert hashlib.sha256(received["weights.safetensors"].read_bytes()).digest() == hashlib.sha256(blob).digest()
    assert peak < 2 << 20, f"peak {peak} bytes while receiving 16 MiB in 256 KiB chunks"  # old code: > 32 MiB


def _staging(cache: BundleCache) -> list:
    return [p for d in cache.root.glob(".tmp-*") for p in d.iterdir()]


def _assignment(shape_key_id: str) -> Assignment:
    key = ShapeKey((1,))
    assert key.id == shape_key_id
    return Assignment(
        round_id=1, update_id="u-1", model_version=0, shape_key=key, expert_ids=((0,),), config=FitConfig()
    )


def test_install_bundle_action_carries_the_staging_directory(tmp_path):
    cache = BundleCache(tmp_path / "cache")
    session = DeviceSession(cached=[], known_updates=[], max_bundle_bytes=1 << 20, staging=cache.staging_dir)
    session.on_message(_assignment("experts-1"))
    actions = []
    for chunk in bundle_chunks("experts-1", FILES, chunk_bytes=4096):
        actions = session.on_message(chunk)
    (install,) = actions
    assert isinstance(install, InstallBundle) and install.directory.parent == cache.root
    assert {n: p.read_bytes() for n, p in install.files.items()} == FILES
