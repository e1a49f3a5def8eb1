"""Updates not yet acknowledged by the coordinator, kept on disk so that a reconnect or a restart re-sends
them with the same ``update_id`` (the coordinator records each update_id once).

Layout under ``root`` (mode 0700)::

    <update_id>.safetensors   the update's tensors (never pickle)
    <update_id>.json          every other Update field; written last, so its presence marks a complete record
    acked.json                the most recent acknowledged update ids (a re-sent assignment is not retrained)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import safetensors.numpy

from device_runtime.errors import ProtocolError
from device_runtime.files import atomic_write
from device_runtime.wire import Update, validate
from device_runtime.wire.fields import ID

ACKED_FILE = "acked.json"


class UpdateStore:
    """Pending (unacknowledged) updates and recently acknowledged update ids.

    Args:
        root: directory (created, mode 0700).
        keep_acked: how many acknowledged ids to remember.
    """

    def __init__(self, root: str | Path, *, keep_acked: int = 256):
        self.root, self.keep_acked = Path(root), keep_acked
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._acked = self._read_acked()

    def put(self, update: Update, *, payload: bytes | memoryview | None = None) -> None:
        """Persist ``update`` (tensors first, then the JSON that marks it complete).

        ``payload``: the update's tensors already serialised as its frame's payload (``wire.frame_payload`` of
        ``encode(update)``, a safetensors blob of the same tensors), written as they are instead of serialising
        the tensors again.
        """
        name = _checked(update.update_id)
        blob = safetensors.numpy.save({n: t for n, t in update.tensors.items()}) if payload is None else payload
        atomic_write(self.root / f"{name}.safetensors", blob)
        fields = {k: v for k, v in _fields(update).items() if k != "tensors"}
        atomic_write(self.root / f"{name}.json", json.dumps(fields).encode())

    def pending(self) -> list[Update]:
        """Every complete pending update, oldest first; unreadable records are deleted (logged by caller)."""
        records = sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        out = []
        for path in records:
            if path.name == ACKED_FILE or not ID.fullmatch(path.stem):
                continue
            try:
                out.append(self._load(path.stem))
            except (OSError, ValueError, ProtocolError):
                self.discard(path.stem)
        return out

    def pending_ids(self) -> set[str]:
        return {p.stem for p in self.root.glob("*.json") if p.name != ACKED_FILE and ID.fullmatch(p.stem)}

    def acked(self, update_id: str) -> None:
        """The coordinator acknowledged ``update_id``: forget its record, remember the id."""
        self.discard(update_id)
        if update_id not in self._acked:
            self._acked = (self._acked + [update_id])[-self.keep_acked :]
            atomic_write(self.root / ACKED_FILE, json.dumps(self._acked).encode())

    def is_acked(self, update_id: str) -> bool:
        return update_id in self._acked

    def discard(self, update_id: str) -> None:
        """Delete a pending record (JSON first, so a crash never leaves a JSON without tensors)."""
        name = _checked(update_id)
        (self.root / f"{name}.json").unlink(missing_ok=True)
        (self.root / f"{name}.safetensors").unlink(missing_ok=True)

    def _load(self, update_id: str) -> Update:
        fields = json.loads((self.root / f"{update_id}.json").read_text())
        update = validate(Update, fields)  # same validation as a received Update
        tensors = safetensors.numpy.load_file(str(self.root / f"{update_id}.safetensors"))
        return dataclasses.replace(update, tensors=tensors)

    def _read_acked(self) -> list[str]:
        try:
            ids = json.loads((self.root / ACKED_FILE).read_text())
        except (OSError, ValueError):
            return []
        return [i for i in ids if isinstance(i, str)][-self.keep_acked :] if isinstance(ids, list) else []


def _fields(update: Update) -> dict[str, Any]:
    return {
        "update_id": update.update_id,
        "round_id": update.round_id,
        "num_examples": update.num_examples,
        "num_tokens": update.num_tokens,
        "metrics": dict(update.metrics),
        "routing": update.routing,
        "trained_experts": [list(t) for t in update.trained_experts],
    }


def _checked(update_id: str) -> str:
    if not ID.fullmatch(update_id):
        raise ProtocolError("bad_header", f"invalid update id {update_id!r}")
    return update_id
