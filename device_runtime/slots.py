"""Training slots: at most K devices of one machine train at the same time (simulation, shared hosts).

``FEDMOE_TRAINING_SLOTS=DIR:K`` makes :func:`training_slot` hold an exclusive ``flock`` on one of the files
``DIR/slot-0 .. slot-{K-1}`` while a round trains; without the variable it does nothing. The simulation sets
it so N device processes on a 2-core machine train at most 2 at a time (the OS frees a lock when its
process dies, so a killed device never holds a slot).

Slots are served first come, first served: a device takes a :func:`ticket` when its assignment arrives (a file
``DIR/queue/<arrival ns>-<pid>`` it holds an ``flock`` on), and a free slot goes to the oldest live ticket. The
coordinator sends a round's assignments longest estimated training first (``Coordinator._start_round``), so
the devices that share these slots train in longest-processing-time-first order. A ticket whose process died is
unlocked, so the next device deletes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from device_runtime.errors import ConfigError

ENV = "FEDMOE_TRAINING_SLOTS"
QUEUE = "queue"


def parse_slots(spec: str) -> tuple[Path, int]:
    """``"DIR:K"`` -> ``(DIR, K)``. Raises ConfigError on a malformed value or K < 1."""
    directory, _, count = spec.rpartition(":")
    if not directory or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{ENV} must be DIR:K with K >= 1, got {spec!r}")
    return Path(directory), int(count)


@dataclass
class Ticket:
    """A place in the slots' queue: the locked file ``path`` (its name orders the queue). :meth:`close` leaves."""

    spec: str
    path: Path
    handle: IO[str]

    def close(self) -> None:
        """Leave the queue (idempotent)."""
        if not self.handle.closed:
            self.path.unlink(missing_ok=True)
            self.handle.close()


def ticket(spec: str | None = None) -> Ticket | None:
    """Join the queue of ``spec``'s slots (default: ``$FEDMOE_TRAINING_SLOTS``) now; None when no slots are
    configured. The file is locked before it gets its queue name, so every visible ticket is live or stale."""
    spec = os.environ.get(ENV) if spec is None else spec
    if not spec:
        return None
    directory, _ = parse_slots(spec)
    queue = directory / QUEUE
    queue.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}"
    staging = queue / f".{name}"
    handle = open(staging, "a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    os.replace(staging, queue / name)
    return Ticket(spec, queue / name, handle)


def _first_live(queue: Path) -> str | None:
    """The oldest ticket whose process still holds it; stale ones (their process died) are deleted."""
    for path in sorted(p for p in queue.iterdir() if not p.name.startswith(".")):
        try:
            handle = open(path, "a")
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return path.name  # locked: its process waits for a slot
        else:
            path.unlink(missing_ok=True)
        finally:
            handle.close()
    return None


@contextlib.contextmanager
def training_slot(
    spec: str | None = None, *, poll_s: float = 0.2, queued: Ticket | None = None
) -> Iterator[int | None]:
    """Hold one of the K slots of ``spec`` (default: ``$FEDMOE_TRAINING_SLOTS``) for the ``with`` body.

    Yields the slot index, or None when no slots are configured. Blocks (polling every ``poll_s`` s) until a
    slot is free and this device's ticket is the oldest waiting (``queued``, taken when the assignment arrived;
    default: one taken now). The ticket is closed when the slot is taken or on error.
    """
    spec = os.environ.get(ENV) if spec is None else spec
    if not spec:
        if queued is not None:
            queued.close()
        yield None
        return
    directory, count = parse_slots(spec)
    directory.mkdir(parents=True, exist_ok=True)
    mine = queued if queued is not None else ticket(spec)
    try:
        while True:
            if mine is None or _first_live(mine.path.parent) == mine.path.name:
                for index in range(count):
                    handle = open(directory / f"slot-{index}", "a")
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        handle.close()
                        continue
                    if mine is not None:
                        mine.close()
                    try:
                        yield index
                    finally:
                        fcntl.flock(handle, fcntl.LOCK_UN)
                        handle.close()
                    return
            time.sleep(poll_s)
    finally:
        if mine is not None:
            mine.close()
