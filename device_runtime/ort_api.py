"""Import ONNX Runtime's on-device training API without torch (``docs/stack.md``).

``onnxruntime/training/__init__.py`` imports ``amp``, ``artifacts`` and ``optim``, which import torch (and
fail without it); worse, a plain ``import onnxruntime`` probes ``onnxruntime.training.ortmodule``, which
imports torch whenever torch is installed. The ``api`` modules themselves need only numpy and the native
module. So, before ORT is first imported, this module registers a bare ``onnxruntime.training`` package
object (pointing at the real directory, so ``.api`` is found) and hides ``ortmodule`` while
``onnxruntime`` initialises. The result works with and without torch installed and never loads torch.

Exposes ``CheckpointState``, ``Module`` and ``Optimizer`` lazily: ``from device_runtime.ort_api import
Module`` loads ORT on first use; importing this module alone costs nothing. :func:`import_onnxruntime`
imports either build (plain ``onnxruntime`` or ``onnxruntime-training-cpu``) for inference the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from device_runtime.errors import ConfigError

__all__ = [
    "CheckpointState",
    "Module",
    "Optimizer",
    "import_onnxruntime",
    "inference_available",
    "is_available",
    "load_api",
]

_TRAINING = "onnxruntime.training"
_ORTMODULE = "onnxruntime.training.ortmodule"


def _register_bare_training_package() -> None:
    """Put an empty ``onnxruntime.training`` package (real ``__path__``) in ``sys.modules``.

    Raises:
        ConfigError: onnxruntime is not installed, or it has no ``training`` directory.
    """
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise ConfigError("onnxruntime is not installed; install `onnxruntime-training-cpu==1.19.2`")
    training_dir = Path(spec.origin).parent / "training"
    if not (training_dir / "api").is_dir():
        raise ConfigError(
            "this onnxruntime has no training API (plain `onnxruntime` is installed?); uninstall it and install "
            "`onnxruntime-training-cpu==1.19.2` (never both)"
        )
    package = types.ModuleType(_TRAINING)
    package.__path__ = [str(training_dir)]
    package.__package__ = _TRAINING
    package.__file__ = None
    sys.modules[_TRAINING] = package


def _import_onnxruntime_without_ortmodule() -> types.ModuleType:
    """Import ``onnxruntime`` while ``ortmodule`` is hidden, so its validation does not import torch."""
    hidden = _ORTMODULE not in sys.modules
    if hidden:
        # None makes the probe raise ImportError, which ORT catches (a documented use of sys.modules)
        sys.modules[_ORTMODULE] = None  # type: ignore[assignment]  # typeshed types sys.modules values as modules only
    try:
        return importlib.import_module("onnxruntime")
    finally:
        if hidden:
            sys.modules.pop(_ORTMODULE, None)


def import_onnxruntime() -> types.ModuleType:
    """Return ``onnxruntime`` (plain or training build) without ever importing torch.

    Raises:
        ConfigError: no onnxruntime is installed, or its native module fails to load.
    """
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "onnxruntime is not installed; `pip install 'fedmoe[device-lite]'` (any platform) or "
            "'fedmoe[device]' (x86-64, with ORT training)"
        )
    if _TRAINING not in sys.modules and (Path(spec.origin).parent / "training" / "api").is_dir():
        _register_bare_training_package()
    try:
        return _import_onnxruntime_without_ortmodule()
    except ImportError as exc:
        raise ConfigError(f"cannot import onnxruntime: {exc}; reinstall it") from exc


def inference_available() -> bool:
    """Whether some onnxruntime build with an ``InferenceSession`` imports here (never raises)."""
    try:
        return hasattr(import_onnxruntime(), "InferenceSession")
    except ConfigError:
        return False


def load_api() -> types.ModuleType:
    """Return ``onnxruntime.training.api``, importing it without torch on first call.

    If ``onnxruntime.training`` was already imported the normal way (e.g. by export code in the same
    process), that package is reused.

    Raises:
        ConfigError: onnxruntime-training is not installed or its native module fails to load.
    """
    if _TRAINING not in sys.modules:
        _register_bare_training_package()
    try:
        ort = _import_onnxruntime_without_ortmodule()
        api = importlib.import_module(_TRAINING + ".api")
    except ImportError as exc:
        raise ConfigError(
            f"cannot import the ONNX Runtime training API: {exc}; install "
            "`onnxruntime-training-cpu==1.19.2` (x86_64 Linux, Windows or macOS)"
        ) from exc
    if not hasattr(ort, "training"):
        vars(ort)["training"] = sys.modules[_TRAINING]  # the attribute a normal import of the package sets
    return api


def is_available() -> bool:
    """Whether the ORT training API can be imported here (never raises)."""
    try:
        load_api()
    except ConfigError:
        return False
    return True


def __getattr__(name: str) -> Any:  # ORT's training classes: onnxruntime ships no type information
    if name in ("CheckpointState", "Module", "Optimizer"):
        return getattr(load_api(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
