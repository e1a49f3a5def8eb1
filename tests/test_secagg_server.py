"""Secure aggregation over the real protocol: a coordinator on port 0 (``ServerThread``, a real bundle export of a
tiny Mixtral) and devices speaking the wire by hand in threads, each with a real ``DeviceSecAgg``. Checked: a
round where one device drops before masking and one between masking and unmasking commits exactly the FedAvg of
the three masked updates, while the stored payloads are uniformly masked; and a round with too few devices left
to unmask fails with a clear reason and leaves the model as it was."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from coordinator.federation import tensor_store
from coordinator.planning import to_client_update, update_meta
from coordinator.registry import Registry
from coordinator.secagg import masked_payload
from coordinator.strategy import FedAvg, HFedMoE
from device_runtime.auth import sign_challenge
from device_runtime.bundle import MANIFEST, Manifest
from device_runtime.secagg import WORD, DeviceSecAgg, row_weighting, slots_of
from device_runtime.wire import (
    PROTOCOL_VERSION,
    Ack,
    Assignment,
    Auth,
    AuthOk,
    Hello,
    Message,
    SecAggInbox,
    SecAggMasked,
    SecAggRoster,
    SecAggStart,
    SecAggUnmask,
)

pytest.importorskip("torch")
from helpers import ServerThread, fake_update, initialised_coordinator, two_expert_memory  # noqa: E402
from test_server import MAX_MIB, enroll, recv, send, wait_for, ws  # noqa: E402


@pytest.fixture
def secure(request, tmp_path, monkeypatch):
    """``(server, config, memory_mib)``: a coordinator with secure aggregation; ``request.param``: the number of
    devices per round, the share threshold and the strategy."""
    devices, threshold, strategy = request.param
    monkeypatch.setenv("FEDMOE_CACHE", str(tmp_path / "cache"))
    cfg = initialised_coordinator(
        tmp_path,
        tmp_path / "state",
        max_message_mib=MAX_MIB,
        strategy=strategy,
        privacy={"secure_aggregation": True, "secure_threshold": threshold, "secure_timeout_s": 8.0},
        min_fit_clients=2,
        max_fit_clients=devices,
        fraction_fit=1.0,
        deadline_s=120,
        max_attempts=5,
        keep_update_tensors=True,
        eval_data="",
    )
    srv = ServerThread(cfg)
    yield srv, cfg, two_expert_memory(tmp_path / "checkpoint")
    srv.stop()


class HandDevice(threading.Thread):
    """A device that speaks the secure round by hand. ``drop``: ``"before_masking"`` (it leaves once its inbox
    arrived), ``"after_masking"`` (once its masked update is acknowledged) or None. ``scale``: its update moves
    the assigned rows by ``scale`` times ``fake_update``'s shift; ``examples``: its num_examples."""

    def __init__(self, server, cfg, device_id, private, profile, *, scale, examples, drop=None):
        super().__init__(daemon=True)
        self.server, self.state_dir = server, Path(cfg.state_dir)
        self.device_id, self.private, self.profile = device_id, private, profile
        self.scale, self.examples, self.drop = scale, examples, drop
        self.update = None  # the plain update it masked: (assignment, manifest, ClientUpdate)
        self.ack: Ack | None = None
        self.error: BaseException | None = None
        self.barrier: threading.Barrier | None = None

    def run(self):
        try:
            with ws(self.server) as conn:
                send(conn, Hello(device_id=self.device_id, protocol_version=PROTOCOL_VERSION, profile=self.profile))
                challenge = recv(conn)
                self.barrier.wait(60)  # every device answers its challenge at once: one round selects them all
                send(
                    conn,
                    Auth(
                        device_id=self.device_id,
                        signature=sign_challenge(self.private, challenge.nonce, self.device_id),
                    ),
                )
                assert isinstance(recv(conn), AuthOk)
                self.serve(conn)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def serve(self, conn):
        state = assignment = None
        while True:
            msg: Message = recv(conn, timeout=120)
            if isinstance(msg, SecAggStart):
                state = DeviceSecAgg(msg, self.device_id)
                send(conn, state.keys())
            elif isinstance(msg, Assignment):
                assignment = msg
            elif isinstance(msg, SecAggRoster):
                send(conn, state.on_roster(msg))
            elif isinstance(msg, SecAggInbox):
                state.on_inbox(msg)
                if self.drop == "before_masking":
                    return
                send(conn, self.masked(state, assignment))
            elif isinstance(msg, Ack):
                self.ack = msg
                if self.drop == "after_masking":
                    return
            elif isinstance(msg, SecAggUnmask):
                send(conn, state.on_unmask(msg))
                return
            else:
                raise AssertionError(f"unexpected {msg}")

    def masked(self, state, assignment) -> SecAggMasked:
        manifest = Manifest.from_json((self.state_dir / "bundles" / assignment.shape_key.id / MANIFEST).read_text())
        plain = fake_update(assignment, manifest)
        base = {n: assignment.tensors[n] for n in plain.tensors}
        tensors = {n: (base[n] + self.scale * (t - base[n])).astype(np.float32) for n, t in plain.tensors.items()}
        plain = replace(plain, tensors=tensors, num_examples=self.examples)
        meta = update_meta(manifest, assignment.expert_ids, plain.trained_experts, plain.routing, plain.metrics)
        self.update = to_client_update(self.device_id, self.examples, meta, tensors)
        weight_of = row_weighting(
            state.start, self.examples, plain.routing, assignment.expert_ids, plain.trained_experts
        )
        data = state.mask(slots_of(manifest, assignment.expert_ids), base, tensors, weight_of)
        return SecAggMasked(
            round_id=assignment.round_id,
            update_id=assignment.update_id,
            metrics=plain.metrics,
            routing=plain.routing,
            trained_experts=plain.trained_experts,
            data=data,
        )


