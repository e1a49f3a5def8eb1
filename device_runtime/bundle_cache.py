"""A device's bounded cache of verified bundles, one directory per ``ShapeKey.id``.

A bundle's graph depends only on its shape key (``device_runtime.bundle``), so a device fetches it once
per shape and reuses it every round it is assigned that shape. Bundles enter the cache only through
:meth:`BundleCache.install`, which verifies the manifest's signature (with a ``Verifier``, the coordinator key
pinned at enrollment: ``device_runtime.signing``) and every sha256 (``load_bundle``) before the bundle becomes
visible; :meth:`BundleCache.get` checks both again. Each file is hashed once per process: ``install`` takes the
sha256 ``BundleAssembler`` computed while the bytes arrived, and ``get`` re-hashes a bundle only the first time this
process reads it or when a file's size, modification time or inode changed since it was last verified (the
signature check is repeated every time). Least recently used bundles are evicted beyond ``max_bundles`` entries or
``max_bytes`` bytes; recency is the directory's mtime (set on every install and lookup).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from device_runtime.bundle import MANIFEST, Bundle, load_bundle, verify_files
from device_runtime.errors import BundleError, BundleIntegrityError
from device_runtime.signing import MANIFEST_SIG, Verifier
from device_runtime.wire.fields import ID

_TMP_PREFIX = ".tmp-"


class BundleCache:
    """Verified bundles under ``root/<shape_key_id>/``.

    Args:
        root: cache directory (created, mode 0700).
        max_bundles: bundles kept at most (>= 1).
        max_bytes: total size of the kept bundles at most (bytes); also the largest bundle accepted.
        verifier: checks each manifest's ``manifest.sig`` (None: bundles are not signature-checked).

    Raises:
        BundleError: ``max_bundles < 1`` or ``max_bytes < 1``.
    """

    def __init__(
        self, root: str | Path, *, max_bundles: int = 4, max_bytes: int = 4 << 30, verifier: Verifier | None = None
    ):
        if max_bundles < 1 or max_bytes < 1:
            raise BundleError(f"bundle cache bounds must be >= 1, got {max_bundles} bundles, {max_bytes} bytes")
        self.root, self.max_bundles, self.max_bytes = Path(root), max_bundles, max_bytes
        self.verifier = verifier
        self._verified: dict[str, tuple[tuple[str, int, int, int], ...]] = {}  # id -> file stats when last hashed
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in self.root.glob(_TMP_PREFIX + "*"):  # left by a crash during install
            shutil.rmtree(stale, ignore_errors=True)
        for shape_key_id in self.ids() if verifier is not None else ():  # e.g. cached before a key was pinned
            try:
                self._check_signature(self.root / shape_key_id)
            except BundleIntegrityError:
                shutil.rmtree(self.root / shape_key_id, ignore_errors=True)

    def ids(self) -> list[str]:
        """Shape key ids of the cached bundles, least recently used first."""
        dirs = [p for p in self.root.iterdir() if p.is_dir() and ID.fullmatch(p.name) and (p / MANIFEST).is_file()]
        return [p.name for p in sorted(dirs, key=lambda p: p.stat().st_mtime_ns)]

    def __contains__(self, shape_key_id: str) -> bool:
        return bool(ID.fullmatch(shape_key_id)) and (self.root / shape_key_id / MANIFEST).is_file()

    def get(self, shape_key_id: str, *, verify: bool = True) -> Bundle | None:
        """The cached bundle (marked most recently used), or None if absent.

        A cached bundle that no longer verifies (disk corruption, tampering, or unsigned while the cache has a
        verifier, e.g. cached before this device pinned a key) is deleted and None returned.
        """
        if shape_key_id not in self:
            return None
        path = self.root / shape_key_id
        try:
            self._check_signature(path)
            bundle = load_bundle(path, verify=False)
            if verify:
                self._verify_once(shape_key_id, bundle)
        except (BundleError, OSError):
            self._verified.pop(shape_key_id, None)
            shutil.rmtree(path, ignore_errors=True)
            return None
        _touch(path)
        return bundle

    def _verify_once(self, shape_key_id: str, bundle: Bundle, digests: Mapping[str, str] | None = None) -> None:
        """Check every file of ``bundle`` against its manifest sha256: by ``digests`` (name -> sha256 computed as
        the bytes arrived) when given, else by hashing, unless this process hashed the same files before (same
        size, modification time and inode). Raises BundleIntegrityError: a file differs or is missing."""
        listed = bundle.manifest.files
        stats = _stats(bundle.root, listed)
        if digests is not None:
            wrong = sorted(name for name, sha in listed.items() if digests.get(name) != sha)
            if wrong:
                raise BundleIntegrityError(f"bundle files {wrong[:5]} differ from the manifest's sha256")
        elif self._verified.get(shape_key_id) != stats:
            verify_files(bundle.root, listed)
        self._verified[shape_key_id] = stats

    def staging_dir(self) -> Path:
        """A new empty directory inside the cache for a bundle being received (``BundleAssembler``); a
        crash leaves it to the next start's clean-up. The receiver deletes it when done."""
        return Path(tempfile.mkdtemp(dir=self.root, prefix=_TMP_PREFIX))

    def install(
        self, shape_key_id: str, files: Mapping[str, bytes | Path], *, digests: Mapping[str, str] | None = None
    ) -> Bundle:
        """Write a received bundle, verify it, make it visible, then evict down to the bounds.

        Args:
            shape_key_id: the bundle's shape key id (its manifest must say the same).
            files: relative path -> bytes, or -> a file in one of this cache's :meth:`staging_dir` (moved,
                not copied, as ``BundleAssembler`` leaves them); ``manifest.json`` included.
            digests: relative path -> the sha256 of those bytes as computed while they arrived
                (``BundleAssembler.digests``): checked against the manifest instead of hashing the files again.
                None: every file is hashed here.

        Raises:
            BundleSignatureError: with a verifier, ``manifest.sig`` is missing or does not verify.
            BundleIntegrityError: a file differs from the manifest's sha256, or a file is not listed in it.
            BundleError: bad id, no or malformed manifest, another shape key, or larger than ``max_bytes``.
        """
        if not ID.fullmatch(shape_key_id):
            raise BundleError(f"invalid shape key id {shape_key_id!r}")
        size = sum(len(c) if isinstance(c, bytes) else c.stat().st_size for c in files.values())
        if size > self.max_bytes:
            raise BundleError(
                f"bundle {shape_key_id} is {size} bytes, above the cache bound {self.max_bytes}; raise --cache-mib"
            )
        with tempfile.TemporaryDirectory(dir=self.root, prefix=_TMP_PREFIX) as tmp:
            staged = Path(tmp) / "bundle"
            _write_files(staged, files)
            self._check_signature(staged)  # the manifest is authentic before it is parsed
            bundle = load_bundle(staged, verify=False)
            _check_contents(shape_key_id, bundle, files)
            self._verified.pop(shape_key_id, None)
            self._verify_once(shape_key_id, bundle, digests)  # sha256 of every file, before anything is visible
            final = self.root / shape_key_id
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staged, final)
        self._verified[shape_key_id] = _stats(final, bundle.manifest.files)  # os.replace keeps inodes and times
        _touch(final)
        self._evict(keep=shape_key_id)
        return Bundle(root=final, manifest=bundle.manifest)

    def _check_signature(self, root: Path) -> None:
        if self.verifier is not None and (root / MANIFEST).is_file():  # no manifest: load_bundle says so
            sig = root / MANIFEST_SIG
            self.verifier.manifest((root / MANIFEST).read_bytes(), sig.read_bytes() if sig.is_file() else None)

    def total_bytes(self) -> int:
        """Size of every cached bundle, bytes."""
        return sum(_dir_bytes(self.root / i) for i in self.ids())

    def _evict(self, *, keep: str) -> None:
        ids = self.ids()
        sizes = {i: _dir_bytes(self.root / i) for i in ids}
        for victim in ids:
            if len(sizes) <= self.max_bundles and sum(sizes.values()) <= self.max_bytes:
                break
            if victim != keep:
                shutil.rmtree(self.root / victim, ignore_errors=True)
                del sizes[victim]


