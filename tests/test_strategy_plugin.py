"""A strategy that picks experts differently is one class plus one registry line: two tiny examples here, one
run by a real coordinator (in process: registry, tensor store, bundle export, FitIns carried to devices)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import numpy as np
import pytest
from helpers import memory_for, tiny_context, tiny_global

from coordinator.rounds import Aggregate, StartRound
from coordinator.strategy import STRATEGIES, ClientInfo, FedAvg, FitIns
from coordinator.strategy.selection import affordable_experts
from device_runtime.bundle import MANIFEST, MANIFEST_TRAINING_FIELDS
from device_runtime.wire import FitConfig


class Rotating(FedAvg):
    """Round r trains, in every MoE layer, the ``kept`` experts from r - 1 on (mod E): every expert in turn."""

    name = "rotating"

    def select_experts(self, server_round, client, kept):
        experts, layers = self.context.model.num_experts, self.context.model.moe_layers
        return tuple(tuple(sorted((server_round - 1 + i) % experts for i in range(kept))) for _ in range(layers))


class AllOrNothing(FedAvg):
    """Every client trains every expert, and one whose budget cannot hold them all sits the round out."""

    name = "all-or-nothing"

    def fit_ins(self, server_round, client, config):
        shape = self.context.model
        if affordable_experts(self.context, config, client.profile) < shape.num_experts:
            return None
        return FitIns(((*range(shape.num_experts),),) * shape.moe_layers, config)


def test_a_strategy_can_train_every_expert_or_sit_a_client_out():
    context = tiny_context()
    clients = [
        ClientInfo("big", {"memory_mib": memory_for(context, 4)}),
        ClientInfo("small", {"memory_mib": memory_for(context, 3)}),
    ]
    fits = AllOrNothing().bind(context).configure_fit(1, tiny_global(), clients)
    assert {c: f.expert_ids for c, f in fits.items()} == {"big": ((0, 1, 2, 3),)}


def test_a_registered_strategy_runs_rounds_in_a_real_coordinator(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from helpers import InboxDevice, fake_update, initialised_coordinator, two_expert_memory

    from coordinator.service import Coordinator

    monkeypatch.setenv("FEDMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(STRATEGIES, Rotating.name, Rotating)  # the registry line
    cfg = initialised_coordinator(tmp_path, tmp_path / "state", strategy="rotating", num_rounds=2)
    profile = {"memory_mib": two_expert_memory(tmp_path / "checkpoint"), "gflops": 5.0}

    async def federation():
        coordinator = Coordinator.from_config(cfg)
        try:
            device = InboxDevice(coordinator.registry, "pi", profile)
            session = device.session
            await coordinator.attach(session)
            for server_round in (1, 2):
                assert isinstance(await coordinator.step(), StartRound)
                assignment = device.inbox[-1]
                assert assignment.expert_ids == ((server_round - 1, server_round),) * 2
                manifest = coordinator.bundles.manifest(assignment.shape_key.id)
                # one FitConfig: the config's [fit], the bundle's defaults (the fields a manifest records; not
                # eval_fraction, which [fit] sets to 0.1 by default), the round's (with its seed)
                recorded = {name: getattr(cfg.fit, name) for name in MANIFEST_TRAINING_FIELDS}
                assert manifest.training == replace(FitConfig(), **recorded) and cfg.fit.eval_fraction == 0.1
                assert assignment.config == replace(cfg.fit, seed=server_round)
                written = json.loads((coordinator.bundles.root / manifest.shape_key.id / MANIFEST).read_text())
                assert sorted(written["training"]) == sorted(MANIFEST_TRAINING_FIELDS)  # the format is unchanged
                assert (await coordinator.handle_update(session, fake_update(assignment, manifest))).accepted
                assert isinstance(await coordinator.step(), Aggregate)
            rounds = coordinator.registry.list_rounds()
            first = coordinator.model.store.load(coordinator.registry.get_model_version(0).tensor_sha256)
            return rounds, first, coordinator.model.params
        finally:
            coordinator.close()

    rounds, first, last = asyncio.run(federation())
    assert [(r.strategy, r.status, r.metrics["round"]) for r in reversed(rounds)] == [
        ("rotating", "finished", 1),
        ("rotating", "finished", 2),
    ]
    # fake_update adds 1 to its first local expert: global expert 0 in round 1, expert 1 in round 2
    for name in (n for n in first if "experts." in n):
        delta = (last[name] - first[name]).reshape(4, -1)  # expert axis 0
        np.testing.assert_allclose(delta, np.repeat([[1.0], [1.0], [0.0], [0.0]], delta.shape[1], 1), atol=1e-6)
