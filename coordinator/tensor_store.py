"""Content-addressed storage of tensor files (global checkpoints, device updates) on the coordinator.

Layout: ``<root>/<sha[:2]>/<sha>.safetensors`` where ``sha`` is the hex sha256 of the file's bytes.
Writes are atomic (temporary file in the same directory, fsync, ``os.replace``, fsync of the directory),
so a crash leaves either the whole file or none; reads verify the hash. The registry stores only the sha.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from device_runtime.errors import ModelError
from device_runtime.files import atomic_write
from device_runtime.wire import bytes_to_tensors
from device_runtime.wire.fields import SHA256
from device_runtime.wire.tensors import safetensors_parts


class TensorStore:
    """Safetensors files addressed by their sha256 under ``root`` (created if missing)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        """Where the file of ``sha`` lives. Raises ModelError if ``sha`` is not 64 lowercase hex digits."""
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            raise ModelError(f"not a sha256: {str(sha)[:80]!r}")
        return self.root / sha[:2] / f"{sha}.safetensors"

    def put(self, tensors_or_bytes: Mapping[str, np.ndarray] | bytes) -> str:
        """Store a name -> float32/float16 array map (serialised as safetensors) or a safetensors blob.

        Returns the hex sha256 of the stored bytes; storing the same content twice is a no-op.

        Raises:
            ProtocolError("bad_tensor"): a tensor name or dtype is not allowed on the wire.
        """
        # tensors: the safetensors header and views of the arrays, hashed and written part by part (no blob copy)
        parts = [tensors_or_bytes] if isinstance(tensors_or_bytes, bytes) else safetensors_parts(tensors_or_bytes)
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        sha = digest.hexdigest()
        target = self.path(sha)
        if target.is_file():
            return sha
        target.parent.mkdir(exist_ok=True)
        atomic_write(target, parts, mode=0o644)
        _fsync_dir(target.parent)
        return sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def get(self, sha: str) -> bytes:
        """The bytes stored under ``sha``, verified.

        Raises:
            ModelError: ``sha`` is malformed, absent, or the file's content no longer hashes to it.
        """
        return bytes(self._read(sha))

    def _read(self, sha: str) -> bytearray:
        """:meth:`get` into a writable buffer (read once from the file, no further copy)."""
        path = self.path(sha)
        try:
            with open(path, "rb") as handle:
                data = bytearray(os.fstat(handle.fileno()).st_size)
                if handle.readinto(data) != len(data):
                    raise ModelError(f"tensor file {path} changed size while it was read")
        except FileNotFoundError as exc:
            raise ModelError(f"tensor file {sha[:12]}... is not in the store {self.root}") from exc
        if hashlib.sha256(data).hexdigest() != sha:
            raise ModelError(
                f"tensor file {path} is corrupted (content does not hash to its name); "
                "restore it from a backup or re-run the round"
            )
        return data

    def discard(self, shas: Iterable[str]) -> int:
        """Delete the files of ``shas`` (absent ones are skipped); returns the bytes freed.
        Raises ModelError for a malformed sha."""
        freed = 0
        for path in {self.path(sha) for sha in shas}:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
        return freed

    def damaged(self, shas: Iterable[str]) -> list[str]:
        """Those of ``shas`` whose file is present but not whole: its safetensors header does not cover the file
        (a truncated copy, say). Reads only each header, so it suits a start-up check of every version; a full
        sha256 check happens on every :meth:`get`."""
        bad = []
        for sha in sorted(set(shas)):
            path = self.path(sha)
            if not path.is_file():
                continue
            try:
                with safe_open(str(path), framework="numpy"):
                    pass
            except (SafetensorError, OSError):
                bad.append(sha)
        return bad

    def shas(self) -> set[str]:
        """The sha256 of every file in the store."""
        return {p.stem for p in self.root.glob("??/*.safetensors") if SHA256.fullmatch(p.stem)}

    def load(self, sha: str) -> dict[str, np.ndarray]:
        """The tensors stored under ``sha`` (name -> array, dtype as stored): writable views of one buffer read from
        the file (no copy after the read). Raises like :meth:`get`."""
        return bytes_to_tensors(self._read(sha), copy=False)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
