"""Phase timings in the logs: one ``timing phase=NAME seconds=S [key=value ...]`` line per measured phase.

Device and coordinator log them at INFO (``fedmoe.device`` / ``fedmoe.coord``); ``bench/bench_round.py`` reads them
back and attributes each line to the round whose wall-clock window holds its timestamp (the line is written when
the phase ends). The format is a contract with that bench: :data:`PATTERN` parses it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import time
from collections.abc import Callable, Iterator

PATTERN = re.compile(r"timing phase=(?P<phase>[a-z_]+) seconds=(?P<seconds>[0-9.]+)(?P<rest>(?: \w+=\S+)*)")


def log_timing(logger: logging.Logger, phase: str, seconds: float, **fields: object) -> None:
    """Log one phase's wall seconds (and e.g. ``bytes=``, ``round=``) in the :data:`PATTERN` format."""
    extra = "".join(f" {key}={value}" for key, value in fields.items())
    logger.info("timing phase=%s seconds=%.3f%s", phase, max(seconds, 0.0), extra)


@contextlib.contextmanager
def timed(logger: logging.Logger, phase: str, **fields: object) -> Iterator[None]:
    """Log the wall seconds of the ``with`` body as ``phase`` (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        log_timing(logger, phase, time.perf_counter() - start, **fields)


def log_slow_collections(logger: logging.Logger, threshold_s: float = 0.1) -> Callable[[str, dict[str, int]], None]:
    """From now on, log every garbage collection that holds the process longer than ``threshold_s`` seconds as a
    ``timing phase=gc`` line: with 10,000 connections a full collection walks millions of objects while the event
    loop waits. Returns the callback added to ``gc.callbacks`` (remove it to stop)."""
    started = 0.0

    def callback(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        elif (seconds := time.perf_counter() - started) > threshold_s:
            log_timing(logger, "gc", seconds, generation=info["generation"], collected=info["collected"])

    gc.callbacks.append(callback)
    return callback
