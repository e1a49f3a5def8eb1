"""How an authenticated device reacts to coordinator messages: a "message + state -> actions" layer.

No network I/O here: :class:`DeviceSession` returns :class:`Send`, :class:`InstallBundle`, :class:`Train`,
:class:`Acked`, :class:`SplitReply`, :class:`Secure` and :class:`Report` actions that ``device_runtime.client``
carries out (websocket, bundle cache, ORT training, update store), and the client tells the session what came of them
(:meth:`DeviceSession.bundle_installed`, :meth:`DeviceSession.bundle_rejected`, :meth:`DeviceSession.forget`).
The one disk write is the bundle transfer: ``BundleAssembler`` streams chunks into a staging directory
that the client's bundle cache provides.

Rules (``docs/round.md``, steps 4-6):

* An ``Assignment`` whose ``update_id`` the device already holds (queued, training, pending upload or
  acknowledged) is not trained again: a pending update is re-sent by the client on every connection.
* An ``Assignment`` for a shape key not in the cache waits for the bundle: one ``BundleRequest`` per shape
  key, chunks streamed to disk by ``BundleAssembler`` (bounded, sha256 per file). A broken transfer drops the
  waiting assignments (nothing is trained) and tells the coordinator with an ``Error``.
* A malformed frame gets an ``Error`` back and aborts any bundle transfer (a chunk may have been lost).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.errors import ProtocolError
from device_runtime.wire import (
    SECURE_TO_DEVICE,
    Ack,
    Assignment,
    BundleAssembler,
    BundleData,
    BundleRequest,
    CutGradient,
    Error,
    Heartbeat,
    Message,
    SplitStep,
)


@dataclass(frozen=True)
class Send:
    """Send ``message`` to the coordinator."""

    message: Message


@dataclass(frozen=True)
class InstallBundle:
    """Verify and cache these received bundle files (relative path -> file in ``directory``), report back
    to the session, and delete ``directory``."""

    shape_key_id: str
    files: dict[str, Path] = field(compare=False)
    directory: Path = field(compare=False)
    digests: dict[str, str] = field(default_factory=dict, compare=False)  # sha256 of each file, checked as received


@dataclass(frozen=True)
class Train:
    """Train ``assignment`` (its bundle is cached) and upload the resulting Update."""

    assignment: Assignment


@dataclass(frozen=True)
class Secure:
    """Run this secure-aggregation step (``device_runtime.secagg``) and send its answer."""

    message: Message


@dataclass(frozen=True)
class Acked:
    """The coordinator recorded ``update_id`` (``accepted`` False: it was rejected for ``reason``)."""

    update_id: str
    accepted: bool
    reason: str


@dataclass(frozen=True)
class SplitReply:
    """The coordinator's answer in a split step (CutGradient or SplitStep): hand it to the training thread."""

    message: Message


@dataclass(frozen=True)
class Report:
    """Something worth a log line: ``level`` is ``"info"`` or ``"warning"``."""

    level: str
    text: str


Action = Send | InstallBundle | Train | Acked | SplitReply | Report | Secure


