"""Which connected devices a round may select: the participation rules of the round engine (I/O-free).

A device is left out of selection while it is:

- *excluded*: it failed ``exclude_after`` assignments in a row. A failure is an assignment the device
  reported an Error for, or held when its connection closed; each assignment counts once, and the count
  survives reconnects (only an accepted update resets it). An excluded device is re-admitted after a
  back-off of ``backoff(k)`` seconds from its last failure, ``k`` its failures beyond ``exclude_after``
  (``RoundPolicy.backoff`` doubles per failure: each failure after re-admission doubles the exclusion);
- *unplannable*: planning an assignment for it failed (cleared when it reconnects);
- *oversized*: it refused an assignment larger than its max message size (cleared when it connects with
  another profile).

Rejected updates (a bad shape, a norm over the bound) and stragglers cut by the deadline do not count as
failures: the round's own rules already handle them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

EXCLUDE_AFTER_FAILURES = 2


@dataclass
class Participation:
    """Per-device participation state; changes only through the event methods.

    Attributes:
        backoff: ``k -> seconds`` a device is excluded for after its ``k``-th failure beyond ``exclude_after``
            (0: the first exclusion). exclude_after: failed assignments in a row that exclude a device.
    """

    backoff: Callable[[int], float]
    exclude_after: int = EXCLUDE_AFTER_FAILURES
    _failures: dict[str, int] = field(default_factory=dict, init=False)
    _excluded_until: dict[str, float] = field(default_factory=dict, init=False)
    _unplannable: dict[str, str] = field(default_factory=dict, init=False)
    _oversized: dict[str, dict] = field(default_factory=dict, init=False)

    # ------------------------------------------------------------ events

    def connected(self, device_id: str, profile: dict) -> None:
        """``device_id`` authenticated with ``profile``: planning is tried again, and a refusal of an oversized
        assignment is forgotten if the profile changed. Failures are not forgotten."""
        self._unplannable.pop(device_id, None)
        if self._oversized.get(device_id, profile) != profile:
            del self._oversized[device_id]

    def failed(self, device_id: str, now: float) -> float | None:
        """``device_id`` failed an assignment at ``now`` (seconds, the engine's clock; the engine counts each
        assignment once). Returns the time (same clock) until which the device is now excluded, or None."""
        count = self._failures[device_id] = self._failures.get(device_id, 0) + 1
        if count < self.exclude_after:
            return None
        until = self._excluded_until[device_id] = now + self.backoff(count - self.exclude_after)
        return until

    def succeeded(self, device_id: str) -> None:
        """An update of ``device_id`` was accepted: its failures and exclusion are cleared."""
        self._failures.pop(device_id, None)
        self._excluded_until.pop(device_id, None)

    def unplannable(self, device_id: str, reason: str) -> None:
        """Planning ``device_id`` failed for ``reason``: not selected until it reconnects."""
        self._unplannable[device_id] = reason

    def refused(self, device_id: str, profile: dict) -> None:
        """``device_id`` (connected with ``profile``) refused an oversized assignment: not selected until it
        connects with another profile."""
        self._oversized[device_id] = profile

    # ------------------------------------------------------------ queries

    def eligible(self, device_ids: Iterable[str], now: float) -> list[str]:
        """Those of ``device_ids`` a round may select at ``now`` (order kept)."""
        return [
            d
            for d in device_ids
            if d not in self._unplannable and d not in self._oversized and self._excluded_until.get(d, now) <= now
        ]

    def excluded(self, now: float) -> dict[str, float]:
        """``device_id -> time`` its exclusion ends, for the devices excluded at ``now``."""
        return {d: until for d, until in self._excluded_until.items() if until > now}

    def failures(self, device_id: str) -> int:
        """Failed assignments of ``device_id`` since its last accepted update."""
        return self._failures.get(device_id, 0)