def start_devices(server, cfg, memory, plans):
    """Enroll one HandDevice per ``(name, scale, examples, drop)`` and start them; they authenticate together, so
    that the first round selects them all (``min_fit_clients`` is 2 of them)."""
    profile = {"memory_mib": memory, "gflops": 5.0}
    devices = []
    for name, scale, examples, drop in plans:
        device_id, private, _ = enroll(server, cfg, name, profile)
        devices.append(HandDevice(server, cfg, device_id, private, profile, scale=scale, examples=examples, drop=drop))
    barrier = threading.Barrier(len(devices))
    for device in devices:
        device.barrier = barrier
        device.start()
    return devices


def _round(registry, devices):
    """The first round once it ended; raises the first device's error as soon as one failed."""
    for device in devices:
        assert device.error is None, repr(device.error)
    rounds = sorted(registry.list_rounds(), key=lambda r: r.id)
    return rounds[0] if rounds and rounds[0].status != "running" else None


@pytest.mark.parametrize("secure", [(4, 0.3, "fedavg"), (4, 0.3, "hfedmoe")], indirect=True, ids=["fedavg", "hfedmoe"])
def test_a_secure_round_over_websockets_recovers_dropouts_and_equals_the_plain_strategy(secure):
    """d drops before masking (its pairwise masks are removed with its reconstructed key), c after masking (its
    self mask is removed with its reconstructed seed; it reveals nothing): the new version is the strategy's plain
    aggregation of a, b, c (HFedMoE: with the row weights each device computed itself)."""
    server, cfg, memory = secure
    plans = [("a", 1.0, 1, None), ("b", 2.0, 2, None), ("c", -1.0, 4, "after_masking"), ("d", 3.0, 3, "before_masking")]
    devices = start_devices(server, cfg, memory, plans)
    registry = Registry(cfg.registry_url)
    try:
        finished = wait_for(lambda: _round(registry, devices), timeout=180)
        for device in devices:
            device.join(30)
            assert device.error is None, repr(device.error)
            assert not device.is_alive()
        assert finished.status == "finished", finished.metrics
        assert finished.metrics["num_clients"] == 3 and finished.metrics["secagg_dropped"] == 1  # d
        version = registry.latest_model_version()
        store = tensor_store(cfg)
        new, old = store.load(version.tensor_sha256), store.load(registry.get_model_version(0).tensor_sha256)
        old = {n: np.asarray(a, np.float32) for n, a in old.items()}
        strategy = FedAvg() if cfg.strategy == "fedavg" else HFedMoE(**cfg.strategy_params)
        expected, _, _ = strategy.aggregate_fit(1, [d.update for d in devices[:3]], [], old)
        changed = [n for n in expected if not np.array_equal(expected[n], old[n])]
        assert changed
        for name in expected:
            np.testing.assert_allclose(new[name], expected[name], atol=1e-5, err_msg=name)
        # what the coordinator stored per device: uniformly random words, not the plain rows
        stored = [
            np.frombuffer(masked_payload(store.get(u.tensor_sha256)), WORD)
            for u in registry.accepted_updates(finished.id)
        ]
        assert len(stored) == 3
        counts = np.bincount(np.frombuffer(np.concatenate(stored).tobytes(), np.uint8), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-6
        assert all(u.num_examples == 0 for u in registry.accepted_updates(finished.id))  # the weights are masked
    finally:
        registry.close()


@pytest.mark.parametrize("secure", [(3, 0.5, "fedavg")], indirect=True)
def test_below_the_threshold_the_round_fails_and_nothing_is_applied(secure):
    """t = 2 of 3; b and c leave after masking, so only a can reveal: the round fails naming the threshold and
    the model stays at version 0."""
    server, cfg, memory = secure
    plans = [("a", 1.0, 1, None), ("b", 2.0, 2, "after_masking"), ("c", 1.0, 4, "after_masking")]
    devices = start_devices(server, cfg, memory, plans)
    registry = Registry(cfg.registry_url)
    try:
        failed = wait_for(lambda: _round(registry, devices), timeout=180)
        assert failed.status == "failed"
        assert "1 devices revealed their shares, the threshold is t = 2" in failed.metrics["reason"]
        assert registry.latest_model_version().version == 0
        for device in devices:
            assert device.error is None, device.error
    finally:
        registry.close()
