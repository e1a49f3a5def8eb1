"""Training slots: at most K devices of one machine train at the same time (simulation, shared hosts).

``FEDMOE_TRAINING_SLOTS=DIR:K`` makes :func:`training_slot` hold an exclusive ``flock`` on one of the files
``DIR/slot-0 .. slot-{K-1}`` while a round trains; without the variable it does nothing. The simulation sets
it so N device processes on a 2-core machine train at most 2 at a time (the OS frees a lock when its
process dies, so a killed device never holds a slot).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from device_runtime.errors import ConfigError

ENV = "FEDMOE_TRAINING_SLOTS"


def parse_slots(spec: str) -> tuple[Path, int]:
    """``"DIR:K"`` -> ``(DIR, K)``. Raises ConfigError on a malformed value or K < 1."""
    directory, _, count = spec.rpartition(":")
    if not directory or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{ENV} must be DIR:K with K >= 1, got {spec!r}")
    return Path(directory), int(count)


@contextlib.contextmanager
def training_slot(spec: str | None = None, *, poll_s: float = 0.2) -> Iterator[int | None]:
    """Hold one of the K slots of ``spec`` (default: ``$FEDMOE_TRAINING_SLOTS``) for the ``with`` body.

    Yields the slot index, or None when no slots are configured. Blocks (polling every ``poll_s`` s) until
    a slot is free.
    """
    spec = os.environ.get(ENV) if spec is None else spec
    if not spec:
        yield None
        return
    directory, count = parse_slots(spec)
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            handle = open(directory / f"slot-{index}", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_s)
