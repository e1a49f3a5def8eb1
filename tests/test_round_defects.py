"""Round-level defects of issue 10, each provoked for real: an in-process ``Coordinator`` over a real registry,
tensor store and bundle exports, driven through its public API (``attach``, ``step``, ``handle_update``,
``device_error``) with controlled interleavings (a strategy or bundle cache that waits on an event); a crash
is the coordinator dropped mid-step and a new one built from the same registry and store."""

from __future__ import annotations

import asyncio
import threading

import pytest

from coordinator.federation import tensor_store
from coordinator.registry import Registry
from coordinator.rounds import Aggregate, RetryRound, StartRound, Wait
from coordinator.service import Coordinator
from device_runtime.wire import Assignment, Error

pytest.importorskip("torch")
from helpers import InboxDevice, fake_update, initialised_coordinator, two_expert_memory  # noqa: E402

ALL_EXPERTS_MIB = 100_000


def coordinator_with(tmp_path, **overrides):
    cfg = initialised_coordinator(tmp_path, tmp_path / "state", **overrides)
    return cfg, two_expert_memory(tmp_path / "checkpoint")


def devices(cfg, *specs):
    registry = Registry(cfg.registry_url)
    try:
        return [InboxDevice(registry, name, {"memory_mib": memory, "gflops": 5.0}) for name, memory in specs]
    finally:
        registry.close()


def stored_files(cfg) -> int:
    return len(list(tensor_store(cfg).root.glob("??/*.safetensors")))


def update_for(c: Coordinator, device: InboxDevice, **kwargs):
    assignment = device.inbox[-1]
    assert isinstance(assignment, Assignment), assignment
    return fake_update(assignment, c.bundles.manifest(assignment.shape_key.id), **kwargs)


def test_defect_1_a_version_identical_to_its_only_update_keeps_its_file(tmp_path):
    """FedAvg of a single update holding every expert is that update, byte for byte: one file for both. The old
    post-aggregation cleanup deleted it, and `serve` never started again."""
    cfg, _ = coordinator_with(tmp_path, strategy="fedavg")
    [device] = devices(cfg, ("all-experts", ALL_EXPERTS_MIB))

    async def life():
        c = Coordinator.from_config(cfg)
        await c.attach(device.session)
        assert isinstance(await c.step(), StartRound)
        update = update_for(c, device)
        assert (await c.handle_update(device.session, update)).accepted
        assert isinstance(await c.step(), Aggregate)
        [row], version = c.registry.accepted_updates(update.round_id), c.registry.latest_model_version()
        c.close()
        return row, version

    row, version = asyncio.run(life())
    assert version.version == 1 and version.tensor_sha256 == row.tensor_sha256  # the provoking case
    assert tensor_store(cfg).has(version.tensor_sha256)
    Coordinator.from_config(cfg).close()  # a restart (its store sweep) keeps it too, and can load it
    assert tensor_store(cfg).has(version.tensor_sha256)


class GatedStrategy:
    """The coordinator's strategy, but ``aggregate_fit`` waits until ``gate`` is set (controlled interleaving)."""

    def __init__(self, inner, gate: threading.Event):
        self._inner, self._gate = inner, gate

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def aggregate_fit(self, *args, **kwargs):
        assert self._gate.wait(60)
        return self._inner.aggregate_fit(*args, **kwargs)


def test_defect_3_an_update_arriving_during_aggregation_is_not_acked_as_accepted(tmp_path):
    """b drops, the round aggregates a's update; b reconnects and re-sends while aggregation runs. The old
    coordinator acked it as accepted, but it was not in the new version."""
    cfg, memory = coordinator_with(tmp_path, min_fit_clients=1, max_fit_clients=2)
    a, b = devices(cfg, ("a", memory), ("b", memory))

    async def life():
        c = Coordinator.from_config(cfg)
        gate = threading.Event()
        c.strategy = GatedStrategy(c.strategy, gate)
        for d in (a, b):
            await c.attach(d.session)
        assert isinstance(await c.step(), StartRound)
        assert (await c.handle_update(a.session, update_for(c, a))).accepted
        c.detach(b.session)  # nothing else is awaited: the next step aggregates
        aggregating = asyncio.create_task(c.step())
        while not c.engine.busy:
            await asyncio.sleep(0.01)
        await c.attach(b.session)
        ack = await c.handle_update(b.session, update_for(c, b))
        gate.set()
        assert isinstance(await aggregating, Aggregate)
        version = c.registry.latest_model_version()
        c.close()
        return ack, version

    ack, version = asyncio.run(life())
    assert version.metrics["num_clients"] == 1
    assert not ack.accepted and "closed" in ack.reason  # "accepted" means aggregated


