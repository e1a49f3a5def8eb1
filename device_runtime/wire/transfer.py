"""Bundle transfer: bundle files -> ``BundleData`` chunks, and chunks -> verified files streamed to disk."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from device_runtime.errors import ProtocolError
from device_runtime.units import MIB
from device_runtime.wire.messages import BundleData


@dataclass(frozen=True)
class BundleFile:
    """A bundle file sent from disk: its path, size (bytes) and sha256 as the sender knows them (the manifest's).

    :func:`bundle_chunks` reads it one chunk at a time, so a sender never holds a whole file in memory; the
    receiver checks the bytes against ``sha256`` (``BundleAssembler``), so a file that changed on disk since it
    was hashed fails the transfer instead of installing.
    """

    path: Path
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path, sha256: str) -> BundleFile:
        return cls(path, path.stat().st_size, sha256)


def bundle_chunks(
    shape_key_id: str, files: Mapping[str, bytes | BundleFile], *, chunk_bytes: int = 4 * MIB
) -> Iterator[BundleData]:
    """Split bundle files into ``BundleData`` messages of at most ``chunk_bytes`` payload each.

    Files go in the order given, each in offset order; the last message has ``more=False``. A
    :class:`BundleFile` is read from disk chunk by chunk (bytes values are sliced).

    Raises:
        ValueError: ``chunk_bytes < 1`` or no file.
        OSError: a BundleFile cannot be read, or is not ``size`` bytes long any more.
    """
    if chunk_bytes < 1 or not files:
        raise ValueError("need chunk_bytes >= 1 and at least one file")
    names = list(files)
    for index, name in enumerate(names):
        content = files[name]
        size = content.size if isinstance(content, BundleFile) else len(content)
        digest = content.sha256 if isinstance(content, BundleFile) else hashlib.sha256(content).hexdigest()
        offsets = range(0, max(size, 1), chunk_bytes)
        with _reader(content) as read:
            for offset in offsets:
                last = index == len(names) - 1 and offset == offsets[-1]
                data = read(offset, min(chunk_bytes, size - offset))
                yield BundleData(
                    shape_key_id=shape_key_id,
                    name=name,
                    offset=offset,
                    total_size=size,
                    sha256=digest,
                    more=not last,
                    data=data,
                )


@contextlib.contextmanager
def _reader(content: bytes | BundleFile) -> Iterator[Callable[[int, int], bytes]]:
    """``read(offset, size)`` of a bundle file's bytes: slices of a bytes value, or reads of a BundleFile (which
    must still be ``content.size`` bytes long)."""
    if not isinstance(content, BundleFile):
        yield lambda offset, size: content[offset : offset + size]
        return
    with open(content.path, "rb") as handle:

        def read(offset: int, size: int) -> bytes:
            data = handle.read(size)
            if len(data) != size:
                raise OSError(f"bundle file {content.path} shrank below its {content.size} bytes while being sent")
            return data

        yield read
        if handle.read(1):
            raise OSError(f"bundle file {content.path} grew beyond its {content.size} bytes while being sent")


class BundleAssembler:
    """Receive the files of one bundle from ``BundleData`` chunks, streaming each to disk.

    Each file is written as it arrives to ``directory/<n>.part``, a name this side chooses (the peer's
    relative path is only returned as a key, for the caller to check against the bundle's manifest), and
    its sha256 is updated chunk by chunk; memory stays at one chunk whatever the bundle size. Any error
    deletes ``directory`` with every partial file in it.

    Args:
        shape_key_id: the bundle requested; chunks of another bundle are rejected.
        directory: an empty directory of the receiver's choosing (created if absent), e.g.
            ``BundleCache.staging_dir()``; the caller deletes it once the files are used.
        max_total_bytes: bound on the sum of all file sizes (bytes).
    """

    def __init__(self, shape_key_id: str, directory: str | Path, *, max_total_bytes: int):
        self.shape_key_id, self.directory, self.max_total_bytes = shape_key_id, Path(directory), max_total_bytes
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._paths: dict[str, Path] = {}
        self.digests: dict[str, str] = {}  # peer's file name -> sha256 of the bytes received, checked (a complete file)
        self._current: BundleData | None = None
        self._out: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._written = 0
        self._declared = 0

    def add(self, chunk: BundleData) -> dict[str, Path] | None:
        """Write the next chunk; once the last chunk arrived, returns the peer's file name -> local path.

        Raises:
            ProtocolError("unexpected"): wrong bundle, chunk out of order, or a file sent twice.
            ProtocolError("too_large"): the files exceed ``max_total_bytes``.
            ProtocolError("bad_payload"): a file's sha256 differs from its declared one.
            ProtocolError("bad_frame"): chunks beyond a file's declared size, or the bundle ended inside a file.
            ProtocolError("bad_header"): a file name with a ``.`` or ``..`` part.
            OSError: the disk is full or not writable.
            After any of these the directory is deleted and the assembler is unusable.
        """
        try:
            return self._add(chunk)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop the transfer and delete the directory with every file received so far."""
        if self._out is not None:
            self._out.close()
            self._out = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def _add(self, chunk: BundleData) -> dict[str, Path] | None:
        if chunk.shape_key_id != self.shape_key_id:
            raise ProtocolError("unexpected", f"chunk of bundle {chunk.shape_key_id}, expected {self.shape_key_id}")
        if any(part in (".", "..") for part in chunk.name.split("/")):
            raise ProtocolError("bad_header", f"bundle file name {chunk.name!r} escapes the bundle")
        if chunk.offset == 0:
            out = self._open(chunk)
        elif (
            self._out is None
            or self._current is None
            or chunk.offset != self._written
            or (chunk.name, chunk.total_size, chunk.sha256)
            != (self._current.name, self._current.total_size, self._current.sha256)
        ):
            raise ProtocolError("unexpected", f"chunk {chunk.name}@{chunk.offset} out of order")
        else:
            out = self._out
        if self._written + len(chunk.data) > chunk.total_size:
            raise ProtocolError("bad_frame", f"{chunk.name}: chunks exceed its declared {chunk.total_size} bytes")
        out.write(chunk.data)
        self._hash.update(chunk.data)
        self._written += len(chunk.data)
        complete = self._written == chunk.total_size
        if complete:
            self._close(chunk)
        if chunk.more:
            return None
        if not complete:
            raise ProtocolError("bad_frame", f"bundle ended inside {chunk.name}")
        return dict(self._paths)

    def _open(self, chunk: BundleData) -> BinaryIO:
        """Start the file of ``chunk`` (its first); returns the open ``.part`` file."""
        if self._out is not None:
            started = self._current.name if self._current is not None else "another file"
            raise ProtocolError("unexpected", f"{chunk.name} started before {started} was complete")
        if chunk.name in self._paths:
            raise ProtocolError("unexpected", f"bundle file {chunk.name} sent twice")
        self._declared += chunk.total_size
        if self._declared > self.max_total_bytes:
            raise ProtocolError("too_large", f"bundle exceeds {self.max_total_bytes} bytes")
        path = self.directory / f"{len(self._paths)}.part"
        self._current, self._paths[chunk.name], self._written = chunk, path, 0
        self._hash = hashlib.sha256()
        self._out = open(path, "xb")
        return self._out

    def _close(self, chunk: BundleData) -> None:
        out, self._out = self._out, None
        if out is not None:
            out.close()
        if self._hash.hexdigest() != chunk.sha256:
            raise ProtocolError("bad_payload", f"bundle file {chunk.name} differs from its sha256")
        self.digests[chunk.name] = chunk.sha256
