"""Signed bundles and assignments (issue 10, item 4), for real: a coordinator made by ``fedmoe-coord init``,
devices enrolled over mutual TLS (they pin the CA, whose key signs), and a man in the middle: a websocket
proxy on loopback between a device and the coordinator serving plain ws:// (``--insecure``), which rewrites
the coordinator's frames as an attacker on the path would (payload re-hashed, so only the signature can
tell). The device must refuse every tampered, unsigned or replayed bundle and assignment, tell the
coordinator with ``Error("bad_signature")`` and log it, and install nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from coordinator.config import load_config
from coordinator.registry import Registry
from coordinator.tls import pinned_token
from device_runtime.bundle import MANIFEST
from device_runtime.bundle_cache import BundleCache
from device_runtime.client import Backoff, DeviceClient, enroll
from device_runtime.errors import ConfigError
from device_runtime.signing import MANIFEST_SIG

pytest.importorskip("onnxruntime.training.api")
pytest.importorskip("torch")
from helpers import ServerThread, config_with, init_by_cli, two_expert_memory  # noqa: E402
from test_client import run_until  # noqa: E402

MAX_MIB = 4.0
FIT = {"batch_size": 2, "seq_len": 8, "local_steps": 2}


# ---------------------------------------------------------------- a man in the middle


def split(raw: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack_from(">I", raw)
    return json.loads(raw[4 : 4 + hlen]), raw[4 + hlen :]


def join(header: dict, payload: bytes) -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body + payload


class Proxy:
    """Relays websocket frames between devices and an upstream ws:// coordinator; every coordinator frame goes
    through ``tamper(header, payload, connection)``, which returns the frame to deliver (None: drop it).
    ``assignments`` collects the update ids of the assignments the coordinator sent."""

    def __init__(self, upstream: str, tamper):
        self.upstream, self.tamper, self.assignments = upstream, tamper, []

    async def handler(self, device):
        async with connect(self.upstream, compression=None, max_size=None) as coordinator:

            async def down():
                async for raw in coordinator:
                    header, payload = split(raw)
                    if header.get("type") == "assignment":
                        self.assignments.append(header["update_id"])
                    out = self.tamper(header, payload, device)
                    if out is not None:
                        await device.send(out)

            async def up():
                async for raw in device:
                    await coordinator.send(raw)

            tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()


def passthrough(header, payload, _):
    return join(header, payload)


def flip_tensor(header, payload, _):
    """A tensor value changed, the payload's sha256 in the header made to match: only the signature differs."""
    if header["type"] == "assignment":
        payload = payload[:-1] + bytes([payload[-1] ^ 0x40])
        header["payload"]["sha256"] = hashlib.sha256(payload).hexdigest()
    return join(header, payload)


def move_round(header, payload, _):
    """The signed assignment of one round presented as the next round's."""
    if header["type"] == "assignment":
        header["round_id"] += 1
    return join(header, payload)


def raise_learning_rate(header, payload, _):
    if header["type"] == "assignment":
        header["config"]["learning_rate"] *= 1000
    return join(header, payload)


def strip_signature(header, payload, _):
    header.pop("signature", None)
    return join(header, payload)


def drop_manifest_signature(header, payload, _):
    """The bundle transfer without its manifest.sig chunk (an unsigned bundle)."""
    if header["type"] == "bundle_data" and header["name"] == MANIFEST_SIG:
        return None
    return join(header, payload)


class ReplayFirstAssignment:
    """The next assignment to another device is replaced, once, by the first assignment the coordinator sent to any
    device (signed for that one). Once only: on a loaded machine a round can pass its deadline before the test stops
    the clients, and a second replay would be a second rejection."""

    def __init__(self):
        self.first, self.replayed_to = None, []

    def __call__(self, header, payload, device):
        if header["type"] == "assignment":
            if self.first is None:
                self.first = (device, join(header, payload))
            elif self.first[0] is not device and not self.replayed_to:
                self.replayed_to.append(device)
                return self.first[1]
        return join(header, payload)