class DeviceSession:
    """Protocol reactions of one device across its connections.

    Args:
        cached: shape key ids whose bundles are in the device's cache.
        known_updates: update ids the device already holds (pending upload or acknowledged).
        max_bundle_bytes: the largest bundle accepted (bytes).
        staging: returns a new empty directory for one bundle transfer (``BundleCache.staging_dir``).
    """

    def __init__(
        self, *, cached: Iterable[str], known_updates: Iterable[str], max_bundle_bytes: int, staging: Callable[[], Path]
    ):
        self.cached, self.known = set(cached), set(known_updates)
        self.max_bundle_bytes, self.staging = max_bundle_bytes, staging
        self._fetching: dict[str, BundleAssembler] = {}
        self._waiting: dict[str, list[Assignment]] = {}

    # ------------------------------------------------------------ coordinator messages

    def on_message(self, msg: Message) -> list[Action]:
        """React to one decoded coordinator message."""
        if isinstance(msg, Assignment):
            return self._assignment(msg)
        if isinstance(msg, BundleData):
            return self._chunk(msg)
        if isinstance(msg, SECURE_TO_DEVICE):
            return [Secure(msg)]
        if isinstance(msg, Ack):
            self.known.add(msg.update_id)
            return [Acked(msg.update_id, msg.accepted, msg.reason)]
        if isinstance(msg, Heartbeat):
            return []
        if isinstance(msg, (CutGradient, SplitStep)):
            return [SplitReply(msg)]
        if isinstance(msg, Error):
            return [Report("warning", f"coordinator reported {msg.code}: {msg.message}")]
        return [Send(Error(code="unexpected", message=f"{msg.TYPE} is not expected by a device"))]

    def on_frame_error(self, exc: ProtocolError) -> list[Action]:
        """A frame from the coordinator failed to decode: answer with its code, abort bundle transfers."""
        actions: list[Action] = [Send(Error(code=exc.code, message=str(exc)[:2000]))]
        for shape_key_id in list(self._fetching):
            actions += self._drop_transfer(shape_key_id, f"transfer aborted by a malformed frame: {exc}")
        return actions or [Report("warning", f"malformed frame from the coordinator: {exc}")]

    def connection_lost(self) -> None:
        """Transfers cannot resume on a new connection; the coordinator re-sends pending assignments."""
        for shape_key_id, assembler in self._fetching.items():
            assembler.abort()
            for assignment in self._waiting.pop(shape_key_id, []):
                self.known.discard(assignment.update_id)
        self._fetching.clear()

    # ------------------------------------------------------------ outcomes reported by the client

    def bundle_installed(self, shape_key_id: str) -> list[Action]:
        """The bundle verified and is cached: train the assignments that waited for it."""
        self.cached.add(shape_key_id)
        return [Train(a) for a in self._waiting.pop(shape_key_id, [])]

    def bundle_rejected(self, shape_key_id: str, code: str, reason: str) -> list[Action]:
        """The bundle failed verification: nothing is trained, the coordinator is told."""
        self.cached.discard(shape_key_id)
        return [
            Send(Error(code=code, message=f"bundle {shape_key_id} rejected: {reason}"[:2000])),
            *self._drop_waiting(shape_key_id, reason),
        ]

    def bundle_evicted(self, shape_key_id: str) -> None:
        self.cached.discard(shape_key_id)

    def forget(self, update_id: str) -> None:
        """Training of ``update_id`` failed or was abandoned: a re-sent assignment may be trained again."""
        self.known.discard(update_id)

    # ------------------------------------------------------------ internals

    def _assignment(self, msg: Assignment) -> list[Action]:
        if msg.update_id in self.known:
            return [Report("info", f"assignment {msg.update_id} already handled; not training it again")]
        self.known.add(msg.update_id)
        key = msg.shape_key.id
        if key in self.cached:
            return [Train(msg)]
        self._waiting.setdefault(key, []).append(msg)
        if key in self._fetching:
            return []
        self._fetching[key] = BundleAssembler(key, self.staging(), max_total_bytes=self.max_bundle_bytes)
        return [Report("info", f"fetching bundle {key}"), Send(BundleRequest(shape_key_id=key))]

    def _chunk(self, chunk: BundleData) -> list[Action]:
        assembler = self._fetching.get(chunk.shape_key_id)
        if assembler is None:
            return [Send(Error(code="unexpected", message=f"bundle {chunk.shape_key_id} was not requested"))]
        try:
            files = assembler.add(chunk)  # on error it has deleted its directory
        except ProtocolError as exc:
            return [
                Send(Error(code=exc.code, message=str(exc)[:2000])),
                *self._drop_transfer(chunk.shape_key_id, str(exc)),
            ]
        except OSError as exc:  # disk full or not writable
            return [
                Send(Error(code="internal", message=f"cannot store bundle {chunk.shape_key_id}: {exc}"[:2000])),
                *self._drop_transfer(chunk.shape_key_id, f"cannot store it: {exc}"),
            ]
        if files is None:
            return []
        del self._fetching[chunk.shape_key_id]
        return [InstallBundle(chunk.shape_key_id, files, assembler.directory, assembler.digests)]

    def _drop_transfer(self, shape_key_id: str, reason: str) -> list[Action]:
        assembler = self._fetching.pop(shape_key_id, None)
        if assembler is not None:
            assembler.abort()
        return self._drop_waiting(shape_key_id, reason)

    def _drop_waiting(self, shape_key_id: str, reason: str) -> list[Action]:
        dropped = self._waiting.pop(shape_key_id, [])
        for assignment in dropped:
            self.known.discard(assignment.update_id)
        ids = ", ".join(a.update_id for a in dropped) or "none"
        return [Report("warning", f"bundle {shape_key_id} rejected ({reason}); assignments dropped: {ids}")]
