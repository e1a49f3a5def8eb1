"""The round engine as a pure state machine: selection, quorum, deadline, dropouts, retries, resume."""

from __future__ import annotations

import random

import pytest

from coordinator.participation import Participation
from coordinator.rounds import (
    Aggregate,
    Finished,
    RetryRound,
    RoundEngine,
    RoundPolicy,
    RunningRound,
    StartRound,
    Wait,
    select_clients,
)
from device_runtime.errors import ConfigError

DEVICES = [f"d{i}" for i in range(10)]


def engine(**kw) -> RoundEngine:
    defaults = dict(min_fit_clients=2, max_fit_clients=3, fraction_fit=1.0, deadline_s=60.0, max_attempts=2)
    return RoundEngine(RoundPolicy(**{**defaults, **kw}), seed=0)


def start(e: RoundEngine, devices: list[str], now: float = 0.0, round_id: int = 1) -> dict[str, str]:
    action = e.step(now, devices)
    assert isinstance(action, StartRound)
    assignments = {f"u-{d}": d for d in action.devices}
    e.started(round_id, assignments, now)
    return assignments


def test_select_clients_counts():
    rng = random.Random(0)
    policy = RoundPolicy(min_fit_clients=2, max_fit_clients=4, fraction_fit=0.3)
    assert select_clients(["a"], policy, rng) == []
    assert len(select_clients(DEVICES[:3], policy, rng)) == 2  # ceil(0.9) = 1 -> raised to min 2
    assert len(select_clients(DEVICES, policy, rng)) == 3  # ceil(3.0)
    assert len(select_clients(DEVICES * 2, RoundPolicy(2, 4, 1.0), rng)) == 4  # duplicates ignored, capped at max
    picked = select_clients(DEVICES, policy, rng)
    assert picked == sorted(set(picked)) and set(picked) <= set(DEVICES)


def test_policy_rejects_bad_values():
    with pytest.raises(ConfigError):
        RoundPolicy(min_fit_clients=3, max_fit_clients=2)
    with pytest.raises(ConfigError):
        RoundPolicy(fraction_fit=0.0)


def test_waits_for_enough_devices_then_starts():
    e = engine()
    assert e.step(0.0, ["d0"]) == Wait(None)
    assignments = start(e, DEVICES[:3])
    assert sorted(assignments.values()) == DEVICES[:3]
    assert e.step(1.0, DEVICES) == Wait(60.0)  # collecting


def test_aggregates_when_all_reported_before_the_deadline():
    e = engine()
    a = start(e, DEVICES[:3])
    ids = list(a)
    assert e.on_update(ids[0], True) and e.on_update(ids[2], True)
    assert e.step(5.0, DEVICES) == Wait(60.0)  # quorum reached, one still pending, deadline ahead
    assert e.on_update(ids[1], False, "nan")
    assert e.step(6.0, DEVICES) == Aggregate(1, (ids[0], ids[2]))
    assert e.step(6.0, DEVICES) == Wait(None)  # busy until the server reports back
    e.closed()
    assert e.rounds_done == 1 and e.current is None


def test_replayed_update_counts_once():
    e = engine(min_fit_clients=2)
    ids = list(start(e, DEVICES[:2]))
    assert e.on_update(ids[0], True)
    assert not e.on_update(ids[0], True)
    assert not e.on_update(ids[0], False, "replay")
    assert not e.on_update("u-unknown", True)
    assert e.current.accepted == [ids[0]] and e.current.rejected == {}
    assert e.step(100.0, DEVICES) == RetryRound(1, e.current.decide(100.0, 2).reason)  # 1 of 2 at the deadline


def test_deadline_with_quorum_aggregates_and_stragglers_are_failures():
    e = engine()
    ids = list(start(e, DEVICES[:3]))
    e.on_update(ids[0], True)
    e.on_update(ids[1], True)
    assert e.step(59.9, DEVICES) == Wait(60.0)
    assert e.step(60.0, DEVICES) == Aggregate(1, (ids[0], ids[1]))
    assert e.current.failures() == [(a_dev(ids[2]), "no update (straggler or dropout)")]


