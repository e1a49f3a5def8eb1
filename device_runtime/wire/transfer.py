"""Bundle transfer: bundle files -> ``BundleData`` chunks, and chunks -> verified files (no I/O)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

from device_runtime.errors import ProtocolError
from device_runtime.units import MIB
from device_runtime.wire.messages import BundleData


def bundle_chunks(shape_key_id: str, files: Mapping[str, bytes], *, chunk_bytes: int = 4 * MIB) -> Iterator[BundleData]:
    """Split bundle files into ``BundleData`` messages of at most ``chunk_bytes`` payload each.

    Files go in the order given, each in offset order; the last message has ``more=False``.

    Raises:
        ValueError: ``chunk_bytes < 1`` or no file.
    """
    if chunk_bytes < 1 or not files:
        raise ValueError("need chunk_bytes >= 1 and at least one file")
    names = list(files)
    for index, name in enumerate(names):
        blob, digest = files[name], hashlib.sha256(files[name]).hexdigest()
        offsets = range(0, max(len(blob), 1), chunk_bytes)
        for offset in offsets:
            last = index == len(names) - 1 and offset == offsets[-1]
            yield BundleData(shape_key_id=shape_key_id, name=name, offset=offset, total_size=len(blob),
                             sha256=digest, more=not last, data=blob[offset : offset + chunk_bytes])


class BundleAssembler:
    """Reassemble and verify the files of one bundle from ``BundleData`` chunks (no I/O).

    Args:
        shape_key_id: the bundle requested; chunks of another bundle are rejected.
        max_total_bytes: bound on the sum of all file sizes (bytes).
    """

    def __init__(self, shape_key_id: str, *, max_total_bytes: int):
        self.shape_key_id = shape_key_id
        self.max_total_bytes = max_total_bytes
        self._files: dict[str, bytearray] = {}
        self._current: BundleData | None = None
        self._declared = 0

    def add(self, chunk: BundleData) -> dict[str, bytes] | None:
        """Add the next chunk; returns name -> file bytes once the last chunk arrived, else None.

        Raises:
            ProtocolError("unexpected"): wrong bundle, chunk out of order, or a file sent twice.
            ProtocolError("too_large"): the files exceed ``max_total_bytes``.
            ProtocolError("bad_payload"): a file's sha256 differs from its declared one.
        """
        if chunk.shape_key_id != self.shape_key_id:
            raise ProtocolError("unexpected", f"chunk of bundle {chunk.shape_key_id}, expected {self.shape_key_id}")
        if any(part in (".", "..") for part in chunk.name.split("/")):
            raise ProtocolError("bad_header", f"bundle file name {chunk.name!r} escapes the bundle")
        buf = self._open(chunk) if chunk.offset == 0 else self._continue(chunk)
        buf += chunk.data
        if len(buf) > chunk.total_size:
            raise ProtocolError("bad_frame", f"{chunk.name}: chunks exceed its declared {chunk.total_size} bytes")
        complete = len(buf) == chunk.total_size
        if complete and hashlib.sha256(buf).hexdigest() != chunk.sha256:
            raise ProtocolError("bad_payload", f"bundle file {chunk.name} differs from its sha256")
        if chunk.more:
            return None
        if not complete:
            raise ProtocolError("bad_frame", f"bundle ended inside {chunk.name}")
        return {name: bytes(b) for name, b in self._files.items()}

    def _open(self, chunk: BundleData) -> bytearray:
        if self._current is not None and len(self._files[self._current.name]) != self._current.total_size:
            raise ProtocolError("unexpected", f"{chunk.name} started before {self._current.name} was complete")
        if chunk.name in self._files:
            raise ProtocolError("unexpected", f"bundle file {chunk.name} sent twice")
        self._declared += chunk.total_size
        if self._declared > self.max_total_bytes:
            raise ProtocolError("too_large", f"bundle exceeds {self.max_total_bytes} bytes")
        self._current = chunk
        self._files[chunk.name] = bytearray()
        return self._files[chunk.name]

    def _continue(self, chunk: BundleData) -> bytearray:
        cur = self._current
        if cur is None or (chunk.name, chunk.total_size, chunk.sha256) != (cur.name, cur.total_size, cur.sha256) \
                or chunk.offset != len(self._files[cur.name]):
            raise ProtocolError("unexpected", f"chunk {chunk.name}@{chunk.offset} out of order")
        return self._files[cur.name]
