"""What issue 22's cuts changed in a round: longest-first delivery, first-come-first-served training slots, bundle
files sent from disk, each bundle file hashed once on the device, an update serialised once."""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
from test_zo_planning import SMOLLM2_8L  # the default job's model

import device_runtime.bundle_cache as bundle_cache
from coordinator.service import Coordinator
from coordinator.strategy.selection import estimated_work
from coordinator.strategy.types import FitContext, FitIns
from device_runtime.bundle import MANIFEST, WEIGHTS_FILE
from device_runtime.bundle_cache import BundleCache
from device_runtime.errors import BundleIntegrityError
from device_runtime.slots import ticket, training_slot
from device_runtime.timing import PATTERN, log_slow_collections, log_timing
from device_runtime.update_store import UpdateStore
from device_runtime.wire import BundleAssembler, BundleFile, FitConfig, Update, bundle_chunks, encode, frame_payload

# ------------------------------------------------------------------ longest processing time first


def test_the_planner_estimate_orders_a_four_expert_fit_before_a_one_expert_fit():
    context = FitContext(model=SMOLLM2_8L, calibration=None)  # type: ignore[arg-type]
    config = FitConfig(local_steps=10, batch_size=4, seq_len=64)
    one = FitIns(((0,),) * 8, config)
    four = FitIns(((0, 1, 2, 3),) * 8, config)
    resident = FitIns(((0, 1),) * 8, config, frozen_dtype="float16")
    profile = {"memory_mib": 8192, "gflops": 50.0}
    work = [estimated_work(context, fit, profile) for fit in (one, resident, four)]
    assert 0 < work[0] < work[1] <= work[2]  # the planner counts a resident expert's forward and backward
    slow = {"memory_mib": 1536, "gflops": 2.0}  # a device that measured its speed while the machine was busy
    assert estimated_work(context, one, slow) == work[0]  # the work, not the device's own (noisy) speed
    assert estimated_work(context, four, {"gflops": 50.0}) == 0.0  # no budget in the profile: no estimate


def test_assignments_are_built_and_sent_longest_estimated_training_first():
    built, sent = [], []

    async def build(pending):
        built.append(pending)
        await asyncio.sleep(0)
        return f"assignment-{pending.name}"

    async def deliver(pending, message):
        await asyncio.sleep(0.05 if pending.name == "long" else 0)  # the largest takes longest to send
        sent.append(pending.name)

    estimates = {"short": 1.0, "long": 9.0, "middle": 4.0, "unbuildable": 5.0}

    async def build_or_fail(pending):
        return None if pending.name == "unbuildable" else await build(pending)

    fake = SimpleNamespace(estimated_work=lambda p: estimates[p.name], _build=build_or_fail, _deliver=deliver)
    pending = [SimpleNamespace(name=n, fit=SimpleNamespace(expert_ids=((0,),))) for n in estimates]
    asyncio.run(Coordinator._deliver_longest_first(fake, pending))  # type: ignore[arg-type]
    assert [p.name for p in built] == ["long", "middle", "short"]
    assert sent == ["long", "middle", "short"]  # each send waits for the one before it (up to ORDER_WAIT_S)


def _wait_for_slot(spec, name, arrived, events):
    with training_slot(spec, poll_s=0.01, queued=ticket(spec) if arrived is None else arrived):
        events.put((name, time.monotonic()))
        time.sleep(0.05)


def _hold_slot(spec, held, release):
    with training_slot(spec, poll_s=0.01):
        held.set()
        release.wait(10)