def a_dev(update_id: str) -> str:
    return update_id.removeprefix("u-")


def test_dropout_closes_early_and_a_returning_device_still_counts():
    e = engine()
    ids = list(start(e, DEVICES[:3]))
    e.on_update(ids[0], True)
    e.device_lost(a_dev(ids[1]), 0.5)
    assert isinstance(e.step(1.0, DEVICES), Wait)  # ids[2] still training
    e.on_update(ids[1], True)  # the lost device reconnected and re-sent: counted
    e.device_lost(a_dev(ids[2]), 1.5)
    assert e.step(2.0, DEVICES) == Aggregate(1, (ids[0], ids[1]))  # nothing left to wait for


def test_retry_when_quorum_unreachable_then_back_off():
    e = engine(max_attempts=2, backoff_s=5.0)
    ids = list(start(e, DEVICES[:2]))
    e.on_update(ids[0], False, "bad shape")
    action = e.step(1.0, DEVICES)  # 0 accepted + 1 pending < 2: no need to wait for the deadline
    assert isinstance(action, RetryRound) and "0 of 2" in action.reason
    e.closed(failed=True)
    start(e, DEVICES[:2], round_id=2)
    assert isinstance(e.step(61.0, DEVICES), RetryRound)  # nobody reported by the deadline
    e.closed(failed=True)
    assert e.backing_off and e.step(62.0, DEVICES[:2]) == Wait(67.0)  # the same devices: after the back-off
    assert e.retry_at == 67.0 and isinstance(e.step(67.0, DEVICES[:2]), StartRound)


def test_success_resets_attempts_and_num_rounds_finishes():
    e = engine(num_rounds=1, max_attempts=2)
    start(e, DEVICES[:2])
    assert isinstance(e.step(61.0, []), RetryRound)
    e.closed(failed=True)
    ids = list(start(e, DEVICES[:2], round_id=2))
    for u in ids:
        e.on_update(u, True)
    assert isinstance(e.step(62.0, DEVICES), Aggregate)
    e.closed()
    assert e.failed_attempts == 0 and e.rounds_done == 1
    assert e.step(63.0, DEVICES) == Finished("1 rounds done")


def test_resume_keeps_recorded_updates_and_counts_them_once():
    e = engine(min_fit_clients=2)
    assignments = {"u1": "d1", "u2": "d2", "u3": "d3"}
    e.resume(4, RunningRound(7, assignments, ["u1"], {"u3": "rejected before restart"}), now=100.0)
    assert e.current.deadline == 160.0 and e.current.pending() == ["u2"]
    assert (e.rounds_done, e.server_round) == (4, 5)
    assert not e.on_update("u1", True)  # re-sent after the restart: already counted
    assert e.step(101.0, []) == Wait(160.0)
    assert e.on_update("u2", True)
    assert e.step(102.0, []) == Aggregate(7, ("u1", "u2"))


def test_an_update_counts_when_it_arrives_while_later_assignments_are_still_planned():
    e = engine(min_fit_clients=2)
    assert isinstance(e.step(0.0, DEVICES[:2]), StartRound)
    e.started(1, {}, 0.0)  # the round opens before the first assignment is sent
    e.assign("u-d0", "d0")
    assert e.on_update("u-d0", True)  # d0 trained and reported while d1 was still being planned
    e.assign("u-d1", "d1")
    e.assign("u-d2", "d2")
    e.device_lost("d2", 0.5)  # its send failed: pending, re-sent if d2 reconnects, not waited for
    assert e.step(1.0, DEVICES) == Wait(60.0)
    assert e.on_update("u-d1", True)
    assert e.step(2.0, DEVICES) == Aggregate(1, ("u-d0", "u-d1"))
    assert e.current.failures() == [("d2", "no update (straggler or dropout)")]


