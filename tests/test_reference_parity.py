"""One round of the real system equals one round of the torch reference (``coordinator/simulation/reference.py``).

The system: a real coordinator (``coordinator.server`` in a thread, port 0, HFedMoE) and two in-process
``DeviceClient``s over real websockets, training with ONNX Runtime. Their budgets make the strategy give them 2 and
3 of the 4 experts per layer (so some experts are held by one device, some by both), the FitConfig runs 3 local
AdamW steps on batches of 2 (the last step of the 4-record device starts a reshuffled second epoch, the
5-record device's last batch holds one record) with the balanced-softmax shift of the labels on (``labels``,
``logit_adjustment=1``) and a non-default seed. The reference starts from the same global version 0, asks the
same strategy (bound to the same state) for the same round's FitIns, trains each device in torch on the same data
file (``reference.fit_device``) and aggregates with ``aggregate_fit`` in the coordinator's order (device id).

Each device's update (tensors, routing statistics, trained experts) and every tensor of global version 1 must
equal the reference's within float noise; the round must have moved the model by far more than that; and the
reference without the logit adjustment, or with another batch seed, must miss the system by far more than that
(so the shift was active on the devices and the batches are the same ones).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime.training.api")
from helpers import ServerThread, initialised_coordinator, memory_for  # noqa: E402

pytestmark = pytest.mark.slow

SEED = 7  # the federation's seed: round 1's FitConfig.seed is 8
LABELS = ("team", "bank", "film", "phone")  # words of COORD_MIXTRAL's vocabulary: four distinct answer tokens
FIT = {
    "batch_size": 2,
    "seq_len": 16,
    "local_steps": 3,
    "learning_rate": 3e-3,
    "aux_loss_coef": 0.02,
    "labels": list(LABELS),
    "logit_adjustment": 1.0,
    "eval_fraction": 0.2,  # 1 of each device's 5 records held out, the same in the reference: neither trains on it
}
# Device name -> (experts per layer its budget affords with frozen_experts = "pruned", its records): label-skewed,
# so the two label priors differ. With "float16" the budgets put pi-small on the merged stand-in and pi-large on
# resident frozen experts, both with one trained expert per layer (RUNGS: the tiny model's estimates leave no room
# for a resident device training 2 or 3).
RUNGS = {"pi-small": (1, "float16", True), "pi-large": (1, "float16", False)}
DEVICES = {
    "pi-small": (
        2,
        [
            ("the match team won", "team"),
            ("match won lost", "team"),
            ("team lost the match", "team"),
            ("market shares profit", "bank"),
            ("star award film", "film"),
        ],
    ),
    "pi-large": (
        3,
        [
            ("market shares profit", "bank"),
            ("profit bank shares", "bank"),
            ("phone chip", "phone"),
            ("the film star", "film"),
        ],
    ),
}
# ORT and torch run the same float32 graph with differently ordered reductions (~1e-7 relative per op). Three
# AdamW steps of lr 3e-3 move a weight (~0.02 in scale) by up to ~1e-2; Adam's normalised steps amplify the noise
# of small gradients by at most lr / (|g| + eps). Measured: max |diff| 3.7e-7 (2.1e-6 at lr 1e-2), so this
# tolerance has a ~25x margin, while a 1% error in the learning rate or ORT's default eps (1e-6) breaks it.
# Weight decay (lr * 0.01 * |w| ~ 6e-7 per step) is below any safe tolerance: the reference's optimizer
# settings are checked against the ones the ORT optimizer graph is built with instead (export.artifacts).
RTOL, ATOL = 1e-4, 1e-5


async def _run_round(server: ServerThread, registry, root: Path, profiles: dict[str, dict]) -> dict[str, tuple]:
    """Enroll and run one ``DeviceClient`` per device until the coordinator has finished a round; returns
    device id -> (device name, data file)."""
    from device_runtime.client import Backoff, DeviceClient, enroll

    clients, data = [], {}
    for name, (_, records) in DEVICES.items():
        home = root / name
        home.mkdir(parents=True)
        creds = await enroll(
            server.url,
            registry.create_enroll_token(name, 600),
            name,
            credentials_path=home / "credentials.json",
            profile=profiles[name],
        )
        data[creds.device_id] = (name, home / "data.jsonl")
        (home / "data.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in records))
        clients.append(
            DeviceClient(
                server.url,
                creds,
                home / "data.jsonl",
                cache_dir=home / "state",
                max_message_mib=server.cfg.max_message_mib,
                threads=1,
                profile=profiles[name],
                heartbeat_s=1.0,
                backoff=Backoff(base_s=0.05, max_s=0.2),
            )
        )
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        async with asyncio.timeout(90):
            while not any(r.status != "running" for r in registry.list_rounds()):
                for task in tasks:
                    if task.done():
                        task.result()  # a client that died raises here
                await asyncio.sleep(0.1)
    finally:
        for client in clients:
            client.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
    return data


def _reference(cfg, strategy, params0, fits: dict, data: dict[str, tuple], monkeypatch, **fit_changes):
    """Version 1 as ``coordinator.simulation.reference`` computes it from ``params0`` (FitIns ``fits`` by device
    id, their configs changed by ``fit_changes``), updates in device id order as ``aggregate_round`` takes them.
    Checks that the reference's AdamW has the eps and weight decay of the devices' ORT optimizer graph."""
    import torch

    from coordinator.simulation.reference import ReferenceDevice, fit_device
    from export.artifacts import ADAMW_EPS, ADAMW_WEIGHT_DECAY
    from export.global_state import load_trainable_model

    real = torch.optim.AdamW

    def adamw(params, **kwargs):
        assert (kwargs.get("eps"), kwargs.get("weight_decay")) == (ADAMW_EPS, ADAMW_WEIGHT_DECAY), kwargs
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    model = load_trainable_model(
        cfg.checkpoint, trainable_mode=cfg.trainable_mode, lora_rank=cfg.lora_rank, seed=cfg.seed
    )
    tokenizer = Path(cfg.checkpoint) / "tokenizer.json"
    updates = []
    for device_id in sorted(fits):
        ins = dataclasses.replace(fits[device_id], config=dataclasses.replace(fits[device_id].config, **fit_changes))
        updates.append(fit_device(model, params0, ins, ReferenceDevice(device_id, {}, data[device_id][1]), tokenizer))
    monkeypatch.setattr(torch.optim, "AdamW", real)
    params, _, _ = strategy.aggregate_fit(1, updates, [], params0)
    return params, updates


def _gap(a: dict, b: dict) -> tuple[float, float]:
    """Max absolute difference over all tensors, and max of |a - b| / (ATOL + RTOL |b|) (<= 1: within tolerance)."""
    abs_gap = max(float(np.max(np.abs(a[n] - b[n]))) for n in b)
    ratio = max(float(np.max(np.abs(a[n] - b[n]) / (ATOL + RTOL * np.abs(b[n])))) for n in b)
    return abs_gap, ratio


def _rel_gap(a: dict, b: dict) -> float:
    """Max elementwise |a - b| / |b| over the entries with |b| >= 1e-3 (the weights are ~0.02 in scale)."""
    return max(float(np.max((np.abs(a[n] - b[n]) / np.maximum(np.abs(b[n]), 1e-3))[np.abs(b[n]) >= 1e-3])) for n in b)


@pytest.mark.parametrize("frozen_experts", ["float16", "pruned"])
def test_one_round_of_the_system_equals_one_round_of_the_reference(tmp_path, monkeypatch, frozen_experts):
    from coordinator.federation import fit_context, tensor_store
    from coordinator.planning import to_client_update
    from coordinator.registry import Registry
    from coordinator.strategy import ClientInfo, FitIns, from_name

    started = time.monotonic()
    monkeypatch.setenv("FEDMOE_CACHE", str(tmp_path / "cache"))
    cfg = initialised_coordinator(
        tmp_path,
        tmp_path / "coord",
        min_fit_clients=2,
        max_fit_clients=2,
        num_rounds=1,
        seed=SEED,
        fit=FIT,
        max_message_mib=8,
        keep_update_tensors=True,
        frozen_experts=frozen_experts,
    )
    strategy = from_name(cfg.strategy, **cfg.strategy_params).bind(fit_context(cfg))
    rungs = {
        name: RUNGS[name] if frozen_experts == "float16" else (kept, None, False) for name, (kept, _) in DEVICES.items()
    }
    profiles = {name: {"memory_mib": memory_for(strategy.context, *rungs[name]), "gflops": 5.0} for name in DEVICES}

    server = ServerThread(cfg)
    registry = Registry(cfg.registry_url)
    try:
        data = asyncio.run(_run_round(server, registry, tmp_path / "devices", profiles))
        (round_,) = registry.list_rounds()
        assert round_.status == "finished", round_.metrics
        assignments = {a.device_id: a for a in registry.assignments(round_.id)}
        store = tensor_store(cfg)
        sent = {
            u.device_id: to_client_update(u.device_id, u.num_examples, u.meta, store.load(u.tensor_sha256))
            for u in registry.accepted_updates(round_.id)
        }
        params0, params1 = (
            {n: np.asarray(t, np.float32) for n, t in store.load(registry.get_model_version(v).tensor_sha256).items()}
            for v in (0, 1)
        )
    finally:
        registry.close()
        server.stop()
    system_s = time.monotonic() - started
    assert sorted(assignments) == sorted(sent) == sorted(data)

    # The FitIns the coordinator sent: the registry's expert ids and the strategy's FitConfig of round 1 (the
    # coordinator's own strategy is bound to the same state, so its configure_fit must agree with the registry).
    config = strategy.fit_config(1)
    assert config.seed == SEED + 1 and config.logit_adjustment == 1.0 and config.labels == LABELS
    fits = {
        d: FitIns(
            tuple(tuple(ids) for ids in a.expert_ids), config, cfg.trainable_mode, cfg.lora_rank, *rungs[data[d][0]][1:]
        )
        for d, a in assignments.items()
    }
    planned = strategy.configure_fit(1, params0, [ClientInfo(d, profiles[name], None) for d, (name, _) in data.items()])
    assert planned == fits
    for d, (name, _) in data.items():
        assert {len(ids) for ids in fits[d].expert_ids} == {rungs[name][0]}, fits
        assert assignments[d].shape_key == fits[d].shape_key.id
    if frozen_experts == "pruned":
        for small, large in zip(*(fits[d].expert_ids for d in fits)):
            assert set(small) & set(large) and set(small) ^ set(large), fits  # experts held by both, and by one only

    reference, updates = _reference(cfg, strategy, params0, fits, data, monkeypatch)
    # Each device's update first (a failure here names the device), then the aggregate.
    for ref in updates:
        got = sent[ref.client_id]
        assert (got.num_examples, got.expert_ids, got.trained_experts, got.frozen_ids) == (
            ref.num_examples,
            ref.expert_ids,
            ref.trained_experts,
            ref.frozen_ids,
        ), ref.client_id
        assert all(
            len(got.held_ids(layer)) == (4 if frozen_experts == "float16" else len(got.expert_ids[layer]))
            for layer in range(len(got.expert_ids))
        )
        for layer, (g, r) in enumerate(zip(got.routing, ref.routing)):
            assert g.num_tokens == r.num_tokens and np.array_equal(g.tokens_routed, r.tokens_routed), layer
            np.testing.assert_allclose(g.usage, r.usage, rtol=RTOL, atol=ATOL)
        for name in ref.tensors:
            np.testing.assert_allclose(
                got.tensors[name], ref.tensors[name], rtol=RTOL, atol=ATOL, err_msg=f"{ref.client_id}: {name}"
            )
    assert params1.keys() == reference.keys() == params0.keys()
    for name in params1:
        np.testing.assert_allclose(params1[name], reference[name], rtol=RTOL, atol=ATOL, err_msg=name)

    abs_gap, ratio = _gap(params1, reference)
    moved = {n: float(np.max(np.abs(params1[n] - params0[n]))) for n in params0}
    unadjusted, _ = _reference(cfg, strategy, params0, fits, data, monkeypatch, logit_adjustment=0.0)
    reseeded, _ = _reference(cfg, strategy, params0, fits, data, monkeypatch, seed=config.seed + 1)
    print(
        f"system vs reference: max |diff| {abs_gap:.3g}, max rel {_rel_gap(params1, reference):.3g}, "
        f"tolerance used {ratio:.3g}; the round moved the model by up to {max(moved.values()):.3g}; reference "
        f"without logit adjustment: max |diff| {_gap(params1, unadjusted)[0]:.3g} (tolerance x "
        f"{_gap(params1, unadjusted)[1]:.3g}), with other batches (seed + 1): {_gap(params1, reseeded)[0]:.3g}; "
        f"system {system_s:.1f} s, total {time.monotonic() - started:.1f} s"
    )
    assert max(moved.values()) > 100 * abs_gap, (moved, abs_gap)  # the round did something the test can see
    assert all(moved[n] > 0 for n in moved if n.endswith("mlp.gate.weight")), moved
    assert _gap(params1, unadjusted)[1] > 100  # the devices trained with the logit adjustment
    assert _gap(params1, reseeded)[1] > 100  # ... and on the batches the round's seed draws