def test_defect_4_a_replayed_update_id_stores_nothing(tmp_path):
    cfg, memory = coordinator_with(tmp_path, min_fit_clients=1, max_fit_clients=1, deadline_s=600)
    [device] = devices(cfg, ("replayer", memory))

    async def life():
        c = Coordinator.from_config(cfg)
        await c.attach(device.session)
        assert isinstance(await c.step(), StartRound)
        assert (await c.handle_update(device.session, update_for(c, device))).accepted
        before = stored_files(cfg)
        replay = await c.handle_update(device.session, update_for(c, device, trained_local=1))  # other tensors
        c.close()
        return before, replay

    before, replay = asyncio.run(life())
    assert replay.accepted and replay.reason == "already recorded"
    assert stored_files(cfg) == before  # the old code wrote the replay's tensors: an orphan file


def test_defect_9_a_device_failing_every_assignment_does_not_stop_the_rounds(tmp_path):
    """The only connected device answers each assignment with an Error. The old coordinator selected it again
    until ``max_attempts`` rounds failed, then started no round for the good device that came next; now it
    is excluded (with back-off) after ``participation.EXCLUDE_AFTER_FAILURES`` (2) in a row."""
    cfg, memory = coordinator_with(tmp_path, min_fit_clients=1, max_fit_clients=1, max_attempts=3)
    bad, good = devices(cfg, ("bad", memory), ("good", memory))

    async def life():
        c = Coordinator.from_config(cfg)
        await c.attach(bad.session)
        for _ in range(3):
            action = await c.step()
            if isinstance(action, StartRound):
                update_id = bad.inbox[-1].update_id
                c.device_error(bad.session, Error(code="internal", message=f"{update_id}: RuntimeError: boom"))
                assert isinstance(await c.step(), RetryRound)
            else:
                assert isinstance(action, Wait)
        await c.attach(good.session)
        action = await c.step()
        assert isinstance(action, StartRound) and action.devices == (good.device.id,), action
        assert (await c.handle_update(good.session, update_for(c, good))).accepted
        assert isinstance(await c.step(), Aggregate)
        c.close()

    asyncio.run(life())


class GatedBundles:
    """The coordinator's bundle cache, but building any bundle after the first waits until ``gate`` is set."""

    def __init__(self, inner, gate: threading.Event):
        self._inner, self._gate, self._built = inner, gate, set()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def ensure(self, key):
        if self._built and key.id not in self._built:
            self._gate.wait(60)
        self._built.add(key.id)
        return self._inner.ensure(key)