def test_a_device_error_rejects_its_pending_assignment_and_the_round_decides_at_once():
    e = engine(min_fit_clients=2)
    ids = list(start(e, DEVICES[:3]))
    assert [e.pending_of(d) for d in ("d0", "d1", "d2", "d9")] == [*ids, None]
    e.on_update(ids[0], True)
    assert e.pending_of("d0") is None  # reported: nothing owed any more
    assert e.on_update(e.pending_of("d1"), False, "device reported internal: DataError")
    assert e.step(1.0, DEVICES) == Wait(60.0)  # 1 accepted + 1 pending can still reach 2
    assert e.on_update(e.pending_of("d2"), False, "assignment of 9.00 MiB exceeds the device's max")
    action = e.step(2.0, DEVICES)  # long before the deadline (60 s)
    assert isinstance(action, RetryRound) and "1 of 2" in action.reason and "2 rejected" in action.reason


def test_stopped_says_why_no_round_starts_and_failed_rounds_never_stop_them():
    e = engine(max_attempts=1, num_rounds=2)
    assert e.stopped() is None
    start(e, DEVICES[:2])
    assert isinstance(e.step(61.0, DEVICES), RetryRound)
    e.closed(failed=True)
    assert e.stopped() is None and e.backing_off
    done = RoundEngine(e.policy, rounds_done=2)
    assert done.stopped() == "2 rounds done" and done.step(0.0, DEVICES) == Finished("2 rounds done")


def test_server_round_counts_rounds_that_produced_a_model_and_state_is_read_only():
    e = engine(max_attempts=3)
    assert e.server_round == 1 and e.selecting
    start(e, DEVICES[:2], round_id=1)
    assert not e.selecting  # collecting: the caller need not gather available devices
    assert isinstance(e.step(61.0, []), RetryRound)
    e.closed(failed=True)
    ids = list(start(e, DEVICES[:2], round_id=2))
    assert e.server_round == 1  # registry round 2 is the first that can produce a model
    for u in ids:
        e.on_update(u, True)
    assert isinstance(e.step(62.0, DEVICES), Aggregate)
    e.closed()
    assert (e.server_round, e.rounds_done, e.failed_attempts) == (2, 1, 0)
    for name in ("current", "rounds_done", "failed_attempts", "busy", "server_round"):
        with pytest.raises(AttributeError):
            setattr(e, name, None)


def test_abandon_counts_a_failed_start_and_names_a_round_being_closed():
    e = engine(max_attempts=3)
    assert e.abandon() is None and e.failed_attempts == 0  # nothing in flight
    assert isinstance(e.step(0.0, DEVICES[:2]), StartRound)
    assert e.abandon() is None and e.failed_attempts == 1 and not e.busy  # starting it failed
    ids = list(start(e, DEVICES[:2], round_id=5))
    for u in ids:
        e.on_update(u, True)
    assert isinstance(e.step(1.0, DEVICES), Aggregate)
    assert e.abandon() == 5  # aggregating it failed: the caller closes it
    e.closed(failed=True)
    assert e.failed_attempts == 2 and e.current is None


# ---------------------------------------------------------------- participation (issue 19, item 2)


