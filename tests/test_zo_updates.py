"""Seed-and-scalar zeroth-order updates (FedKSeed): the device's trained tensors rebuilt exactly from a few
hundred bytes, bad ones refused with a clear error code at the wire or the coordinator, and a real
coordinator that, after refusing bad frames, expands and aggregates a good one.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

from device_runtime.bundle import TOKENIZER_FILE
from device_runtime.data import LocalDataset
from device_runtime.errors import ProtocolError, UpdateRejected
from device_runtime.stats import RoutingStats
from device_runtime.wire import Ack, Error, FitConfig, Update, ZoUpdate, decode, encode
from device_runtime.zo_directions import candidate_seeds, direction

pytest.importorskip("torch")
from helpers import SEQ_LEN, fake_update, initialised_coordinator, tiny_bundle  # noqa: E402

K, STEPS, ROUND = 32, 6, 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny bundle and a zeroth-order fit on FedKSeed candidates: ``(bundle, theta_0, theta_T, fit)``."""
    from device_runtime.zo_trainer import ZoTrainer

    bundle, data = tiny_bundle(tmp_path_factory.mktemp("zo_updates"))
    dataset = LocalDataset.from_jsonl(data, bundle.path(TOKENIZER_FILE), seq_len=SEQ_LEN, eval_fraction=0.0)
    trainer = ZoTrainer(bundle, threads=1, progress=False, seed=(0, ROUND), candidates=candidate_seeds(0, ROUND, K))
    before = trainer.get_parameters()
    fit = trainer.fit(dataset.train_batches(2), steps=STEPS, learning_rate=1e-2)
    return bundle, before, trainer.get_parameters(), fit


def zo_message(fit, **changes) -> Update:
    seeds, scalars = zip(*fit.zo_coefficients)
    update = Update(
        update_id="u-zo",
        round_id=ROUND,
        num_examples=fit.num_examples,
        num_tokens=fit.num_tokens,
        metrics={},
        routing={},
        trained_experts=((0, 2), (1, 3)),
        zo=ZoUpdate(seeds=seeds, scalars=scalars),
    )
    return replace(update, **changes)


def test_the_coordinator_rebuilds_the_devices_trained_tensors_from_seeds_and_scalars(trained):
    from coordinator.zo_updates import expand_zo_update

    bundle, before, after, fit = trained
    config = FitConfig(seed=0, local_steps=STEPS, zo_seeds=K)
    msg = zo_message(fit)
    assert 1 <= len(msg.zo.seeds) <= STEPS and set(msg.zo.seeds) <= set(candidate_seeds(0, ROUND, K))
    expanded = expand_zo_update(msg, before, bundle.manifest, config)
    assert set(expanded) == set(bundle.manifest.trainable_names)
    for name, value in expanded.items():
        assert not np.array_equal(value, before[name])
        np.testing.assert_allclose(value, after[name], atol=1e-5)
    dense = replace(msg, zo=None, tensors={n: after[n] for n in expanded})
    assert len(encode(msg)) < 1024 < len(encode(dense)) // 50  # 0.6 KB vs 37 KB even for this tiny bundle


def test_seed_and_scalar_updates_the_round_did_not_ask_for_are_rejected_with_a_reason(trained):
    from coordinator.planning import check_update
    from coordinator.zo_updates import expand_zo_update

    bundle, before, _, fit = trained
    config = FitConfig(seed=0, local_steps=STEPS, zo_seeds=K)
    msg = zo_message(fit)
    cases = [
        (replace(config, zo_seeds=0), msg, "takes dense tensors"),
        (config, replace(msg, tensors={"x": np.zeros(1, np.float32)}), "not both"),
        (
            replace(config, local_steps=1),
            replace(msg, zo=ZoUpdate(seeds=candidate_seeds(0, ROUND, K)[:2], scalars=(0.1, 0.1))),
            "seeds for 1 local steps",
        ),
        (config, replace(msg, zo=ZoUpdate(seeds=(12345,), scalars=(0.1,))), "not among round 3's 32 candidates"),
        (config, replace(msg, round_id=ROUND + 1), "not among round 4's"),
    ]
    for cfg, bad, reason in cases:
        with pytest.raises(UpdateRejected, match=reason):
            expand_zo_update(bad, before, bundle.manifest, cfg)
    expanded = expand_zo_update(msg, before, bundle.manifest, config)
    assigned = ((0, 2), (1, 3))
    with pytest.raises(UpdateRejected, match="not all among"):  # an update for experts never assigned
        check_update(
            bundle.manifest,
            assigned,
            device_id="d",
            num_examples=4,
            tensors=expanded,
            trained_experts=((0, 1), (1,)),
            routing=RoutingStats(tuple(map(len, assigned)), assigned).to_dict(),
            metrics={},
            norm_bound=1e6,
            global_params={n: np.zeros((4, *v.shape[1:]), np.float32) for n, v in expanded.items()},  # E = 4
        )


