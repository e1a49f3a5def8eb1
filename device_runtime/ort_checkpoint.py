"""Read a bundle's ORT training ``checkpoint`` without ORT training: every parameter's value, by name.

An inference-only onnxruntime cannot load a training checkpoint, yet a bundle's frozen weights (embeddings,
attention, norms) live only there. The file is a FlatBuffer of ORT's ``ort_training_checkpoint.fbs``
schema (``Checkpoint.module_state.{requires_grad_params, frozen_params}``, each an ``fbs.Tensor`` with
``name``, ``dims``, ``data_type``, ``raw_data``); both onnxruntime builds ship the generated Python
readers of that schema (``onnxruntime/tools/ort_format_model/ort_flatbuffers_py``) and depend on the
``flatbuffers`` package, so this module only walks them.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.errors import BundleError
from device_runtime.ort_api import import_onnxruntime

_FBS = "ort_flatbuffers_py.fbs"
_FLOAT, _FLOAT16 = 1, 10  # fbs.TensorDataType
_NUMPY = {_FLOAT: np.float32, _FLOAT16: np.float16}


def _schema() -> types.ModuleType:
    """ORT's generated ``fbs`` package (imported as ORT's own tools import it: top-level ``ort_flatbuffers_py``)."""
    ort_file = import_onnxruntime().__file__
    if ort_file is None:
        raise BundleError("this onnxruntime is not installed from files; reinstall onnxruntime")
    tools = Path(ort_file).parent / "tools" / "ort_format_model"
    if not (tools / "ort_flatbuffers_py").is_dir():
        raise BundleError(f"this onnxruntime lacks {tools / 'ort_flatbuffers_py'}; reinstall onnxruntime")
    if str(tools) not in sys.path:
        sys.path.append(str(tools))
    return importlib.import_module(_FBS + ".Checkpoint")


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Every parameter of an ORT training checkpoint as a read-only numpy array over the file's bytes.

    Returns:
        name -> array of the parameter's dims (float32 or float16), trainable and frozen alike.

    Raises:
        BundleError: not a checkpoint, external data, an unsupported dtype, or sizes that disagree.
    """
    data = Path(path).read_bytes()
    schema = _schema()
    try:
        root = schema.Checkpoint.GetRootAs(data, 0)
        state = root.ModuleState()
    except Exception as exc:  # flatbuffers raises struct.error / IndexError on garbage
        raise BundleError(f"{path} is not an ORT training checkpoint: {exc}") from exc
    if state is None:
        raise BundleError(f"{path} holds no module state; re-export the bundle")
    if state.HasExternalData():
        raise BundleError(f"{path} keeps its tensors in an external file, which bundles do not carry")
    params = {}
    for count, get in (
        (state.RequiresGradParamsLength(), state.RequiresGradParams),
        (state.FrozenParamsLength(), state.FrozenParams),
    ):
        for i in range(count):
            name, value = _tensor(get(i), path)
            params[name] = value
    return params


def _tensor(tensor: Any, path: str | Path) -> tuple[str, np.ndarray]:  # tensor: an (untyped) generated fbs.Tensor
    name = tensor.Name().decode()
    dtype = _NUMPY.get(tensor.DataType())
    if dtype is None:
        raise BundleError(f"{path}: tensor {name} has ORT data type {tensor.DataType()}, not float32/float16")
    dims = tuple(int(d) for d in tensor.DimsAsNumpy()) if tensor.DimsLength() else ()
    raw = tensor.RawDataAsNumpy() if tensor.RawDataLength() else np.zeros(0, np.uint8)
    if raw.size != int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize:
        raise BundleError(f"{path}: tensor {name} has {raw.size} bytes for dims {dims}")
    return name, raw.view(dtype).reshape(dims)
