"""Named float tensors <-> safetensors blobs, with the blob's header checked before anything is read.

The safetensors header of a received blob (tensor names, dtypes, shapes and byte offsets) is validated
here before any tensor data is read: names match :data:`~device_runtime.wire.fields.NAME`, dtypes
are F32 / F16 / I32, shapes are at most 8 non-negative integers, and the tensors tile the data exactly (no
overlap, no gap, nothing past the end). The blobs are safetensors' format, byte for byte what the
``safetensors`` package writes and reads (a test checks both ways); this module builds and parses them itself so
that a blob of 100s of MiB is copied once, not two or three times (issue 22: an update was copied ~8 times on
its way out of a device): :func:`safetensors_parts` gives the header and views of the arrays to hash and to write
or join, :func:`bytes_to_tensors` copies each tensor once out of the received frame.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np

from device_runtime.errors import ProtocolError
from device_runtime.wire.fields import MAX_HEADER_BYTES, NAME

MAX_TENSORS = 100_000
WIRE_DTYPES = {"float32": "F32", "float16": "F16", "int32": "I32"}  # int32: split mode's masks and labels
_ITEMSIZE = {"F32": 4, "F16": 2, "I32": 4}


# safetensors' file order: its Dtype enum descending (F32 > I32 > F16 for the wire dtypes), then the name
_FILE_ORDER = {"F32": 0, "I32": 1, "F16": 2}
_NUMPY: dict[str, np.dtype[Any]] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I32": np.dtype("<i4")}


def safetensors_parts(tensors: Mapping[str, np.ndarray], *, wire_dtype: str | None = None) -> list[memoryview]:
    """A safetensors blob of named tensors as a list of buffers: the header (length and JSON), then each tensor's
    bytes, **views of the arrays** (no copy of a C-contiguous array). Joined, they are byte for byte what
    ``safetensors.numpy.save`` writes (same order, header and padding); written or hashed part by part, a blob of
    100s of MiB is never copied whole. Arguments and errors as :func:`tensors_to_bytes`."""
    arrays = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ProtocolError("bad_tensor", f"invalid tensor name {name!r}")
        if array.dtype.name not in WIRE_DTYPES:
            raise ProtocolError("bad_tensor", f"tensor {name}: dtype {array.dtype} is not float32/float16/int32")
        if wire_dtype is not None:
            with np.errstate(over="ignore"):
                cast = array.astype(wire_dtype)
            if not np.array_equal(np.isfinite(cast), np.isfinite(array)):
                raise ProtocolError("bad_tensor", f"tensor {name} overflows {wire_dtype}; send float32")
            array = cast
        arrays[name] = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
    order = sorted(arrays, key=lambda n: (_FILE_ORDER[WIRE_DTYPES[arrays[n].dtype.name]], n))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        array = arrays[name]
        code = WIRE_DTYPES[array.dtype.name]
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    head = memoryview(struct.pack("<Q", len(raw)) + raw)
    return [head, *(arrays[n].reshape(-1).view(np.uint8).data for n in order)]


def tensors_to_bytes(tensors: Mapping[str, np.ndarray], *, wire_dtype: str | None = None) -> bytes:
    """Serialise named float tensors to a safetensors blob (:func:`safetensors_parts`, joined: one copy).

    Args:
        tensors: name -> float32 or float16 array (any shape).
        wire_dtype: ``"float16"`` or ``"float32"`` to cast every tensor for the wire; None keeps dtypes.

    Raises:
        ProtocolError("bad_tensor"): a name is invalid, a dtype is not float32/float16/int32, or a value
            overflows float16 (|x| > 65504) when casting.
    """
    return b"".join(safetensors_parts(tensors, wire_dtype=wire_dtype))


def bytes_to_tensors(
    data: bytes | bytearray | memoryview,
    *,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    copy: bool = True,
) -> dict[str, np.ndarray]:
    """Parse a safetensors blob after validating its header.

    Args:
        data: the blob, or a view of it in a frame (its size is bounded by the caller, e.g. by ``decode``'s
            ``max_size``).
        expected: if given, the exact name -> shape map the blob must hold.
        copy: each tensor its own copy (True); False: views of ``data`` (writable only if ``data`` is, e.g. a
            bytearray; they keep it alive).

    Returns:
        name -> array, float32, float16 or int32 as sent (see :func:`to_float32`).

    Raises:
        ProtocolError("bad_tensor"): malformed header, bad name / dtype / shape / offsets, or a
            name set or shape differing from ``expected``.
    """
    entries, spans, start = _safetensors_layout(data)
    if expected is not None:
        _check_expected(entries, expected)
    out = {}
    for name, (dtype, shape) in entries.items():
        begin, end = spans[name]
        count = (end - begin) // _ITEMSIZE[dtype]
        flat = np.frombuffer(data, dtype=_NUMPY[dtype], count=count, offset=start + begin).reshape(shape)
        out[name] = flat.astype(_NUMPY[dtype].newbyteorder("="), copy=True) if copy else flat
    return out


def to_float32(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Upcast every tensor to float32 (float16 on the wire is only a transport format)."""
    return {name: np.asarray(a, dtype=np.float32) for name, a in tensors.items()}