# ---------------------------------------------------------------- the federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """``fedmoe-coord init`` state; devices a and b enrolled over mutual TLS, and a trained one round there
    (the happy path: signed bundle and assignment verified); then the coordinator is stopped."""
    root = tmp_path_factory.mktemp("signing")
    config = init_by_cli(root)
    cfg = config_with(
        load_config(config),
        max_message_mib=MAX_MIB,
        min_fit_clients=1,
        max_fit_clients=1,
        fit=FIT,
        deadline_s=60,
        num_rounds=1,
    )  # no second round holds up the attacks on device b
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "sport"}) + "\n" for t in ("the match team won",) * 4))
    profile = {"memory_mib": two_expert_memory(root / "checkpoint"), "gflops": 5.0}
    server = ServerThread(cfg)
    try:
        registry = Registry(cfg.registry_url)
        creds = {
            name: asyncio.run(
                enroll(
                    server.url,
                    pinned_token(registry.create_enroll_token(name, 600), cfg),
                    name,
                    credentials_path=root / name / "credentials.json",
                    profile=profile,
                )
            )
            for name in ("a", "b")
        }
        registry.close()
        client = DeviceClient(
            server.url,
            creds["a"],
            data,
            cache_dir=root / "a" / "state",
            max_message_mib=MAX_MIB,
            threads=1,
            profile=profile,
        )
        asyncio.run(run_until(client, lambda: acked(cfg), timeout=120))  # it exports the bundle first
        (shape_key_id,) = client.cache.ids()
        assert (root / "a" / "state" / "bundles" / shape_key_id / MANIFEST_SIG).is_file()
    finally:
        server.stop()
    return {"root": root, "cfg": cfg, "creds": creds, "data": data, "profile": profile, "shape": shape_key_id}


def acked(cfg) -> bool:
    registry = Registry(cfg.registry_url)
    try:
        return any(r.status == "finished" for r in registry.list_rounds())
    finally:
        registry.close()


def rejections(rows: dict) -> dict:
    return {u: r.reason for u, r in rows.items() if not r.accepted}


def attack(fed, tmp_path, tamper, *, names=("b",), until=rejections, **overrides):
    """The coordinator serving plain ws:// (``serve --insecure``: its CA still signs) and the devices ``names``
    connected through a :class:`Proxy` running ``tamper``, until ``until(rows)`` (default: an assignment was
    rejected). Returns ``until(rows)``, ``rows`` the registry's updates of the assignments sent, by update id."""
    # a short deadline: a round resumed from the previous test may wait for a device not connected in this one
    cfg = config_with(fed["cfg"], tls_cert="", tls_key="", insecure=True, num_rounds=0, deadline_s=8, **overrides)
    server = ServerThread(cfg)
    registry = Registry(cfg.registry_url)
    proxy = Proxy(server.url, tamper)

    def outcome():
        return until({u: row for u in proxy.assignments if (row := registry.get_update(u)) is not None})

    async def main():
        async with serve(proxy.handler, "127.0.0.1", 0, compression=None, max_size=None) as srv:
            url = f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
            clients = [
                DeviceClient(
                    url,
                    fed["creds"][n],
                    fed["data"],
                    cache_dir=tmp_path / n,
                    insecure=True,
                    max_message_mib=MAX_MIB,
                    threads=1,
                    profile=fed["profile"],
                    heartbeat_s=1,
                    backoff=Backoff(base_s=0.05, max_s=0.2),
                )
                for n in names
            ]
            await asyncio.gather(*(run_until(c, outcome, timeout=60) for c in clients))

    try:
        asyncio.run(main())
        return outcome()
    finally:
        registry.close()
        server.stop()


def refused_in_log(caplog, what: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fedmoe.device"
        and r.levelno == logging.ERROR
        and "bad_signature" in r.getMessage()
        and what in r.getMessage()
    ]


# ---------------------------------------------------------------- the tests


def test_happy_path_over_mutual_tls_verifies_the_signed_bundle_and_assignment(fed):
    assert fed["cfg"].mutual_tls and fed["creds"]["a"].ca_cert
    registry = Registry(fed["cfg"].registry_url)
    try:
        (round_,) = [r for r in registry.list_rounds() if r.status == "finished"]
        assert len(registry.accepted_updates(round_.id)) == 1
    finally:
        registry.close()


