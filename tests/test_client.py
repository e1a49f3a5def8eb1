"""The device client against a real websocket server on port 0 that speaks the real protocol (real
sockets, real encode/decode, real Ed25519 checks), with faults injected on the server side: dropped
connections, corrupted bundle chunks, malformed and oversized frames. Training uses a real tiny bundle
(``export.bundle_writer`` on ``helpers.TRAINER_MIXTRAL``) and ONNX Runtime training.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from safetensors.numpy import load_file
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from device_runtime.auth import Credentials, generate_keypair, load_credentials, verify_challenge
from device_runtime.bundle import MANIFEST, WEIGHTS_FILE
from device_runtime.bundle_cache import BundleCache
from device_runtime.client import Backoff, DeviceClient, enroll
from device_runtime.errors import AuthError, BundleError, BundleIntegrityError
from device_runtime.session import DeviceSession, Report, Send, Train
from device_runtime.update_store import UpdateStore
from device_runtime.wire import (
    PROTOCOL_VERSION,
    Ack,
    Assignment,
    Auth,
    AuthOk,
    BundleData,
    BundleRequest,
    Challenge,
    Enroll,
    EnrollOk,
    Error,
    FitConfig,
    Heartbeat,
    Hello,
    Update,
    bundle_chunks,
    decode,
    encode,
)

pytest.importorskip("onnxruntime.training.api")
pytest.importorskip("torch")
from helpers import SEQ_LEN, one_round_federation, run_cli_device_round, tiny_bundle  # noqa: E402

MAX_MIB = 2.0
COORD_MIB = 4.0  # the real coordinator of the end-to-end test
PROFILE = {"memory_mib": 512, "gflops": 5.0}
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A verified tiny bundle (2 MoE layers, experts (0, 2) and (1, 3) of 4) and a JSONL data file."""
    return tiny_bundle(tmp_path_factory.mktemp("client"))


def bundle_files(bundle) -> dict[str, bytes]:
    files = {name: bundle.path(name).read_bytes() for name in sorted(bundle.manifest.files)}
    files[MANIFEST] = bundle.path(MANIFEST).read_bytes()
    return files


def assignment_of(bundle, update_id="r1-dev-a", local_steps=2) -> Assignment:
    m = bundle.manifest
    return Assignment(
        round_id=1,
        update_id=update_id,
        model_version=0,
        shape_key=m.shape_key,
        expert_ids=m.expert_ids,
        config=FitConfig(batch_size=2, seq_len=SEQ_LEN, learning_rate=1e-2, local_steps=local_steps),
        tensors=load_file(str(bundle.path(WEIGHTS_FILE))),
    )


# ---------------------------------------------------------------- a protocol-speaking test server


