"""The device's trainer, kept from one round to the next while its bundle stays the same.

Building a trainer costs a round 3-4 s on the default 8-layer bundles (ORT training: the checkpoint, the
training and eval graphs, the optimizer; measured under load, ``docs/algorithms.md``), and a rebuild under a
tight ``RLIMIT_DATA`` can fail where the first build fit: a 1.5 GiB Pi of the LoRA simulation lost round 5 to a
failed arena allocation in its fifth session build. A device that trains the same bundle again only loads the
round's tensors into the trainer it has.

A kept trainer stays resident while the round's update is stored, serialised and sent. Under a memory limit
it is kept only if the data segment (``VmData``, what ``RLIMIT_DATA`` limits) plus ``WIRE_COPIES`` copies of
the update fits. The copies are the numpy tensors, the safetensors bytes, the websocket frame, and asyncio's
TLS and socket buffers, each over-allocated as it grows. With full experts trainable, a 3 GiB phone's 243 MB
update did not fit next to its session at 4 copies (MemoryError in the TLS write buffer). So in the default
mix only the laptop keeps its trainer, while LoRA and zeroth-order updates (a few MB) leave every device
room to keep one.

What carries over: first-order, AdamW's moments and step count (ORT's training API cannot reset them short of
a rebuild; the effect on accuracy is measured in ``docs/algorithms.md``, "Optimizer state across rounds");
zeroth-order, nothing (:meth:`Trainer.start_round` draws the round's seeds).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from device_runtime.bundle import Bundle
from device_runtime.memory import release_memory, status_kib
from device_runtime.trainer import Trainer
from device_runtime.units import MIB

log = logging.getLogger("fedmoe.device")
WIRE_COPIES = 8  # of the update while it is sent (module docstring); 4 was measured too few


class TrainerCache:
    """At most one trainer, for the bundle it was built on.

    Args:
        reuse: keep the trainer for the next round (False: a fresh trainer every round, fresh AdamW moments).
        memory_limit_bytes: the device's memory budget (bytes; None: no limit), see :meth:`done`.
    """

    def __init__(self, *, reuse: bool = True, memory_limit_bytes: int | None = None):
        self.reuse, self.memory_limit_bytes = reuse, memory_limit_bytes
        self.builds = 0  # trainers built so far
        self._key: tuple[Path, tuple[tuple[str, str], ...], str | None, int | None] | None = None
        self._trainer: Trainer | None = None

    def trainer(
        self, bundle: Bundle, *, backend: str | None, threads: int | None, zeroth_order: dict[str, Any]
    ) -> Trainer:
        """The trainer for this round on ``bundle``: the kept one if it was built on the same bundle files with
        the same backend and threads, else a new one (the old one is dropped first, so both never coexist).

        Raises:
            ConfigError / BundleError: as ``backends.create_trainer``.
        """
        from device_runtime.backends import create_trainer

        key = (bundle.root, tuple(sorted(bundle.manifest.files.items())), backend, threads)
        if self._trainer is not None and self.reuse and key == self._key:
            self._trainer.start_round(zeroth_order)
            return self._trainer
        self.clear()
        self._trainer = create_trainer(bundle, backend=backend, threads=threads, zeroth_order=zeroth_order)
        self._key, self.builds = key, self.builds + 1
        return self._trainer

    def done(self, *, failed: bool = False, upload_bytes: int = 0) -> None:
        """The round's fit is over: keep the trainer, or drop it before the update (``upload_bytes``) is sent.

        Dropped: after a failed round, with ``reuse`` off, or when the data segment plus ``WIRE_COPIES`` copies
        of the update would exceed ``memory_limit_bytes``.
        """
        if failed or not self.reuse:
            self.clear()
            return
        data_kib = status_kib("VmData")
        if self.memory_limit_bytes is None or data_kib is None:
            return
        needed = data_kib * 1024 + WIRE_COPIES * upload_bytes
        if needed > self.memory_limit_bytes:
            log.info(
                "not keeping the trainer: data segment %.0f MiB + %d x %.0f MiB update > budget %.0f MiB",
                data_kib / 1024,
                WIRE_COPIES,
                upload_bytes / MIB,
                self.memory_limit_bytes / MIB,
            )
            self.clear()

    def clear(self) -> None:
        """Drop the trainer and hand its memory back to the OS."""
        if self._trainer is not None:
            self._trainer = self._key = None
            release_memory()
