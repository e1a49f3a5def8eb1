"""The round engine: an I/O-free state machine (select -> plan -> assign -> collect -> aggregate -> version).

The coordinator owns every I/O step; the engine only decides, from the events it is told (sans-I/O, like
websockets' protocol objects). One tick::

    action = engine.step(now, available_devices)
      StartRound(devices)        -> the coordinator opens a round (engine.started), then plans, records and
                                    sends each assignment, telling the engine of it (engine.assign) before
                                    sending it; or engine.start_failed() if opening the round failed
      Aggregate(round_id, ids)   -> the coordinator aggregates the accepted updates, writes a version,
                                    engine.closed()
      RetryRound(round_id, why)  -> the coordinator marks the round failed, engine.closed(failed=True)
      Wait(until)                -> nothing to do before ``until`` (or before the next event)
      Finished(reason)           -> no more rounds in this process: ``num_rounds`` are done, or the next round
                                    would exceed the privacy budget (``budget``, ``coordinator.privacy``)

Events between ticks: ``on_update`` (an update accepted or rejected), ``device_failed`` (a device reported
an Error for its assignment), ``device_lost`` / ``device_back`` (a connection closed / came back), and
``resume`` (a restart rebuilt the state from the registry).

Which available devices a round may select is the engine's :class:`~coordinator.participation.Participation`
(devices that keep failing their assignments are excluded for a back-off). No device can stop the rounds:
after ``max_attempts`` consecutive failed rounds the engine backs off (``backoff_s``, doubling to
``max_backoff_s``; :attr:`RoundEngine.backing_off` is the operator's alert) and starts the next round when
the back-off ends, or at once when an eligible device that no round of the failing streak selected is
available.

Stragglers and dropouts are data: an assignment is *pending* until its update arrives (``accepted`` or
``rejected``) or its device disconnects (``lost``; a lost device that reconnects and re-sends its update
before the round closes is still counted). An assignment its device reports it cannot train, or refuses,
is ``rejected`` too (``on_update(update_id, False, reason)``). A round aggregates once it has
``min_fit_clients`` accepted updates and either nothing is pending or the deadline passed; it is retried (as
a new round) when it can no longer reach that quorum. Updates are keyed by ``update_id`` so a re-sent update
never counts twice, and :meth:`RoundEngine.resume` rebuilds a running round from the registry after a crash.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from coordinator.participation import Participation
from device_runtime.errors import ConfigError


@dataclass(frozen=True)
class RoundPolicy:
    """How rounds run: the config file's ``[rounds]`` table (``CoordinatorConfig.rounds``).

    Attributes:
        min_fit_clients: quorum of accepted updates (and fewest devices to start a round).
        max_fit_clients: most devices selected per round. fraction_fit: share of available devices selected.
        deadline_s: seconds a round collects updates. max_attempts: consecutive failed rounds before the engine
        backs off. backoff_s: first back-off (seconds) of rounds after ``max_attempts`` failures, and first
        exclusion of a failing device; both double per further failure, up to max_backoff_s (seconds).
        num_rounds: rounds to finish (0: unbounded).
    Raises:
        ConfigError: naming the field out of range.
    """

    min_fit_clients: int = 2
    max_fit_clients: int = 10
    fraction_fit: float = 1.0
    deadline_s: float = 600.0
    max_attempts: int = 3
    num_rounds: int = 0
    backoff_s: float = 10.0
    max_backoff_s: float = 600.0

    def __post_init__(self):
        problems = [
            (self.min_fit_clients < 1, f"min_fit_clients must be >= 1, got {self.min_fit_clients}"),
            (
                self.max_fit_clients < self.min_fit_clients,
                f"max_fit_clients {self.max_fit_clients} < min_fit_clients {self.min_fit_clients}",
            ),
            (not 0 < self.fraction_fit <= 1, f"fraction_fit must be in (0, 1], got {self.fraction_fit}"),
            (not self.deadline_s > 0, f"deadline_s must be > 0, got {self.deadline_s}"),
            (self.max_attempts < 1, f"max_attempts must be >= 1, got {self.max_attempts}"),
            (self.num_rounds < 0, "num_rounds must be >= 0 (0 = unbounded)"),
            (
                not 0 < self.backoff_s <= self.max_backoff_s,
                f"backoff_s must be > 0 and <= max_backoff_s, got {self.backoff_s}, {self.max_backoff_s}",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(f"config [rounds]: {message}")

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure beyond a threshold (0: the first): ``backoff_s``
        doubled per failure, at most ``max_backoff_s``."""
        return min(self.max_backoff_s, self.backoff_s * 2.0 ** min(failures, 60))