@dataclass
class Server:
    """A coordinator stand-in: real enrollment and challenge-response; per-test fault hooks.

    Attributes:
        assignment: sent after every successful authentication (like the coordinator re-sending a pending one).
        files: the bundle served on BundleRequest. corrupt: "file" (a chunk's bytes flipped, frame re-signed)
            or "frame" (payload flipped after framing) on the first chunk. drop_first_update: close the
            connection instead of acking the first Update. after_auth: raw frames sent after AuthOk.
        oversize_after_errors: send a frame above max_size once this many Error messages arrived.
    """

    tokens: set = field(default_factory=lambda: {"good-token"})
    keys: dict = field(default_factory=dict)
    assignment: Assignment | None = None
    files: dict | None = None
    corrupt: str | None = None
    drop_first_update: bool = False
    after_auth: list = field(default_factory=list)
    oversize_after_errors: int = -1
    updates_seen: list = field(default_factory=list)
    counted: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    bundle_requests: int = 0
    connections: int = 0
    close_codes: list = field(default_factory=list)

    async def handler(self, ws):
        try:
            if await self.handshake(ws):
                self.connections += 1
                for raw in self.after_auth:
                    await ws.send(raw)
                if self.assignment is not None:
                    await ws.send(encode(self.assignment))
                async for raw in ws:
                    await self.dispatch(ws, decode(raw, max_size=int(MAX_MIB * 2**20)))
        except ConnectionClosed:
            pass
        finally:
            self.close_codes.append(ws.close_code)

    async def handshake(self, ws) -> bool:
        while True:
            msg = decode(await ws.recv(), max_size=1 << 20)
            if isinstance(msg, Enroll):
                if msg.token not in self.tokens:
                    await ws.send(encode(Error(code="auth", message="unknown token")))
                    continue
                self.tokens.discard(msg.token)
                self.keys[f"dev-{msg.name}"] = msg.public_key
                await ws.send(encode(EnrollOk(device_id=f"dev-{msg.name}")))
                continue
            assert isinstance(msg, Hello) and msg.profile == PROFILE
            nonce = os.urandom(32)
            await ws.send(encode(Challenge(nonce=nonce)))
            auth = decode(await ws.recv(), max_size=1 << 20)
            assert isinstance(auth, Auth)
            try:
                verify_challenge(self.keys[msg.device_id], nonce, msg.device_id, auth.signature)
            except AuthError as exc:
                await ws.send(encode(Error(code="auth", message=str(exc))))
                await ws.close(1008)
                return False
            await ws.send(encode(AuthOk()))
            return True

    async def dispatch(self, ws, msg):
        if isinstance(msg, BundleRequest):
            self.bundle_requests += 1
            for i, chunk in enumerate(bundle_chunks(msg.shape_key_id, self.files, chunk_bytes=64 << 10)):
                await ws.send(self.frame(chunk, first=i == 0))
        elif isinstance(msg, Update):
            self.updates_seen.append(msg)
            if self.drop_first_update and len(self.updates_seen) == 1:
                await ws.close(1011, "dropped during upload")
                return
            self.counted.setdefault(msg.update_id, msg)
            await ws.send(encode(Ack(update_id=msg.update_id, accepted=True)))
        elif isinstance(msg, Error):
            self.errors.append(msg)
            if len(self.errors) == self.oversize_after_errors:
                await ws.send(b"\x00" * (int(MAX_MIB * 2**20) + 1))
        else:
            assert isinstance(msg, Heartbeat), msg

    def frame(self, chunk: BundleData, *, first: bool) -> bytes:
        if first and self.corrupt == "file":
            chunk = replace(chunk, data=bytes([chunk.data[0] ^ 1]) + chunk.data[1:])
        raw = encode(chunk)
        if first and self.corrupt == "frame":
            raw = raw[:-1] + bytes([raw[-1] ^ 1])
        return raw


async def with_server(server: Server, body):
    """Run ``body(url)`` against ``server`` listening on a free port."""
    async with serve(server.handler, "127.0.0.1", 0, compression=None, max_size=int(MAX_MIB * 2**20)) as srv:
        port = srv.sockets[0].getsockname()[1]
        return await asyncio.wait_for(body(f"ws://127.0.0.1:{port}"), TIMEOUT_S)


def make_client(url, creds, data, tmp_path, **kwargs) -> DeviceClient:
    return DeviceClient(
        url,
        creds,
        data,
        cache_dir=tmp_path / "state",
        max_message_mib=MAX_MIB,
        threads=1,
        profile=PROFILE,
        heartbeat_s=0.2,
        backoff=Backoff(base_s=0.05, max_s=0.2),
        **kwargs,
    )


async def enrolled(url: str, tmp_path) -> Credentials:
    return await enroll(url, "good-token", "pi4", credentials_path=tmp_path / "creds.json", profile=PROFILE)


async def run_until(client: DeviceClient, condition, timeout=TIMEOUT_S, settle_s=0.0):
    """Run the client until ``condition()`` holds (+ ``settle_s``), then stop it; it must exit within 10 s."""
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        await asyncio.sleep(settle_s)
    finally:
        client.stop()
        await asyncio.wait_for(task, 10)


# ---------------------------------------------------------------- enrollment and authentication


def test_enrollment_writes_a_0600_credentials_file_with_the_registered_key(tmp_path):
    server = Server()

    async def body(url):
        with pytest.raises(AuthError):
            await enroll(url, "bad-token", "pi4", credentials_path=tmp_path / "bad.json", profile=PROFILE)
        return await enrolled(url, tmp_path)

    creds = asyncio.run(with_server(server, body))
    path = tmp_path / "creds.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (tmp_path / "bad.json").exists()
    loaded = load_credentials(path)
    assert loaded == creds and loaded.device_id == "dev-pi4"
    assert server.keys["dev-pi4"] == loaded.public_key