def _write_files(root: Path, files: Mapping[str, bytes | Path]) -> None:
    root.mkdir()
    base = root.resolve()
    for name, content in files.items():
        path = (root / name).resolve()
        if base not in path.parents:
            raise BundleIntegrityError(f"bundle file {name!r} escapes the bundle directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            os.replace(content, path)


def _check_contents(shape_key_id: str, bundle: Bundle, files: Mapping[str, bytes | Path]) -> None:
    if bundle.manifest.shape_key.id != shape_key_id:
        raise BundleError(f"received bundle is {bundle.manifest.shape_key.id}, requested {shape_key_id}")
    unlisted = sorted(set(files) - set(bundle.manifest.files) - {MANIFEST, MANIFEST_SIG})
    if unlisted:
        raise BundleIntegrityError(f"bundle {shape_key_id} holds files its manifest does not list: {unlisted[:5]}")


def _stats(root: Path, names: Mapping[str, str]) -> tuple[tuple[str, int, int, int], ...]:
    """``(name, size, mtime_ns, inode)`` of each listed file under ``root``.

    Raises:
        BundleIntegrityError: a file is missing, not a regular file, or escapes ``root``.
    """
    base, out = root.resolve(), []
    for name in sorted(names):
        path = (root / name).resolve()
        if base not in path.parents:
            raise BundleIntegrityError(f"bundle file {name!r} escapes the bundle directory")
        try:
            st = path.stat()
        except OSError as exc:
            raise BundleIntegrityError(f"bundle file {name} is missing from {root}") from exc
        if not path.is_file():
            raise BundleIntegrityError(f"bundle file {name} is missing from {root}")
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _touch(path: Path) -> None:
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