def select_clients(available: Sequence[str], policy: RoundPolicy, rng: random.Random) -> list[str]:
    """Sample ``clamp(ceil(fraction_fit * n), min, max)`` of the ``n`` available devices (sorted ids).

    Returns [] when fewer than ``min_fit_clients`` are available.
    """
    pool = sorted(set(available))
    if len(pool) < policy.min_fit_clients:
        return []
    count = min(
        len(pool), policy.max_fit_clients, max(policy.min_fit_clients, math.ceil(policy.fraction_fit * len(pool)))
    )
    return sorted(rng.sample(pool, count))


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartRound:
    devices: tuple[str, ...]


@dataclass(frozen=True)
class Aggregate:
    round_id: int
    update_ids: tuple[str, ...]  # accepted, in arrival order


@dataclass(frozen=True)
class RetryRound:
    round_id: int
    reason: str


@dataclass(frozen=True)
class Wait:
    until: float | None  # None: until the next event


@dataclass(frozen=True)
class Finished:
    reason: str


Action = StartRound | Aggregate | RetryRound | Wait | Finished


# ---------------------------------------------------------------- one round


@dataclass
class RoundState:
    """The collection state of one round.

    Attributes:
        round_id: registry id. deadline: time (same clock as ``now``) after which nothing more is awaited.
        devices: update_id -> device_id of every assignment. accepted: accepted update ids, arrival order.
        rejected: update_id -> reason. lost: device ids that disconnected while pending.
        faulted: update ids whose device failed them (counted once by the engine's participation rules).
    """

    round_id: int
    deadline: float
    devices: dict[str, str]
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)
    faulted: set[str] = field(default_factory=set)

    def assign(self, update_id: str, device_id: str) -> None:
        """Register an assignment before it is sent (its update may arrive before the next one is planned)."""
        self.devices[update_id] = device_id

    def pending(self) -> list[str]:
        """Update ids neither accepted nor rejected (their devices may be lost)."""
        done = set(self.accepted) | set(self.rejected)
        return [u for u in self.devices if u not in done]

    def pending_of(self, device_id: str) -> str | None:
        """The update id ``device_id`` still owes this round (a device has at most one), or None."""
        return next((u for u in self.pending() if self.devices[u] == device_id), None)

    def record(self, update_id: str, accepted: bool, reason: str = "") -> bool:
        """Count an update once; returns False if ``update_id`` is not of this round or already counted."""
        if update_id not in self.devices or update_id in self.accepted or update_id in self.rejected:
            return False
        if accepted:
            self.accepted.append(update_id)
        else:
            self.rejected[update_id] = reason
        self.lost.discard(self.devices[update_id])
        return True

    def device_lost(self, device_id: str) -> None:
        if any(self.devices[u] == device_id for u in self.pending()):
            self.lost.add(device_id)

    def device_back(self, device_id: str) -> None:
        self.lost.discard(device_id)

    def decide(self, now: float, quorum: int) -> Action:
        """Aggregate, retry or wait (see the module docstring)."""
        waiting = [u for u in self.pending() if self.devices[u] not in self.lost]
        closed = now >= self.deadline or not waiting
        if len(self.accepted) >= quorum and closed:
            return Aggregate(self.round_id, tuple(self.accepted))
        if closed or len(self.accepted) + len(self.pending()) < quorum:
            return RetryRound(
                self.round_id,
                f"{len(self.accepted)} of {quorum} required updates accepted "
                f"({len(self.rejected)} rejected, {len(self.pending())} missing)",
            )
        return Wait(self.deadline)

    def failures(self) -> list[tuple[str, str]]:
        """``(device_id, reason)`` of every assignment without an accepted update (strategy ``failures``)."""
        out = [(self.devices[u], f"rejected: {why}") for u, why in self.rejected.items()]
        return out + [(self.devices[u], "no update (straggler or dropout)") for u in self.pending()]


# ---------------------------------------------------------------- the engine