def test_the_proxy_alone_changes_nothing(fed, tmp_path):
    """The man in the middle relaying faithfully: the device trains and its update counts (it is the
    tampering that the device refuses, not the proxy or plain ws://)."""
    accepted = attack(fed, tmp_path, passthrough, until=lambda rows: [u for u, r in rows.items() if r.accepted])
    assert accepted


@pytest.mark.parametrize(
    "tamper",
    [flip_tensor, raise_learning_rate, move_round, strip_signature],
    ids=["tensor", "header", "another-round", "unsigned"],
)
def test_a_tampered_or_unsigned_assignment_is_refused(fed, tmp_path, caplog, tamper):
    caplog.set_level(logging.INFO)
    rejected = attack(fed, tmp_path, tamper)
    assert rejected and all("device reported bad_signature" in reason for reason in rejected.values()), rejected
    what = "unsigned assignment refused" if tamper is strip_signature else "signature does not verify"
    assert refused_in_log(caplog, what), caplog.text
    assert BundleCache(tmp_path / "b" / "bundles").ids() == []  # refused before the bundle was even fetched


def test_an_assignment_replayed_to_another_device_is_refused(fed, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    replay = ReplayFirstAssignment()
    rejected = attack(fed, tmp_path, replay, names=("a", "b"), min_fit_clients=2, max_fit_clients=2)
    assert replay.replayed_to and len(rejected) == 1 and "bad_signature" in next(iter(rejected.values()))
    assert refused_in_log(caplog, "signed for another device"), caplog.text


def test_an_unsigned_bundle_is_refused_and_nothing_is_installed(fed, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    rejected = attack(fed, tmp_path, drop_manifest_signature)
    assert rejected and all("device reported bad_signature" in r and "unsigned bundle" in r for r in rejected.values())
    assert BundleCache(tmp_path / "b" / "bundles").ids() == []
    assert not list((tmp_path / "b" / "bundles").iterdir())  # no staging directory left either


@pytest.mark.parametrize("part", ["file", "manifest"])
def test_a_bundle_tampered_on_the_coordinator_after_signing_is_refused(fed, tmp_path, caplog, part):
    """An attacker who can write the coordinator's bundle directory but not read its key: a graph file swapped
    with the manifest's sha256 updated to match, or the manifest alone edited (the coordinator's own check
    passes in both cases; only the signature tells)."""
    caplog.set_level(logging.INFO)
    root = fed["root"] / "state" / "bundles" / fed["shape"]
    saved = {name: (root / name).read_bytes() for name in ("tokenizer.json", MANIFEST)}
    manifest = json.loads(saved[MANIFEST])
    if part == "file":
        tokenizer = saved["tokenizer.json"].replace(b'"the"', b'"thE"')
        assert tokenizer != saved["tokenizer.json"]
        (root / "tokenizer.json").write_bytes(tokenizer)
        manifest["files"]["tokenizer.json"] = hashlib.sha256(tokenizer).hexdigest()
    else:
        manifest["training"]["learning_rate"] = 1.0
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    try:
        rejected = attack(fed, tmp_path, passthrough)
    finally:
        for name, content in saved.items():
            (root / name).write_bytes(content)
    assert rejected and all(
        "bad_signature" in r and "manifest signature does not verify" in r for r in rejected.values()
    ), rejected
    assert any(
        "refused" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records if r.name == "fedmoe.device"
    )
    assert BundleCache(tmp_path / "b" / "bundles").ids() == [] and not list((tmp_path / "b" / "bundles").iterdir())


def test_a_device_that_pinned_a_tls_coordinator_needs_insecure_for_plain_ws(fed, tmp_path):
    with pytest.raises(ConfigError, match="--insecure"):
        DeviceClient("ws://127.0.0.1:1", fed["creds"]["b"], fed["data"], cache_dir=tmp_path, profile=fed["profile"])
