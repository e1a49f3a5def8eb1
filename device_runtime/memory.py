"""Keep a long-running device's heap from growing round after round (glibc; a no-op elsewhere).

Each round allocates and frees hundreds of MiB (assignment, ORT session, update). With glibc's default
dynamic mmap threshold those large blocks soon land on the heap, where fragmentation keeps them mapped. A
Pi at 1.5 GiB (``RLIMIT_DATA``) of the default simulation died in its 4th round that way. Measured by
``bench/bench_device_rounds.py`` (8 layers, 1 expert/layer, 5 rounds of 8 steps in one process): with glibc's
defaults the data segment between rounds reached 525-815 MiB and RSS 476-779 MiB; with a fixed 4 MiB mmap
threshold and a trim after each round, 370-591 MiB and 164-193 MiB; peak RSS 1214-1285 vs 1194-1234 MiB.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("fedmoe.device")
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 4 << 20
ARENA_MAX = 2
TRIM_THRESHOLD_BYTES = 32 << 20  # free memory kept at the heap's top (glibc's default: 128 KiB)
TRAINING_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's own ceiling for its dynamic threshold
TRAINING_TRIM_THRESHOLD_BYTES = 512 << 20
_limited = False  # limit_heap_growth() is in force (a long-running device process)


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has ``malloc_trim``), else None (musl, bionic, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


_LIBC = _glibc()


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A kB field of ``/proc/<pid>/status`` (e.g. ``VmHWM``, ``VmData``), or None without procfs / the process."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def limit_heap_growth() -> bool:
    """Serve blocks >= 4 MiB with their own mappings, returned to the OS when freed, keep up to 32 MiB free at the
    heap's top, and keep at most 2 malloc arenas (each worker thread would otherwise get its own, fragmenting
    apart). True if applied.

    The 32 MiB: a fixed mmap threshold also fixes glibc's trim threshold at 128 KiB, so every freed frame of
    1-4 MiB (a websocket fragment, a bundle chunk) was handed back to the OS and faulted in again by the next:
    receiving 256 MiB as 2 MiB chunks from 1 MiB fragments measured 417 minor faults per MiB, 6 with it.
    :func:`release_memory` trims the rest between rounds."""
    global _limited
    if _LIBC is None:
        return False
    applied = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    applied = bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and applied
    applied = bool(_LIBC.mallopt(_M_ARENA_MAX, ARENA_MAX)) and applied
    log.debug(
        "mmap threshold %d, trim threshold %d bytes, arena max %d: %s",
        MMAP_THRESHOLD_BYTES,
        TRIM_THRESHOLD_BYTES,
        ARENA_MAX,
        applied,
    )
    _limited = applied
    return applied


@contextlib.contextmanager
def training_heap() -> Iterator[None]:
    """While a round trains, keep freed blocks of up to 32 MiB in the heap for the next step to reuse; after it,
    back to :func:`limit_heap_growth`'s 4 MiB threshold, and the freed pages go back to the OS.

    Why: ORT trains with its arena off, so every activation and gradient buffer of every step is a fresh
    allocation; at a 4 MiB threshold each one >= 4 MiB is a new mapping, page-faulted in and unmapped again.
    ``fedmoe-device train-local`` of the Pi bundle, 10 steps: kernel 0.93 s -> 0.02 s, minor faults 410,600 ->
    7,400, peak RSS 785 -> 802 MiB (``bench/README.md``, issue 22). A no-op unless :func:`limit_heap_growth`
    is in force (a ``fedmoe-device run`` process on glibc).
    """
    if not _limited or _LIBC is None:
        yield
        return
    _LIBC.mallopt(_M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD_BYTES)
    _LIBC.mallopt(_M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        _LIBC.malloc_trim(0)


def release_memory() -> None:
    """Collect garbage cycles and hand freed heap pages back to the OS (call between rounds)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