class RoundEngine:
    """Drives rounds one at a time (see the module docstring). State changes only through :meth:`step` and the
    event methods; ``current``, ``rounds_done``, ``failed_attempts`` and ``busy`` are read-only.
    ``participation`` takes the events that concern a device only (``unplannable``, ``refused``)."""

    def __init__(
        self,
        policy: RoundPolicy,
        *,
        seed: int = 0,
        rounds_done: int = 0,
        budget: Callable[[float], str | None] | None = None,
    ):
        """Args:
        budget: ``sampling rate -> reason``: why a round selecting that share of the eligible devices must not
            start (e.g. ``DPFedAvg.budget_exceeded``: it would overspend the privacy budget), or None if it may.
            Rounds then stop for good in this process (:meth:`stopped`).
        """
        self.policy = policy
        self._budget = budget
        self._budget_stop: str | None = None
        self._sampling_rate = 1.0
        self.participation = Participation(policy.backoff)
        self._rounds_done = rounds_done
        self._current: RoundState | None = None
        self._failed_attempts = 0
        self._retry_at: float | None = None  # while backing off: when the next round may start (set by step)
        self._tried: set[str] = set()  # devices selected by the rounds of the failing streak
        self._busy = False  # an I/O step (start / aggregate) is in flight
        self._rng = random.Random(seed)

    @property
    def current(self) -> RoundState | None:
        """The round collecting updates, or None."""
        return self._current

    @property
    def rounds_done(self) -> int:
        """Rounds that produced a model version (in this process and, after :meth:`resume`, before it)."""
        return self._rounds_done

    @property
    def server_round(self) -> int:
        """The 1-based number of the round being run or started next: ``rounds_done + 1`` (a strategy's
        ``server_round``; unlike the registry's round id it does not count failed rounds)."""
        return self._rounds_done + 1

    @property
    def sampling_rate(self) -> float:
        """The share of the eligible devices the last round started selected (the q of privacy accounting);
        1.0 before any, and for a round rebuilt by :meth:`resume` (unknown: no amplification is claimed)."""
        return self._sampling_rate

    @property
    def failed_attempts(self) -> int:
        """Consecutive failed rounds since the last one that produced a model."""
        return self._failed_attempts

    @property
    def backing_off(self) -> bool:
        """``max_attempts`` or more consecutive rounds failed: rounds start only after a back-off, or when an
        eligible device no round of the streak selected is available (the operator's alert)."""
        return self._failed_attempts >= self.policy.max_attempts

    @property
    def retry_at(self) -> float | None:
        """While :attr:`backing_off`: the time (the clock of ``step``) the back-off ends, once a step set it."""
        return self._retry_at if self.backing_off else None

    @property
    def busy(self) -> bool:
        """An I/O step the engine asked for (StartRound, Aggregate, RetryRound) has not been reported back."""
        return self._busy

    @property
    def selecting(self) -> bool:
        """Whether the next :meth:`step` may select devices (no round running or starting, rounds not stopped):
        only then does the caller need to gather the available devices."""
        return self._current is None and not self._busy and self.stopped() is None

    # ------------------------------------------------------------ decisions

    def step(self, now: float, available: Iterable[str]) -> Action:
        """The next thing the coordinator should do at ``now`` (seconds, the clock of every event);
        ``available``: the connected, non-revoked devices (the participation rules filter them)."""
        if self._busy:
            return Wait(None)
        if self._current is not None:
            action = self._current.decide(now, self.policy.min_fit_clients)
            self._busy = not isinstance(action, Wait)
            return action
        if (reason := self.stopped()) is not None:
            return Finished(reason)
        available = list(available)
        pool = self.participation.eligible(available, now)
        if self.backing_off:
            if self._retry_at is None:
                self._retry_at = now + self.policy.backoff(self._failed_attempts - self.policy.max_attempts)
            if now < self._retry_at and not set(pool) - self._tried:
                return Wait(self._retry_at)
        devices = select_clients(pool, self.policy, self._rng)
        if not devices:
            ends = [until for d, until in self.participation.excluded(now).items() if d in available]
            return Wait(min(ends, default=None))
        rate = len(devices) / len(pool)
        if self._budget is not None and (reason := self._budget(rate)) is not None:
            self._budget_stop = reason
            return Finished(reason)
        self._busy, self._sampling_rate = True, rate
        self._tried.update(devices)
        return StartRound(tuple(devices))

    def stopped(self) -> str | None:
        """Why no round will start any more (``num_rounds`` rounds done, or the privacy ``budget`` refused the
        next one), or None. Failed rounds never stop them (:attr:`backing_off`)."""
        if self._budget_stop is not None:
            return self._budget_stop
        if self.policy.num_rounds and self._rounds_done >= self.policy.num_rounds:
            return f"{self._rounds_done} rounds done"
        return None

    def pending_of(self, device_id: str) -> str | None:
        """The update id ``device_id`` still owes the current round, or None."""
        return None if self._current is None else self._current.pending_of(device_id)

    # ------------------------------------------------------------ events

    def started(self, round_id: int, assignments: Mapping[str, str], now: float) -> None:
        """A round opened with ``assignments`` (``update_id -> device_id``, more via :meth:`assign`);
        collection begins and the deadline runs from ``now``."""
        self._current = RoundState(round_id, now + self.policy.deadline_s, dict(assignments))
        self._busy = False

    def assign(self, update_id: str, device_id: str) -> None:
        """An assignment of the current round is about to be sent (its update may arrive before the next one
        is planned)."""
        self._require_round().assign(update_id, device_id)

    def start_failed(self) -> None:
        """Starting a round failed before :meth:`started` (counts as a failed attempt)."""
        self._busy = False
        self._count_failed_round()

    def on_update(self, update_id: str, accepted: bool, reason: str = "") -> bool:
        """Count an update of the current round; False if it is not part of it or already counted. An
        accepted update clears its device's failures (:class:`Participation`)."""
        counted = self._current is not None and self._current.record(update_id, accepted, reason)
        if counted and accepted:
            self.participation.succeeded(self._current.devices[update_id])
        return counted

    def device_failed(self, update_id: str, now: float) -> float | None:
        """The device of ``update_id`` (an assignment of the current round) failed it at ``now``: it reported
        an Error for it. Counted once per assignment; returns the time its device is excluded until, or None."""
        current = self._current
        if current is None or update_id not in current.devices or update_id in current.faulted:
            return None
        current.faulted.add(update_id)
        return self.participation.failed(current.devices[update_id], now)

    def device_lost(self, device_id: str, now: float) -> float | None:
        """``device_id``'s connection closed (or a send to it failed) at ``now``: its pending assignment is not
        waited for, and holding it counts as a failure (:meth:`device_failed`, whose result it returns)."""
        if self._current is None:
            return None
        self._current.device_lost(device_id)
        update_id = self._current.pending_of(device_id)
        return None if update_id is None else self.device_failed(update_id, now)

    def device_back(self, device_id: str, profile: dict) -> None:
        """``device_id`` reconnected with ``profile``: its pending assignment is waited for again
        (:meth:`Participation.connected`)."""
        self.participation.connected(device_id, profile)
        if self._current is not None:
            self._current.device_back(device_id)

    def closed(self, *, failed: bool = False) -> None:
        """The coordinator finished aggregating (or marked the round failed)."""
        self._current, self._busy = None, False
        if failed:
            self._count_failed_round()
        else:
            self._rounds_done, self._failed_attempts = self._rounds_done + 1, 0
            self._retry_at, self._tried = None, set()

    def _count_failed_round(self) -> None:
        """One more consecutive failed round; a back-off, if due, runs from the next :meth:`step`."""
        self._failed_attempts += 1
        self._retry_at = None

    def abandon(self) -> int | None:
        """A step the engine asked for failed with an error: returns the id of the round being closed, which
        the caller must close with :meth:`closed`, or None (a round being started counted as a failed
        attempt; nothing was in flight)."""
        if not self._busy:
            return None
        if self._current is None:
            self.start_failed()
            return None
        return self._current.round_id

    def resume(self, rounds_done: int, running: RunningRound | None, now: float) -> None:
        """Rebuild the state after a restart, from registry data: ``rounds_done`` finished rounds and the
        round that was ``running`` (its deadline restarts from ``now`` so that devices can reconnect and
        re-send)."""
        self._rounds_done, self._sampling_rate = rounds_done, 1.0
        if running is None:
            return
        self.started(running.round_id, running.assignments, now)
        for update_id in running.accepted:
            self._current.record(update_id, True)
        for update_id, reason in running.rejected.items():
            self._current.record(update_id, False, reason)

    def _require_round(self) -> RoundState:
        if self._current is None:
            raise RuntimeError("no round is open: call started() first")
        return self._current


@dataclass(frozen=True)
class RunningRound:
    """A round the registry shows running, as :meth:`RoundEngine.resume` needs it.

    Attributes:
        assignments: ``update_id -> device_id`` recorded for the round.
        accepted: recorded accepted update ids (arrival order). rejected: recorded rejections.
    """

    round_id: int
    assignments: Mapping[str, str]
    accepted: Sequence[str] = ()
    rejected: Mapping[str, str] = field(default_factory=dict)