def test_wrong_private_key_raises_auth_error(tmp_path, bundle):
    server = Server()

    async def body(url):
        creds = await enrolled(url, tmp_path)
        impostor = Credentials(device_id=creds.device_id, private_key=generate_keypair()[0])
        with pytest.raises(AuthError, match="refused"):
            await make_client(url, impostor, bundle[1], tmp_path).run()

    asyncio.run(with_server(server, body))
    assert server.connections == 0 and 1008 in server.close_codes


# ---------------------------------------------------------------- rounds


def test_update_dropped_during_upload_is_resent_with_the_same_id_and_counted_once(tmp_path, bundle):
    verified, data = bundle
    assignment = assignment_of(verified)
    server = Server(assignment=assignment, files=bundle_files(verified), drop_first_update=True)

    async def body(url):
        client = make_client(url, await enrolled(url, tmp_path), data, tmp_path)
        await run_until(client, lambda: server.counted and not client.store.pending_ids())
        return client

    client = asyncio.run(with_server(server, body))
    assert [u.update_id for u in server.updates_seen] == [assignment.update_id] * 2  # sent, dropped, re-sent
    assert list(server.counted) == [assignment.update_id]
    assert server.connections >= 2 and server.bundle_requests == 1  # re-sent assignment: no refetch, no retrain
    assert client.store.is_acked(assignment.update_id) and client.cache.ids() == [verified.manifest.shape_key.id]
    first, again = server.updates_seen
    assert first.num_examples == again.num_examples == 4 and first.num_tokens > 0
    for name in first.tensors:
        np.testing.assert_array_equal(first.tensors[name], again.tensors[name])
    trainable = {t.name: t.shape for t in verified.manifest.tensors if t.trainable}
    assert {n: t.shape for n, t in first.tensors.items()} == trainable
    changed = [n for n in trainable if np.abs(first.tensors[n] - assignment.tensors[n]).max() > 0]
    assert changed, "training changed no tensor"
    assert first.routing["expert_ids"] == [[0, 2], [1, 3]]
    assert all(set(t) <= set(ids) for t, ids in zip(first.trained_experts, ((0, 2), (1, 3))))
    assert first.metrics["steps"] == 2 and np.isfinite(first.metrics["loss"]) and first.metrics["peak_rss_mb"] > 10


def test_a_restarted_device_resumes_the_upload_from_disk(tmp_path, bundle):
    verified, data = bundle
    stored = Update(
        update_id="r7-dev-pi4-x",
        round_id=7,
        num_examples=3,
        num_tokens=30,
        metrics={"loss": 1.5},
        routing={"num_tokens": 0},
        trained_experts=((0,), (1,)),
        tensors={"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
    )
    UpdateStore(tmp_path / "state" / "updates").put(stored)  # left by a previous process
    server = Server()

    async def body(url):
        client = make_client(url, await enrolled(url, tmp_path), data, tmp_path)
        await run_until(client, lambda: server.counted and not client.store.pending_ids())

    asyncio.run(with_server(server, body))
    (got,) = server.updates_seen
    assert got == stored
    np.testing.assert_array_equal(got.tensors["w"], stored.tensors["w"])


@pytest.mark.parametrize("corrupt", ["file", "frame"])
def test_corrupted_bundle_chunk_is_rejected_and_nothing_is_trained(tmp_path, bundle, corrupt):
    verified, data = bundle
    server = Server(assignment=assignment_of(verified), files=bundle_files(verified), corrupt=corrupt)

    async def body(url):
        client = make_client(url, await enrolled(url, tmp_path), data, tmp_path)
        await run_until(client, lambda: any(e.code == "bad_payload" for e in server.errors))
        await asyncio.sleep(0.3)
        return client

    client = asyncio.run(with_server(server, body))
    assert server.updates_seen == [] and client.cache.ids() == [] and not client.store.pending_ids()
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "state" / "bundles").iterdir())


