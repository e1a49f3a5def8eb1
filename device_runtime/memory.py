"""Keep a long-running device's heap from growing round after round (glibc; a no-op elsewhere).

Each round allocates and frees hundreds of MiB (assignment, ORT session, update). With glibc's default
dynamic mmap threshold those large blocks soon land on the heap, where fragmentation keeps them mapped:
measured on an 8-layer, 1-expert/layer bundle over 5 rounds in one process, the data segment between
rounds stayed at 807-894 MiB and peak RSS rose 1097 -> 1158 MiB; a Pi at 1.5 GiB (``RLIMIT_DATA``) died
in its 4th round. With a fixed 4 MiB mmap threshold and a trim after each round: 615-639 MiB and
1076-1101 MiB (``python /tmp/memexp/rounds.py``-style loop of ``fit_assignment``, recorded in bench/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger("fedmoe.device")
_M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD_BYTES = 4 << 20


def _glibc():
    """The C library if it is glibc (it has ``malloc_trim``), else None (musl, bionic, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


_LIBC = _glibc()


def limit_heap_growth() -> bool:
    """Serve blocks >= 4 MiB with their own mappings, returned to the OS when freed. True if applied."""
    if _LIBC is None:
        return False
    applied = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    log.debug("mmap threshold %d bytes: %s", MMAP_THRESHOLD_BYTES, applied)
    return applied


def release_memory() -> None:
    """Collect garbage cycles and hand freed heap pages back to the OS (call between rounds)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