def test_a_free_slot_goes_to_the_oldest_ticket_and_a_dead_ticket_does_not_block(tmp_path):
    spec = f"{tmp_path}:1"
    held, release, events = multiprocessing.Event(), multiprocessing.Event(), multiprocessing.Queue()
    holder = multiprocessing.Process(target=_hold_slot, args=(spec, held, release))
    holder.start()
    assert held.wait(10)
    dead = multiprocessing.Process(target=lambda: ticket(spec) and os._exit(0))  # leaves a stale ticket behind
    dead.start()
    dead.join(10)
    waiters = []
    for name in ("first", "second", "third"):  # tickets in arrival order, then each waits in its own process
        waiters.append(multiprocessing.Process(target=_wait_for_slot, args=(spec, name, None, events)))
        waiters[-1].start()
        time.sleep(0.3)  # each has taken its ticket before the next starts
    release.set()
    for process in [holder, *waiters]:
        process.join(20)
    order = [events.get(timeout=5)[0] for _ in waiters]
    assert order == ["first", "second", "third"]
    assert not [p for p in (tmp_path / "queue").iterdir() if not p.name.startswith(".")]  # every ticket left


# ------------------------------------------------------------------ bundle files from disk, hashed once


def test_bundle_files_are_sent_from_disk_in_chunks_and_a_changed_file_fails(tmp_path):
    blob = os.urandom(1000)
    (tmp_path / "weights.bin").write_bytes(blob)
    files = {
        "weights.bin": BundleFile.of(tmp_path / "weights.bin", hashlib.sha256(blob).hexdigest()),
        "manifest.json": b"{}",
    }
    chunks = list(bundle_chunks("experts-1", files, chunk_bytes=300))
    assert [len(c.data) for c in chunks] == [300, 300, 300, 100, 2] and not chunks[-1].more
    assembler = BundleAssembler("experts-1", tmp_path / "in", max_total_bytes=1 << 20)
    received = [assembler.add(c) for c in chunks][-1]
    assert received is not None and received["weights.bin"].read_bytes() == blob
    assert assembler.digests["weights.bin"] == hashlib.sha256(blob).hexdigest()
    (tmp_path / "weights.bin").write_bytes(blob[:500])  # shrank after it was listed
    with pytest.raises(OSError, match="shrank"):
        list(bundle_chunks("experts-1", files, chunk_bytes=300))


def test_a_bundle_is_hashed_at_install_from_the_received_digests_and_not_again_until_a_file_changes(
    tmp_path, monkeypatch
):
    pytest.importorskip("onnxruntime.training.api")
    pytest.importorskip("torch")
    from helpers import tiny_bundle

    verified, _ = tiny_bundle(tmp_path / "src")
    files = {name: verified.path(name).read_bytes() for name in sorted(verified.manifest.files)}
    files[MANIFEST] = verified.path(MANIFEST).read_bytes()
    shape_key_id = verified.manifest.shape_key.id
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    hashed = []
    real = bundle_cache.verify_files
    monkeypatch.setattr(bundle_cache, "verify_files", lambda root, listed: hashed.append(root) or real(root, listed))
    cache = BundleCache(tmp_path / "cache")
    cache.install(shape_key_id, files, digests=digests)
    assert cache.get(shape_key_id) is not None and cache.get(shape_key_id) is not None
    assert hashed == []  # install took the digests, the lookups the stats of the files it verified
    assert BundleCache(tmp_path / "cache").get(shape_key_id) is not None and len(hashed) == 1  # a new process hashes
    weights = tmp_path / "cache" / shape_key_id / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    time.sleep(0.01)
    weights.write_bytes(bytes(data))  # same size, new modification time: hashed again, and refused
    assert cache.get(shape_key_id) is None and len(hashed) == 2
    wrong = {**digests, WEIGHTS_FILE: "0" * 64}
    with pytest.raises(BundleIntegrityError, match="differ"):
        cache.install(shape_key_id, files, digests=wrong)
    cache.install(shape_key_id, files)  # no digests: hashed here
    assert len(hashed) == 3


# ------------------------------------------------------------------ an update serialised once