def test_malformed_and_oversized_frames_get_errors_and_a_reconnect_not_a_crash(tmp_path, bundle):
    garbage = b"\x00\x00\x00\x05hello"
    header = b'{"v":%d,"type":"teapot"}' % PROTOCOL_VERSION
    unknown = len(header).to_bytes(4, "big") + header
    server = Server(after_auth=[garbage, unknown], oversize_after_errors=2)

    async def body(url):
        client = make_client(url, await enrolled(url, tmp_path), bundle[1], tmp_path)
        # both connections' answers, not just the second connection's opening
        await run_until(client, lambda: server.connections >= 2 and len(server.errors) >= 4)

    asyncio.run(with_server(server, body))
    codes = [e.code for e in server.errors]
    assert codes[:4] == ["bad_header", "unknown_type"] * 2  # the same answers on the second connection
    assert 1009 in server.close_codes  # the client refused the oversized frame, then reconnected


def test_stop_abandons_training_after_the_current_step_and_keeps_state(tmp_path, bundle, caplog):
    verified, data = bundle
    server = Server(assignment=assignment_of(verified, local_steps=1_000_000), files=bundle_files(verified))

    async def body(url):
        client = make_client(url, await enrolled(url, tmp_path), data, tmp_path)
        await run_until(client, lambda: client.cache.ids(), settle_s=1.5)  # stop() mid-training
        return client

    with caplog.at_level("INFO", logger="fedmoe.device"):
        client = asyncio.run(with_server(server, body))
    assert "abandoned (stopping)" in caplog.text
    assert server.updates_seen == [] and not client.store.pending_ids()
    assert not list((tmp_path / "state" / "bundles").glob(".tmp-*"))  # the transfer's staging directory is gone
    assert BundleCache(tmp_path / "state" / "bundles").ids() == [verified.manifest.shape_key.id]


# ---------------------------------------------------------------- I/O-free parts


def test_session_does_not_retrain_a_known_update_and_fetches_each_bundle_once(bundle, tmp_path):
    verified, _ = bundle
    a = assignment_of(verified, "u1")
    b = assignment_of(verified, "u2")
    session = DeviceSession(
        cached=[], known_updates=["u0"], max_bundle_bytes=1 << 30, staging=BundleCache(tmp_path).staging_dir
    )
    first = session.on_message(a)
    assert [type(x) for x in first] == [Report, Send] and isinstance(first[1].message, BundleRequest)
    assert session.on_message(b) == []  # same shape: waits for the same transfer
    assert isinstance(session.on_message(a)[0], Report)  # re-sent assignment: not queued twice
    assert session.bundle_installed(verified.manifest.shape_key.id) == [Train(a), Train(b)]
    assert isinstance(session.on_message(replace(a, update_id="u0"))[0], Report)
    assert session.on_message(Ack(update_id="u2", accepted=True))[0].update_id == "u2"


def test_bundle_cache_evicts_least_recently_used_and_rejects_tampering(tmp_path, bundle):
    verified, _ = bundle
    files = bundle_files(verified)
    manifest = json.loads(files[MANIFEST])

    def as_shape(**key):  # the same files under another shape key (the cache checks hashes and ids only)
        other = {**manifest, "shape_key": {**manifest["shape_key"], **key}}
        return {**files, MANIFEST: json.dumps(other).encode()}

    plain, prox, lora = verified.manifest.shape_key.id, "experts-prox-2.2", "lora4-2.2"
    cache = BundleCache(tmp_path / "c", max_bundles=2, max_bytes=1 << 30)
    cache.install(plain, files)
    cache.install(prox, as_shape(prox=True))
    assert cache.get(plain) is not None  # plain is now the most recently used
    cache.install(lora, as_shape(trainable_mode="lora", lora_rank=4))
    assert cache.ids() == [plain, lora]
    small = BundleCache(tmp_path / "s", max_bundles=9, max_bytes=int(1.5 * sum(map(len, files.values()))))
    small.install(plain, files)
    small.install(prox, as_shape(prox=True))
    assert small.ids() == [prox]  # byte bound: one bundle fits

    tampered = {**files, WEIGHTS_FILE: files[WEIGHTS_FILE][:-1] + bytes([files[WEIGHTS_FILE][-1] ^ 1])}
    with pytest.raises(BundleIntegrityError):
        cache.install(plain, tampered)
    with pytest.raises(BundleIntegrityError, match="does not list"):
        cache.install(plain, {**files, "extra.bin": b"x"})
    with pytest.raises(BundleError, match="requested"):
        cache.install(prox, files)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "c").iterdir())
    (tmp_path / "c" / lora / WEIGHTS_FILE).write_bytes(b"rotten")  # corrupted on disk after install
    assert cache.get(lora) is None and cache.ids() == [plain]


