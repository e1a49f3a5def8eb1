"""Crash-safe file writes, shared by the credentials file, the device's update store and the tensor store."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path


def atomic_write(
    path: str | Path, data: bytes | memoryview | Sequence[bytes | memoryview], *, mode: int = 0o600
) -> Path:
    """Write ``data`` (a buffer, or buffers written one after the other, never joined) to ``path`` atomically: a
    temporary file in the same directory (created with permissions ``mode``, never readable by others in between),
    fsync, then ``os.replace``.

    A crash leaves either the old file or the new one, never a torn one. Returns ``path``.
    """
    path = Path(path)
    parts = [data] if isinstance(data, (bytes, memoryview)) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