def test_the_pending_store_writes_the_frames_payload_which_reads_back_as_the_update(tmp_path):
    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.weight": np.ones(4, np.float16)}
    update = Update(
        update_id="r1-dev-x",
        round_id=1,
        num_examples=4,
        num_tokens=64,
        metrics={"loss": 1.0},
        routing={},
        trained_experts=((0,),),
        tensors=tensors,
    )
    frame = encode(update)
    store = UpdateStore(tmp_path / "u")
    store.put(update, payload=frame_payload(frame))
    reference = UpdateStore(tmp_path / "v")
    reference.put(update)
    assert (tmp_path / "u" / "r1-dev-x.safetensors").read_bytes() == (
        tmp_path / "v" / "r1-dev-x.safetensors"
    ).read_bytes()
    (loaded,) = store.pending()
    assert encode(loaded) == frame  # a re-send after a restart is the same frame, byte for byte
    assert json.loads((tmp_path / "u" / "r1-dev-x.json").read_text())["round_id"] == 1


def test_timing_lines_parse(caplog):
    import logging

    logger = logging.getLogger("fedmoe.test")
    with caplog.at_level(logging.INFO, logger="fedmoe.test"):
        log_timing(logger, "send_update", 1.23456, round=3, bytes=10)
    match = PATTERN.search(caplog.records[0].getMessage())
    assert match and match.group("phase") == "send_update" and float(match.group("seconds")) == 1.235


def test_slow_garbage_collections_are_logged_as_timing_lines(caplog):
    import gc
    import logging

    logger = logging.getLogger("fedmoe.test")
    callback = log_slow_collections(logger, threshold_s=0.0)
    try:
        with caplog.at_level(logging.INFO, logger="fedmoe.test"):
            gc.collect()
    finally:
        gc.callbacks.remove(callback)
    lines = [PATTERN.search(r.getMessage()) for r in caplog.records]
    assert any(m and m.group("phase") == "gc" and "generation=2" in m.group("rest") for m in lines), caplog.text


def test_blobs_are_byte_for_byte_the_safetensors_packages_both_ways():
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from device_runtime.wire import bytes_to_tensors, tensors_to_bytes

    rng = np.random.default_rng(0)
    for _ in range(100):
        tensors = {}
        for i in range(int(rng.integers(0, 6))):
            dtype = rng.choice([np.float32, np.float16, np.int32])
            shape = tuple(int(x) for x in rng.integers(0, 4, size=int(rng.integers(0, 4))))
            tensors[f"layers.{rng.integers(0, 50)}.w_{i}"] = np.asarray(rng.standard_normal(shape) * 10).astype(dtype)
        blob = tensors_to_bytes(tensors)
        assert blob == safetensors_numpy.save(tensors)
        back, reference = bytes_to_tensors(memoryview(blob)), safetensors_numpy.load(blob)
        assert set(back) == set(reference)  # the package's order varies from process to process (a hash map)
        for name, array in reference.items():
            assert back[name].dtype == array.dtype and back[name].shape == array.shape and back[name].flags.writeable
            np.testing.assert_array_equal(back[name], array)


def test_the_coordinator_sends_a_large_message_as_views_of_at_most_a_fragment_and_a_small_one_whole():
    from coordinator.server import Connection
    from device_runtime.wire import FRAGMENT_BYTES, Ack

    sent: list = []

    async def send(message):
        sent.append(message if isinstance(message, bytes) else list(message))

    conn = Connection.__new__(Connection)
    conn.coord = SimpleNamespace(signer=None)
    conn.ws, conn.machine = SimpleNamespace(send=send), SimpleNamespace(device_id=None)
    tensors = {"experts.weight": np.arange(3 * FRAGMENT_BYTES // 4 + 5, dtype=np.float32)}  # 3 MiB + 20 bytes
    update = Update("r1-dev-x", 1, 4, 64, {"loss": 1.0}, {}, ((0,),), tensors=tensors)
    ack = Ack(update_id="r1-dev-x", accepted=True)
    sizes = [asyncio.run(conn.send(update)), asyncio.run(conn.send(ack))]
    fragmented, whole = sent
    assert [type(part) for part in fragmented] == [memoryview] * len(fragmented) and len(fragmented) >= 4
    assert max(part.nbytes for part in fragmented) <= FRAGMENT_BYTES
    assert b"".join(fragmented) == encode(update) and whole == encode(ack)
    assert sizes == [len(encode(update)), len(encode(ack))]