def test_defect_2_a_crash_while_a_round_starts_loses_no_acknowledged_update(tmp_path):
    """Two devices of different budgets: two bundles. The old coordinator sent the first device its assignment
    while the second bundle was still being built; its update was acknowledged, then the coordinator crashed
    (dropped here, mid-start) and restarted with a round holding only that assignment, which could not reach
    the quorum: an acknowledged update lost."""
    cfg, memory = coordinator_with(tmp_path, min_fit_clients=2, max_fit_clients=2)
    small, large = devices(cfg, ("small", memory), ("large", 4 * memory))
    acked: list[str] = []
    gate = threading.Event()

    async def first_life():
        c = Coordinator.from_config(cfg)
        c.bundles = GatedBundles(c.bundles, gate)
        for d in (small, large):
            await c.attach(d.session)
        starting = asyncio.create_task(c.step())
        for _ in range(300):  # 3 s for an assignment to go out while the second bundle is being built
            sent = [d for d in (small, large) if d.inbox]
            if sent:
                if (await c.handle_update(sent[0].session, update_for(c, sent[0]))).accepted:
                    acked.append(sent[0].inbox[-1].update_id)
                break
            await asyncio.sleep(0.01)
        starting.cancel()  # the crash: nothing more happens in this life
        c.close()
        gate.set()  # the bundle thread may finish; its coroutine is gone, so nothing of it is recorded

    async def second_life():
        c = Coordinator.from_config(cfg)
        for d in (small, large):
            await c.attach(d.session)
        for _ in range(6):
            action = await c.step()
            for d in (small, large):
                if (
                    d.inbox
                    and isinstance(d.inbox[-1], Assignment)
                    and d.inbox[-1].update_id not in acked
                    and c.engine.pending_of(d.device.id) == d.inbox[-1].update_id
                ):
                    assert (await c.handle_update(d.session, update_for(c, d))).accepted
            if isinstance(action, Aggregate):
                break
        aggregated = {
            u.update_id
            for r in c.registry.list_rounds()
            if r.status == "finished"
            for u in c.registry.accepted_updates(r.id)
        }
        c.close()
        return aggregated

    asyncio.run(first_life())
    aggregated = asyncio.run(second_life())
    assert aggregated, "no round finished after the restart"
    assert set(acked) <= aggregated, "an acknowledged update was never aggregated"


def test_an_update_re_sent_after_its_round_is_forgotten_is_answered_from_its_record(tmp_path):
    """Issue 19, item 4: once the next round aggregated (or after a restart) the coordinator forgets a round's
    assignments. The old coordinator answered a re-sent update of such a round "no such assignment", while the
    registry held it accepted: a misleading reason. It is now answered from its record."""
    cfg, memory = coordinator_with(tmp_path, min_fit_clients=1, max_fit_clients=1)
    [device] = devices(cfg, ("resender", memory))

    async def life():
        c = Coordinator.from_config(cfg)
        await c.attach(device.session)
        sent = []
        for _ in range(2):
            assert isinstance(await c.step(), StartRound)
            sent.append(update_for(c, device))
            assert (await c.handle_update(device.session, sent[-1])).accepted
            assert isinstance(await c.step(), Aggregate)
        late = await c.handle_update(device.session, sent[0])  # round 1's update, after round 2 closed
        c.close()
        restarted = Coordinator.from_config(cfg)
        after_restart = await restarted.handle_update(device.session, sent[1])
        restarted.close()
        return late, after_restart

    for ack in asyncio.run(life()):
        assert (ack.accepted, ack.reason) == (True, "already recorded")


def test_a_resumed_round_re_sends_exactly_the_assignment_it_sent_before_the_crash(tmp_path):
    """Issue 19, item 3: FedAlign-MoE's round 2 carries the routing prior round 1 produced. After a crash the
    old coordinator rebuilt the round's config from a fresh strategy: ``routing_prior = None``, a message (and a
    signature) that differs from the one sent before. Now the assignment's config is recorded with it and the
    strategy's state restored: the re-sent assignment is byte for byte the one sent before."""
    from device_runtime.wire import encode

    cfg, memory = coordinator_with(tmp_path, strategy="fedalign", min_fit_clients=1, max_fit_clients=1)
    [device] = devices(cfg, ("resumer", memory))

    async def first_life():
        c = Coordinator.from_config(cfg)
        await c.attach(device.session)
        assert isinstance(await c.step(), StartRound)
        assert (await c.handle_update(device.session, update_for(c, device))).accepted
        assert isinstance(await c.step(), Aggregate)
        assert isinstance(await c.step(), StartRound)
        c.close()  # crash while round 2 runs
        return device.inbox[-1]

    async def second_life():
        c = Coordinator.from_config(cfg)
        await c.attach(device.session)
        prior = c.strategy.fit_config(1, c.model.strategy_state).routing_prior
        c.close()
        return device.inbox[-1], prior

    sent = asyncio.run(first_life())
    resent, prior = asyncio.run(second_life())
    assert sent.config.routing_prior is not None and resent.update_id == sent.update_id
    assert encode(resent) == encode(sent)
    assert sent.config.routing_prior == prior  # the state is back