def _reframe(frame: bytes, **header_changes) -> bytes:
    """``frame`` with fields of its JSON header replaced (the payload kept)."""
    size = int.from_bytes(frame[:4], "big")
    header = {**json.loads(frame[4 : 4 + size]), **header_changes}
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(4, "big") + raw + frame[4 + size :]


@pytest.mark.parametrize(
    "zo, message",
    [
        ({"seeds": [1, 2], "scalars": [0.5]}, "as many distinct seeds as scalars"),
        ({"seeds": [1, 1], "scalars": [0.5, 0.5]}, "1 distinct"),
        ({"seeds": [1], "scalars": [float("nan")]}, "not UTF-8 JSON"),  # JSON has no NaN: the header is refused
        ({"seeds": [1], "scalars": [1e309]}, "not UTF-8 JSON"),
        ({"seeds": list(range(4097)), "scalars": [0.0] * 4097}, "length <= 4096"),
        ({"seeds": [-1], "scalars": [0.5]}, ">= 0"),
    ],
)
def test_malformed_seed_and_scalar_frames_are_bad_headers(trained, zo, message):
    frame = _reframe(encode(zo_message(trained[3])), zo=zo)
    with pytest.raises(ProtocolError, match=message) as raised:
        decode(frame, max_size=1 << 20)
    assert raised.value.code == "bad_header"


def test_a_real_coordinator_refuses_bad_frames_then_expands_and_aggregates_a_good_zo_update(tmp_path, monkeypatch):
    from helpers import ServerThread, two_expert_memory
    from test_server import enroll, first_assignment, recv, recv_ack, wait_for, ws

    from coordinator.federation import tensor_store
    from coordinator.registry import Registry
    from device_runtime.bundle import load_bundle

    monkeypatch.setenv("FEDMOE_CACHE", str(tmp_path / "cache"))
    fit = {"batch_size": 2, "seq_len": 8, "local_steps": 2, "zo_seeds": 16}
    cfg = initialised_coordinator(tmp_path, tmp_path / "state", max_message_mib=4.0, num_rounds=1, fit=fit)
    server = ServerThread(cfg)
    registry = Registry(cfg.registry_url)
    try:
        profile = {"memory_mib": two_expert_memory(tmp_path / "checkpoint"), "gflops": 5.0, "backend": "zo"}
        device_id, private, _ = enroll(server, cfg, "pi-zo", profile)
        with ws(server) as conn:
            assignment = first_assignment(conn, device_id, private, profile)
            manifest = load_bundle(os.path.join(cfg.state_dir, "bundles", assignment.shape_key.id)).manifest
            seeds = candidate_seeds(assignment.config.seed, assignment.round_id, 16)[:2]
            good = replace(
                fake_update(assignment, manifest), tensors={}, zo=ZoUpdate(seeds=seeds, scalars=(2e-3, -1e-3))
            )
            for bad in ({"seeds": list(seeds), "scalars": [0.1]}, {"seeds": [seeds[0]], "scalars": [float("inf")]}):
                conn.send(_reframe(encode(good), zo=bad))
                error = recv(conn)
                assert isinstance(error, Error) and error.code == "bad_header", error
            conn.send(encode(good))  # the connection is still open and nothing was recorded: this one counts
            ack = recv_ack(conn)
            assert isinstance(ack, Ack) and ack.accepted, ack.reason
        version = wait_for(lambda: registry.latest_model_version().version == 1 and registry.latest_model_version())
        store = tensor_store(cfg)
        v0, v1 = (store.load(registry.get_model_version(v).tensor_sha256) for v in (0, version.version))
        names = manifest.trainable_names
        z = [direction([tuple(s.shape) for s in manifest.tensors if s.trainable], seed) for seed in seeds]
        name = "model.layers.0.mlp.experts.down_proj"
        index = names.index(name)
        rows = list(assignment.expert_ids[0])
        trained = good.trained_experts[0][0]
        local = rows.index(trained)
        expected = v0[name][trained] + 2e-3 * z[0][index][local] - 1e-3 * z[1][index][local]
        np.testing.assert_allclose(v1[name][trained], expected, atol=1e-6)
    finally:
        registry.close()
        server.stop()