def _safetensors_header(data: bytes | bytearray | memoryview) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a safetensors header; returns name -> (dtype code, shape)."""
    return _safetensors_layout(data)[0]


def _safetensors_layout(
    data: bytes | bytearray | memoryview,
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, tuple[int, int]], int]:
    """Validate a safetensors header; returns name -> (dtype code, shape), name -> (begin, end) byte offsets in the
    data section, and where the data section starts in ``data``."""
    if len(data) < 8:
        raise ProtocolError("bad_tensor", "safetensors payload shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise ProtocolError("bad_tensor", f"safetensors header length {size} exceeds the payload")
    try:
        header = msgspec.json.decode(data[8 : 8 + size])
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError("bad_tensor", f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or len(header) > MAX_TENSORS:
        raise ProtocolError("bad_tensor", f"safetensors header must be an object of at most {MAX_TENSORS} tensors")
    header.pop("__metadata__", None)
    data_len, spans, entries = len(data) - 8 - size, {}, {}
    for name, info in header.items():
        dtype, shape, span = _safetensors_entry(name, info)
        spans[name] = span
        entries[name] = (dtype, shape)
    covered = 0
    for begin, end in sorted(spans.values()):
        if begin != covered:
            raise ProtocolError("bad_tensor", "safetensors tensors overlap or leave gaps")
        covered = end
    if covered != data_len:
        raise ProtocolError("bad_tensor", f"safetensors data is {data_len} bytes, tensors cover {covered}")
    return entries, spans, 8 + size


def _safetensors_entry(name: str, info: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not NAME.fullmatch(name):
        raise ProtocolError("bad_tensor", f"invalid tensor name {name[:60]!r}")
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if not all(_is_int(d) and d >= 0 for d in [*shape, begin, end]) or len(shape) > 8:
            raise ValueError("shape and offsets must be at most 8 non-negative integers")
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError("bad_tensor", f"tensor {name}: malformed entry ({exc})") from exc
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise ProtocolError("bad_tensor", f"tensor {name}: dtype {dtype!r} is not F32/F16/I32"[:200])
    if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
        raise ProtocolError("bad_tensor", f"tensor {name}: offsets {begin}..{end} do not fit shape {shape}")
    return dtype, tuple(shape), (begin, end)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_expected(
    entries: Mapping[str, tuple[str, tuple[int, ...]]], expected: Mapping[str, tuple[int, ...]]
) -> None:
    missing, extra = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or extra:
        raise ProtocolError("bad_tensor", f"tensor set differs: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if entries[name][1] != tuple(shape):
            raise ProtocolError("bad_tensor", f"tensor {name}: shape {entries[name][1]} != expected {tuple(shape)}")