def test_a_device_that_takes_its_assignment_and_drops_cannot_halt_the_rounds():
    """The reproduction: the only selectable device (min_fit_clients = 1) takes its assignment and
    disconnects, three times. Old engine: the drops were not failures of the device and 3 failed rounds
    stopped all rounds for good, so the honest device that came next got nothing. Now the dropper is
    excluded with back-off (its count survives reconnects) and the honest device's round starts at once."""
    e = engine(min_fit_clients=1, max_fit_clients=1, max_attempts=3, backoff_s=10.0)
    profile = {"memory_mib": 1024}
    for drop, now in enumerate((0.0, 1.0, 11.0)):
        e.device_back("d0", profile)  # (re)connects
        start(e, ["d0"], now=now, round_id=drop + 1)
        excluded_until = e.device_lost("d0", now)
        assert isinstance(e.step(now, []), RetryRound)
        e.closed(failed=True)
        if drop == 1:  # second failure in a row: excluded for 10 s, even after it reconnects
            assert excluded_until == 11.0
            e.device_back("d0", profile)
            assert e.step(2.0, ["d0"]) == Wait(11.0)
    assert excluded_until == 31.0 and e.participation.failures("d0") == 3  # the back-off doubled
    assert e.backing_off and e.stopped() is None
    assert e.step(12.0, ["d0"]) == Wait(22.0)  # rounds back off; the dropper is excluded anyway
    assert e.step(13.0, ["d0", "d1"]) == StartRound(("d1",))  # an honest device: its round starts now
    e.started(4, {"u-d1": "d1"}, 13.0)
    assert e.on_update("u-d1", True) and isinstance(e.step(14.0, ["d0", "d1"]), Aggregate)
    e.closed()
    assert not e.backing_off and e.rounds_done == 1


def test_a_failed_assignment_counts_once_and_an_accepted_update_clears_the_count():
    e = engine(min_fit_clients=1, max_fit_clients=2)
    ids = start(e, DEVICES[:2])
    assert e.device_failed("u-d0", 1.0) is None and e.participation.failures("d0") == 1  # reported an Error
    assert e.device_failed("u-d0", 1.0) is None and e.device_lost("d0", 1.0) is None  # the same assignment
    assert e.participation.failures("d0") == 1
    e.device_lost("d1", 1.0)  # a blip: d1 comes back and delivers, its failure is forgotten
    e.device_back("d1", {})
    assert e.participation.failures("d1") == 1 and e.on_update("u-d1", True)
    assert e.participation.failures("d1") == 0 and e.device_lost("d1", 2.0) is None  # nothing held any more
    assert e.device_failed("u-unknown", 2.0) is None and sorted(ids) == ["u-d0", "u-d1"]


def test_participation_backs_off_exponentially_up_to_the_cap():
    policy = RoundPolicy(min_fit_clients=1, backoff_s=1.0, max_backoff_s=4.0)
    p = Participation(policy.backoff)
    assert p.failed("d", 0.0) is None and p.eligible(["d"], 0.0) == ["d"]  # one failure is not enough
    assert p.failed("d", 0.0) == 1.0 and p.eligible(["d", "e"], 0.5) == ["e"] and p.excluded(0.5) == {"d": 1.0}
    assert p.eligible(["d"], 1.0) == ["d"]  # re-admitted on probation: the next failure doubles the back-off
    assert [p.failed("d", t) for t in (1.0, 3.0, 7.0)] == [3.0, 7.0, 11.0]  # 2, 4, then capped at 4 s
    p.connected("d", {})
    assert p.eligible(["d"], 8.0) == []  # reconnecting does not clear it
    p.succeeded("d")
    assert p.eligible(["d"], 8.0) == ["d"] and p.failures("d") == 0


def test_unplannable_and_oversized_devices_wait_for_a_reconnect_or_a_new_profile():
    p = Participation(RoundPolicy().backoff)
    p.unplannable("a", "BudgetError: one expert does not fit")
    p.refused("b", {"max_message_mib": 1})
    assert p.eligible(["a", "b", "c"], 0.0) == ["c"]
    p.connected("a", {})
    p.connected("b", {"max_message_mib": 1})  # the same profile: still refused
    assert p.eligible(["a", "b"], 0.0) == ["a"]
    p.connected("b", {"max_message_mib": 64})
    assert p.eligible(["a", "b"], 0.0) == ["a", "b"]


def test_policy_rejects_a_bad_backoff():
    with pytest.raises(ConfigError, match="backoff_s"):
        RoundPolicy(backoff_s=0.0)
    with pytest.raises(ConfigError, match="backoff_s"):
        RoundPolicy(backoff_s=10.0, max_backoff_s=5.0)