def test_backoff_doubles_up_to_the_cap_with_jitter():
    import random

    backoff, rng = Backoff(base_s=1.0, max_s=8.0), random.Random(0)
    delays = [backoff.delay(a, rng) for a in range(6)]
    for attempt, d in enumerate(delays):
        full = min(8.0, 2.0**attempt)
        assert 0.5 * full <= d <= full


# ---------------------------------------------------------------- end to end: real coordinator, CLI, SIGTERM


def test_cli_device_completes_a_round_with_the_real_coordinator_and_exits_on_sigterm(tmp_path):
    """``fedmoe-device enroll`` + ``run`` in subprocesses against ``coordinator.server``: one HFedMoE round."""
    import sys

    with one_round_federation(tmp_path, max_message_mib=COORD_MIB) as (server, registry, data, memory):
        env = {
            **os.environ,
            "FEDMOE_DEVICE_HOME": str(tmp_path / "device"),
            "FEDMOE_ENROLL_TOKEN": registry.create_enroll_token("pi-cli", 3600),
        }
        round_, update, log = run_cli_device_round(
            [sys.executable, "-m", "device_runtime.cli"],
            env,
            server.url,
            registry,
            name="pi-cli",
            memory_mib=memory,
            max_message_mib=COORD_MIB,
            data=data,
        )
        assert stat.S_IMODE((tmp_path / "device" / "credentials.json").stat().st_mode) == 0o600
        assert round_.metrics["num_clients"] == 1 and update.num_examples == 4
        assert registry.latest_model_version().version == 1
        assert f"update {update.update_id} accepted" in log, log
        assert not list((tmp_path / "device" / "state" / "updates").glob("*.safetensors"))


def test_a_lora_round_moves_only_routers_and_adapters_and_changes_the_adapters(tmp_path):
    """LoRA mode end to end (CLI device, real coordinator): the global state, the bundle's weights and the
    update hold routers and LoRA adapters only (the frozen expert weights stay in the ORT checkpoint), and the
    round changes the adapters."""
    import sys
    from pathlib import Path

    from coordinator.tensor_store import TensorStore

    with one_round_federation(tmp_path, max_message_mib=COORD_MIB, trainable_mode="lora", lora_rank=2) as (
        server,
        registry,
        data,
        memory,
    ):
        env = {
            **os.environ,
            "FEDMOE_DEVICE_HOME": str(tmp_path / "device"),
            "FEDMOE_ENROLL_TOKEN": registry.create_enroll_token("pi-lora", 3600),
        }
        round_, update, log = run_cli_device_round(
            [sys.executable, "-m", "device_runtime.cli"],
            env,
            server.url,
            registry,
            name="pi-lora",
            memory_mib=memory,
            max_message_mib=COORD_MIB,
            data=data,
        )
        store = TensorStore(Path(server.cfg.state_dir) / "tensors")
        before, after = (load_file(str(store.path(registry.get_model_version(v).tensor_sha256))) for v in (0, 1))
    assert f"update {update.update_id} accepted" in log, log
    assert before.keys() == after.keys() and before
    assert all(n.endswith("mlp.gate.weight") or "_lora_" in n for n in after), sorted(after)
    assert any(n.endswith("gate_up_lora_B") for n in after)
    changed = [n for n in after if "_lora_B" in n and not np.array_equal(before[n], after[n])]
    assert changed, "the round left every LoRA B unchanged"
    (weights,) = (tmp_path / "device").rglob(WEIGHTS_FILE)
    assert not [n for n in load_file(str(weights)) if n.endswith(("gate_up_proj", "down_proj"))]
