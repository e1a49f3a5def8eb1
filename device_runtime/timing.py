"""Phase timings in the logs: one ``timing phase=NAME seconds=S [key=value ...]`` line per measured phase.

Device and coordinator log them at INFO (``fedmoe.device`` / ``fedmoe.coord``); ``bench/bench_round.py`` reads them
back and attributes each line to the round whose wall-clock window holds its timestamp (the line is written when
the phase ends). The format is a contract with that bench: :data:`PATTERN` parses it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator

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
