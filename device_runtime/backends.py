"""The device's training backends, and which one it trains with.

============  =============  ==============================================  ===================================
name          order          needs (pip extra)                               trainer
============  =============  ==============================================  ===================================
ort-training  first-order    onnxruntime-training-cpu: x86-64 Linux,         ``ort_trainer.OrtTrainer``: training
                             Windows, macOS only (``fedmoe[device]``)        graph, backward, AdamW
zo            zeroth-order   any onnxruntime, inference builds included      ``zo_trainer.ZoTrainer``: MeZO / SPSA,
                             (aarch64, Android; ``fedmoe[device-lite]``)     two forwards of eval_model.onnx
split         hybrid-order   any onnxruntime (``fedmoe[device-lite]``)       ``split_trainer.SplitTrainer``: HO-SFL,
                                                                             bottom forward-only, top on the
                                                                             coordinator (split bundles only)
============  =============  ==============================================  ===================================

Choice (:func:`select_backend`): the name asked for (``--backend`` of ``fedmoe-device run`` / ``train-local``,
else ``$FEDMOE_DEVICE_BACKEND``), else the first available in the table's order (``split`` only when asked for:
the coordinator then assigns the device split mode) (first-order learns more per
example when it can run). The device's profile lists what is available and which one it chose.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device_runtime.bundle import Bundle
from device_runtime.errors import ConfigError
from device_runtime.modes import ORT_TRAINING_BACKEND, SPLIT_BACKEND, ZO_BACKEND, Order
from device_runtime.trainer import Trainer

ENV_BACKEND = "FEDMOE_DEVICE_BACKEND"


@dataclass(frozen=True)
class Backend:
    """A training backend: its name, order, what installs it, its trainer class and an availability probe."""

    name: str
    order: Order
    install: str
    trainer: str  # "module:Class", imported only when used
    probe: Callable[[], bool]

    def is_available(self) -> bool:
        return self.probe()

    def trainer_class(self) -> type[Trainer]:
        module, name = self.trainer.split(":")
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Trainer)):
            raise ConfigError(f"backend {self.name}: {self.trainer} is not a Trainer class")
        return cls


def _ort_training() -> bool:
    from device_runtime.ort_api import is_available

    return is_available()


def _ort_inference() -> bool:
    from device_runtime.ort_api import inference_available

    return inference_available()


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            ORT_TRAINING_BACKEND,
            Order.FIRST,
            "pip install 'fedmoe[device]' (x86-64)",
            "device_runtime.ort_trainer:OrtTrainer",
            _ort_training,
        ),
        Backend(
            ZO_BACKEND,
            Order.ZEROTH,
            "pip install 'fedmoe[device-lite]'",
            "device_runtime.zo_trainer:ZoTrainer",
            _ort_inference,
        ),
        Backend(
            SPLIT_BACKEND,
            Order.HYBRID,
            "pip install 'fedmoe[device-lite]'",
            "device_runtime.split_trainer:SplitTrainer",
            _ort_inference,
        ),
    )
}


def available_backends() -> tuple[str, ...]:
    """Names of the backends that can run in this process, in preference order (never imports torch)."""
    return tuple(name for name, backend in BACKENDS.items() if backend.is_available())


def select_backend(name: str | None = None) -> Backend:
    """The backend to train with: ``name``, else ``$FEDMOE_DEVICE_BACKEND``, else the first available.

    Raises:
        ConfigError: an unknown name, a backend not installed here, or no backend at all.
    """
    name = name or os.environ.get(ENV_BACKEND) or None
    if name is not None:
        backend = BACKENDS.get(name)
        if backend is None:
            raise ConfigError(f"unknown training backend {name!r}; choose one of {sorted(BACKENDS)}")
        if not backend.is_available():
            raise ConfigError(
                f"training backend {name!r} is not installed here ({backend.install}); available: "
                f"{list(available_backends()) or 'none'}"
            )
        return backend
    for backend in BACKENDS.values():
        if backend.name != SPLIT_BACKEND and backend.is_available():
            return backend
    raise ConfigError(
        "no training backend is installed: pip install 'fedmoe[device-lite]' (any platform, "
        "zeroth-order) or 'fedmoe[device]' (x86-64, ORT training)"
    )


def create_trainer(
    bundle: Bundle,
    *,
    backend: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    zeroth_order: dict[str, Any] | None = None,
) -> Trainer:
    """A fresh trainer of the selected backend on ``bundle``.

    Args:
        zeroth_order: keyword arguments only a zeroth-order trainer takes (``ZoTrainer``: ``seed``,
            ``candidates``, ``eps``, ``distribution``); a first-order backend ignores them.

    Raises:
        ConfigError: see :func:`select_backend`. BundleError: the backend cannot load the bundle.
    """
    chosen = select_backend(backend)
    extra = (zeroth_order or {}) if chosen.order == Order.ZEROTH else {}
    return chosen.trainer_class()(bundle, threads=threads, progress=progress, **extra)
