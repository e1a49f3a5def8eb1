"""The fedmoe wire protocol, version 1: message types and their binary framing, free of I/O.

Shared by the device runtime and the coordinator. Every protocol message travels as ONE websocket binary
message (frame) laid out as::

    +----------------+---------------------------+-----------------------------+
    | 4 bytes        | header_len bytes          | payload_size bytes          |
    | header_len     | UTF-8 JSON header         | optional payload            |
    | (big-endian)   | {"v": 1, "type": ..., ...} | safetensors blob or raw     |
    +----------------+---------------------------+-----------------------------+

The header holds the message's fields and, when the type carries a payload,
``"payload": {"size": <bytes>, "sha256": <hex>}``. Tensor payloads (``Assignment``, ``Update``,
``Evaluate``) are safetensors blobs (never pickle) of float32 or float16 tensors; the ``BundleData``
payload is one chunk of one bundle file. Bytes fields (nonce, public key, signature) are base64 in JSON.

:func:`decode` checks everything received before use: frame and header lengths, the JSON schema of the
type (unknown or missing fields are errors), the payload size and sha256, and for tensors every name
(``[A-Za-z0-9_.-]``), dtype (float32 / float16), shape and byte offset, optionally against an expected
name -> shape map. Each failure raises :class:`~device_runtime.errors.ProtocolError` with one of the
stable :data:`ERROR_CODES`, which a peer can send back in an :class:`Error` message.

Conversation (the server and the client own the I/O and the ordering)::

    enrol:   device -> Enrol(token, name, profile, public_key)      coordinator -> EnrolOk(device_id)
    connect: device -> Hello(device_id, protocol_version, profile)  coordinator -> Challenge(nonce)
             device -> Auth(device_id, signature)                   coordinator -> AuthOk() | Error
    round:   coordinator -> Assignment(...)   [device -> BundleRequest  coordinator -> BundleData...]
             device -> Update(...)             coordinator -> Ack(update_id, accepted, reason)
    eval:    coordinator -> Evaluate(...)      device -> EvaluateRes(...)
    any time: Heartbeat(), Error(code, message)
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import safetensors.numpy

from device_runtime.bundle import ShapeKey
from device_runtime.errors import BundleError, ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # JSON header bound (bytes); weights travel in the payload
MAX_TENSORS = 100_000
WIRE_DTYPES = {"float32": "F32", "float16": "F16"}
ERROR_CODES = (
    "bad_frame",  # frame shorter than its declared lengths, or a payload where none belongs
    "too_large",  # frame beyond max_size, or header beyond MAX_HEADER_BYTES
    "bad_header",  # header is not UTF-8 JSON, or a field is missing, unknown or out of range
    "unknown_type",  # "type" names no message of this protocol version
    "version",  # "v" is not PROTOCOL_VERSION
    "bad_payload",  # payload size or sha256 differs from the header
    "bad_tensor",  # tensor name, dtype, shape or offsets invalid, or not the expected set
    "unexpected",  # a valid message that is not allowed at this point of the conversation
    "auth",  # enrolment or authentication failed (sent in Error messages)
    "internal",  # the peer failed while handling a valid message
)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")  # ids never start with "." (safe as file names)
_PATH = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ITEMSIZE = {"F32": 4, "F16": 2}
_LEN = struct.Struct(">I")


# ---------------------------------------------------------------- tensors <-> safetensors bytes


def tensors_to_bytes(tensors: Mapping[str, np.ndarray], *, wire_dtype: str | None = None) -> bytes:
    """Serialise named float tensors to a safetensors blob.

    Args:
        tensors: name -> float32 or float16 array (any shape).
        wire_dtype: ``"float16"`` or ``"float32"`` to cast every tensor for the wire; None keeps dtypes.

    Raises:
        ProtocolError("bad_tensor"): a name is invalid, a dtype is not float32/float16, or a value
            overflows float16 (|x| > 65504) when casting.
    """
    out = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ProtocolError("bad_tensor", f"invalid tensor name {name!r}")
        if array.dtype.name not in WIRE_DTYPES:
            raise ProtocolError("bad_tensor", f"tensor {name}: dtype {array.dtype} is not float32/float16")
        if wire_dtype is not None:
            with np.errstate(over="ignore"):
                cast = array.astype(wire_dtype)
            if not np.array_equal(np.isfinite(cast), np.isfinite(array)):
                raise ProtocolError("bad_tensor", f"tensor {name} overflows {wire_dtype}; send float32")
            array = cast
        out[name] = np.ascontiguousarray(array)
    return safetensors.numpy.save(out)


def bytes_to_tensors(
    data: bytes, *, expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Parse a safetensors blob after validating its header.

    Args:
        data: the blob (its size is bounded by the caller, e.g. by ``decode``'s ``max_size``).
        expected: if given, the exact name -> shape map the blob must hold.

    Returns:
        name -> array, float32 or float16 as sent (see :func:`to_float32`).

    Raises:
        ProtocolError("bad_tensor"): malformed header, bad name / dtype / shape / offsets, or a
            name set or shape differing from ``expected``.
    """
    entries = _safetensors_header(data)
    if expected is not None:
        _check_expected(entries, expected)
    try:
        return safetensors.numpy.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError / ValueError types
        raise ProtocolError("bad_tensor", f"unreadable safetensors payload: {exc}") from exc


def to_float32(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Upcast every tensor to float32 (float16 on the wire is only a transport format)."""
    return {name: np.asarray(a, dtype=np.float32) for name, a in tensors.items()}


def _safetensors_header(data: bytes) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a safetensors header; returns name -> (dtype code, shape)."""
    if len(data) < 8:
        raise ProtocolError("bad_tensor", "safetensors payload shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise ProtocolError("bad_tensor", f"safetensors header length {size} exceeds the payload")
    try:
        header = _loads(data[8 : 8 + size])
    except ValueError as exc:
        raise ProtocolError("bad_tensor", f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or len(header) > MAX_TENSORS:
        raise ProtocolError("bad_tensor", "safetensors header must be an object of at most "
                                          f"{MAX_TENSORS} tensors")
    header.pop("__metadata__", None)
    data_len, spans, entries = len(data) - 8 - size, [], {}
    for name, info in header.items():
        dtype, shape, span = _safetensors_entry(name, info)
        spans.append(span)
        entries[name] = (dtype, shape)
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise ProtocolError("bad_tensor", "safetensors tensors overlap or leave gaps")
        covered = end
    if covered != data_len:
        raise ProtocolError("bad_tensor", f"safetensors data is {data_len} bytes, tensors cover {covered}")
    return entries


def _safetensors_entry(name: str, info: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not _NAME.match(name):
        raise ProtocolError("bad_tensor", f"invalid tensor name {name[:60]!r}")
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if not all(_is_int(d) and d >= 0 for d in [*shape, begin, end]) or len(shape) > 8:
            raise ValueError("shape and offsets must be at most 8 non-negative integers")
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError("bad_tensor", f"tensor {name}: malformed entry ({exc})") from exc
    if dtype not in _ITEMSIZE:
        raise ProtocolError("bad_tensor", f"tensor {name}: dtype {dtype!r} is not F32/F16")
    if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
        raise ProtocolError("bad_tensor", f"tensor {name}: offsets {begin}..{end} do not fit shape {shape}")
    return dtype, tuple(shape), (begin, end)


def _check_expected(entries: dict, expected: Mapping[str, tuple[int, ...]]) -> None:
    missing, extra = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or extra:
        raise ProtocolError("bad_tensor", f"tensor set differs: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if entries[name][1] != tuple(shape):
            raise ProtocolError("bad_tensor", f"tensor {name}: shape {entries[name][1]} != expected {tuple(shape)}")


# ---------------------------------------------------------------- field checkers (JSON -> value)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(lo: int = 0, hi: int = 2**63 - 1) -> Callable[[Any], int]:
    def check(x):
        if not _is_int(x) or not lo <= x <= hi:
            raise ValueError(f"expected an integer in [{lo}, {hi}], got {x!r}"[:200])
        return x

    return check


def _float(lo: float = -math.inf) -> Callable[[Any], float]:
    def check(x):
        if not (_is_int(x) or isinstance(x, float)) or not math.isfinite(x) or x < lo:
            raise ValueError(f"expected a finite number >= {lo}, got {x!r}"[:200])
        return float(x)

    return check


def _bool(x: Any) -> bool:
    if not isinstance(x, bool):
        raise ValueError(f"expected a boolean, got {x!r}"[:200])
    return x


def _str(pattern: re.Pattern | None = None, max_len: int = 200) -> Callable[[Any], str]:
    def check(x):
        if not isinstance(x, str) or len(x) > max_len or (pattern is not None and not pattern.match(x)):
            raise ValueError(f"invalid string {x!r}"[:200])
        return x

    return check


def _b64(nbytes: int) -> Callable[[Any], bytes]:
    def check(x):
        try:
            raw = base64.b64decode(_str(max_len=4 * nbytes)(x), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"invalid base64: {exc}") from exc
        if len(raw) != nbytes:
            raise ValueError(f"expected {nbytes} bytes, got {len(raw)}")
        return raw

    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda x: None if x is None else check(x)


def _json(max_depth: int = 4, max_items: int = 65_536) -> Callable[[Any], Any]:
    """Free-form JSON (profiles, routing statistics): bounded depth and size, finite numbers only."""

    def check(x, depth=0):
        if depth > max_depth:
            raise ValueError(f"JSON nested deeper than {max_depth}")
        if isinstance(x, dict):
            if len(x) > max_items or not all(isinstance(k, str) and len(k) <= 200 for k in x):
                raise ValueError("object too large or with a bad key")
            return {k: check(v, depth + 1) for k, v in x.items()}
        if isinstance(x, list):
            if len(x) > max_items:
                raise ValueError(f"list longer than {max_items}")
            return [check(v, depth + 1) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError("non-finite number")
        if isinstance(x, str) and len(x) > 10_000:
            raise ValueError("string too long")
        return x

    return check


def _dict_of(value: Callable[[Any], Any], max_items: int = 1024) -> Callable[[Any], dict]:
    def check(x):
        if not isinstance(x, dict) or len(x) > max_items:
            raise ValueError(f"expected an object of at most {max_items} entries")
        return {_str(_NAME)(k): value(v) for k, v in x.items()}

    return check


def _tuples(item: Callable[[Any], Any], max_len: int = 4096, depth: int = 1) -> Callable[[Any], tuple]:
    """A list (of lists when ``depth`` is 2) -> tuple (of tuples)."""

    def check(x, level=depth):
        if not isinstance(x, list) or len(x) > max_len:
            raise ValueError(f"expected a list of at most {max_len} items")
        return tuple(check(v, level - 1) if level > 1 else item(v) for v in x)

    return check


def _nested(cls: type) -> Callable[[Any], Any]:
    def check(x):
        if not isinstance(x, dict):
            raise ValueError(f"{cls.__name__} must be an object")
        return cls.from_dict(x)

    return check


def spec(check: Callable[[Any], Any], **kwargs) -> Any:
    """A dataclass field whose JSON value ``decode`` validates with ``check``."""
    return field(metadata={"check": check}, **kwargs)


_EXPERT_IDS = _tuples(_int(0, 1 << 20), depth=2)
_SHA = _str(_SHA256, 64)


# ---------------------------------------------------------------- nested records


@dataclass(frozen=True)
class FitConfig:
    """Local training settings of one round (overrides the bundle's ``TrainingDefaults``).

    Attributes:
        batch_size: sequences per step. seq_len: tokens per sequence.
        learning_rate: AdamW learning rate. local_steps: optimizer steps (0: one epoch of local data).
        aux_loss_coef: load-balancing loss coefficient.
        prox_mu: FedProx proximal coefficient mu (Li et al. 2020, loss + mu/2 * ||w - w_global||^2); 0 = off.
        routing_prior: FedAlign-MoE global routing distribution p_global, per MoE layer a probability
            over all ``num_experts`` global experts, or None.
        routing_reg_coef: lambda_r of FedAlign-MoE's KL(p_local || p_global) regulariser; 0 = off.
        seed: local shuffling / dropout seed.
        update_dtype: ``"float32"`` or ``"float16"``: the dtype the device sends its update in.
    """

    batch_size: int = spec(_int(1, 1 << 16), default=8)
    seq_len: int = spec(_int(1, 1 << 20), default=128)
    learning_rate: float = spec(_float(0.0), default=1e-4)
    local_steps: int = spec(_int(0, 1 << 30), default=0)
    aux_loss_coef: float = spec(_float(0.0), default=0.01)
    prox_mu: float = spec(_float(0.0), default=0.0)
    routing_prior: tuple[tuple[float, ...], ...] | None = spec(
        _optional(_tuples(_float(0.0), depth=2)), default=None)
    routing_reg_coef: float = spec(_float(0.0), default=0.0)
    seed: int = spec(_int(0, 2**32 - 1), default=0)
    update_dtype: str = spec(_str(re.compile(r"^float(32|16)$")), default="float32")

    @classmethod
    def from_dict(cls, data: dict) -> "FitConfig":
        return cls(**_check_fields(cls, data))


# ---------------------------------------------------------------- messages


_REGISTRY: dict[str, type] = {}


def _message(cls: type) -> type:
    """Class decorator: a frozen dataclass registered under its ``TYPE`` name."""
    cls = dataclass(frozen=True)(cls)
    _REGISTRY[cls.TYPE] = cls
    return cls


class Message:
    """Base of every protocol message. ``TYPE`` is its wire name; ``PAYLOAD`` is None, ``"tensors"``
    (field ``tensors``: name -> array) or ``"bytes"`` (field ``data``)."""

    TYPE: ClassVar[str] = ""
    PAYLOAD: ClassVar[str | None] = None


@_message
class Enrol(Message):
    """Device -> coordinator, once: redeem a single-use enrolment token, register the device's Ed25519
    public key (raw 32 bytes; the private key never leaves the device, see ``device_runtime.auth``)."""

    TYPE: ClassVar[str] = "enrol"
    token: str = spec(_str(max_len=200))
    name: str = spec(_str(_ID))
    profile: dict = spec(_json())
    public_key: bytes = spec(_b64(32))


@_message
class EnrolOk(Message):
    """Coordinator -> device: the id under which the device is now registered."""

    TYPE: ClassVar[str] = "enrol_ok"
    device_id: str = spec(_str(_ID))


@_message
class Hello(Message):
    """Device -> coordinator: first message of every authenticated connection."""

    TYPE: ClassVar[str] = "hello"
    device_id: str = spec(_str(_ID))
    protocol_version: int = spec(_int(0, 1 << 16))
    profile: dict = spec(_json())


@_message
class Challenge(Message):
    """Coordinator -> device: a fresh single-use 32-byte nonce to sign."""

    TYPE: ClassVar[str] = "challenge"
    nonce: bytes = spec(_b64(32))


@_message
class Auth(Message):
    """Device -> coordinator: Ed25519 signature (64 bytes) of ``auth.challenge_message(nonce, device_id)``."""

    TYPE: ClassVar[str] = "auth"
    device_id: str = spec(_str(_ID))
    signature: bytes = spec(_b64(64))


@_message
class AuthOk(Message):
    """Coordinator -> device: authenticated; the device now waits for work."""

    TYPE: ClassVar[str] = "auth_ok"


@_message
class Assignment(Message):
    """Coordinator -> device: train this expert subset for one round.

    Attributes:
        round_id: the round. update_id: id the device must put on its ``Update`` (retries reuse it;
            the coordinator records each update_id once). model_version: global model version of the weights.
        shape_key: the graph to train (fetch with ``BundleRequest(shape_key.id)`` if not cached).
        expert_ids: per MoE layer, local expert index -> global expert id.
        config: local training settings.
        tensors: the weights of the kept experts and router rows, name -> array (bundle tensor names).
    """

    TYPE: ClassVar[str] = "assignment"
    PAYLOAD: ClassVar[str] = "tensors"
    round_id: int = spec(_int())
    update_id: str = spec(_str(_ID))
    model_version: int = spec(_int())
    shape_key: ShapeKey = spec(_nested(ShapeKey))
    expert_ids: tuple[tuple[int, ...], ...] = spec(_EXPERT_IDS)
    config: FitConfig = spec(_nested(FitConfig))
    tensors: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        counts = tuple(len(ids) for ids in self.expert_ids)
        if counts != self.shape_key.experts_per_layer:
            raise ProtocolError("bad_header", f"expert_ids {counts} disagree with shape key {self.shape_key.id}")


@_message
class BundleRequest(Message):
    """Device -> coordinator: send the graph files of this ``ShapeKey.id``."""

    TYPE: ClassVar[str] = "bundle_request"
    shape_key_id: str = spec(_str(_ID))


@_message
class BundleData(Message):
    """Coordinator -> device: one chunk of one bundle file (see :func:`bundle_chunks`, :class:`BundleAssembler`).

    Attributes:
        shape_key_id: the bundle's shape key. name: relative file path inside the bundle.
        offset: byte offset of this chunk in the file. total_size: file size (bytes).
        sha256: hex sha256 of the whole file. more: False on the bundle's very last chunk.
        data: the chunk (payload).
    """

    TYPE: ClassVar[str] = "bundle_data"
    PAYLOAD: ClassVar[str] = "bytes"
    shape_key_id: str = spec(_str(_ID))
    name: str = spec(_str(_PATH, 300))
    offset: int = spec(_int())
    total_size: int = spec(_int())
    sha256: str = spec(_SHA)
    more: bool = spec(_bool)
    data: bytes = b""


@_message
class Update(Message):
    """Device -> coordinator: the result of local training.

    Attributes:
        update_id: from the assignment (idempotency key). round_id: the round.
        num_examples: training sequences seen. num_tokens: training tokens seen.
        metrics: name -> number (e.g. ``loss``, ``train_seconds``, ``peak_rss_mb``).
        routing: routing statistics, e.g. ``{"usage": [[...]], "importance": [[...]]}`` per MoE layer over
            the local experts (HFedMoE u_c(e) and s_c(e)).
        trained_experts: per MoE layer, the global ids of experts whose weights were actually updated.
        tensors: the trained tensors, name -> array (float16 if the config asked for it).
    """

    TYPE: ClassVar[str] = "update"
    PAYLOAD: ClassVar[str] = "tensors"
    update_id: str = spec(_str(_ID))
    round_id: int = spec(_int())
    num_examples: int = spec(_int())
    num_tokens: int = spec(_int())
    metrics: dict = spec(_dict_of(_float()))
    routing: dict = spec(_json())
    trained_experts: tuple[tuple[int, ...], ...] = spec(_EXPERT_IDS)
    tensors: dict = field(default_factory=dict, compare=False)


@_message
class Ack(Message):
    """Coordinator -> device: the update was recorded (accepted or rejected with a reason)."""

    TYPE: ClassVar[str] = "ack"
    update_id: str = spec(_str(_ID))
    accepted: bool = spec(_bool)
    reason: str = spec(_str(max_len=2000), default="")


@_message
class Evaluate(Message):
    """Coordinator -> device: evaluate these weights on local held-out data.

    Attributes:
        round_id, shape_key, expert_ids: as in ``Assignment``. batch_size, seq_len: eval batches.
        max_batches: at most this many batches (0: all local eval data). tensors: the weights.
    """

    TYPE: ClassVar[str] = "evaluate"
    PAYLOAD: ClassVar[str] = "tensors"
    round_id: int = spec(_int())
    shape_key: ShapeKey = spec(_nested(ShapeKey))
    expert_ids: tuple[tuple[int, ...], ...] = spec(_EXPERT_IDS)
    batch_size: int = spec(_int(1, 1 << 16))
    seq_len: int = spec(_int(1, 1 << 20))
    max_batches: int = spec(_int(), default=0)
    tensors: dict = field(default_factory=dict, compare=False)


@_message
class EvaluateRes(Message):
    """Device -> coordinator: evaluation result (``loss`` is the mean token cross-entropy, nats)."""

    TYPE: ClassVar[str] = "evaluate_res"
    round_id: int = spec(_int())
    num_examples: int = spec(_int())
    num_tokens: int = spec(_int())
    loss: float = spec(_float())
    metrics: dict = spec(_dict_of(_float()))


@_message
class Heartbeat(Message):
    """Either direction: keep-alive, no fields."""

    TYPE: ClassVar[str] = "heartbeat"


@_message
class Error(Message):
    """Either direction: the peer rejected something; ``code`` is one of :data:`ERROR_CODES`."""

    TYPE: ClassVar[str] = "error"
    code: str = spec(_str(_ID))
    message: str = spec(_str(max_len=2000))


MESSAGE_TYPES: dict[str, type] = dict(_REGISTRY)


# ---------------------------------------------------------------- encode / decode


def encode(msg: Message) -> bytes:
    """Frame a message as one binary websocket message (layout in the module docstring).

    Raises:
        ProtocolError("bad_tensor"): a tensor is not serialisable (see :func:`tensors_to_bytes`).
        ProtocolError("too_large"): the JSON header exceeds ``MAX_HEADER_BYTES``.
    """
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    for f in _json_fields(type(msg)):
        header[f.name] = _to_json(getattr(msg, f.name))
    payload = b""
    if msg.PAYLOAD == "tensors":
        payload = tensors_to_bytes(msg.tensors)
    elif msg.PAYLOAD == "bytes":
        payload = bytes(msg.data)
    if msg.PAYLOAD is not None:
        header["payload"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"{msg.TYPE} header is {len(raw)} bytes (max {MAX_HEADER_BYTES})")
    return _LEN.pack(len(raw)) + raw + payload


def decode(
    data: bytes, *, max_size: int, expected_tensors: Mapping[str, tuple[int, ...]] | None = None
) -> Message:
    """Parse and validate one frame.

    Args:
        data: the websocket binary message.
        max_size: largest frame accepted (bytes); match the websocket's ``max_size``.
        expected_tensors: for tensor-carrying types, the exact name -> shape map required.

    Raises:
        ProtocolError: with ``code`` in :data:`ERROR_CODES` (never another exception type).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("bad_frame", "protocol frames are binary websocket messages")
    data = bytes(data)
    if len(data) > max_size:
        raise ProtocolError("too_large", f"frame of {len(data)} bytes exceeds max_size {max_size}")
    if len(data) < _LEN.size:
        raise ProtocolError("bad_frame", f"frame of {len(data)} bytes has no header length")
    (hlen,) = _LEN.unpack_from(data)
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header length {hlen} exceeds {MAX_HEADER_BYTES}")
    if _LEN.size + hlen > len(data):
        raise ProtocolError("bad_frame", f"header length {hlen} runs past the {len(data)}-byte frame")
    header = _parse_header(data[_LEN.size : _LEN.size + hlen])
    cls = _message_class(header)
    payload = _payload(cls, header.pop("payload", None), data[_LEN.size + hlen :])
    try:
        values = _check_fields(cls, header)
    except ValueError as exc:
        raise ProtocolError("bad_header", f"{cls.TYPE}: {exc}") from exc
    if cls.PAYLOAD == "tensors":
        values["tensors"] = bytes_to_tensors(payload, expected=expected_tensors)
    elif cls.PAYLOAD == "bytes":
        values["data"] = payload
    return cls(**values)


def expect(msg: Message, *types: type) -> Message:
    """Return ``msg`` if it is one of ``types``.

    Raises:
        ProtocolError: with the peer's code if ``msg`` is an :class:`Error`, else ``"unexpected"``.
    """
    if isinstance(msg, types):
        return msg
    if isinstance(msg, Error):
        raise ProtocolError(msg.code, f"peer reported: {msg.message}")
    names = ", ".join(t.TYPE for t in types)
    raise ProtocolError("unexpected", f"expected {names}, got {msg.TYPE}")


def _loads(raw: bytes) -> Any:
    def reject(constant):
        raise ValueError(f"non-finite number {constant}")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=reject)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from exc


def _parse_header(raw: bytes) -> dict:
    try:
        header = _loads(raw)
    except ValueError as exc:
        raise ProtocolError("bad_header", f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header must be a JSON object")
    version = header.pop("v", None)
    if not _is_int(version):
        raise ProtocolError("bad_header", "header lacks an integer protocol version 'v'")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"peer speaks protocol v{version}, this side speaks v{PROTOCOL_VERSION}; "
                                       "upgrade the older side")
    return header


def _message_class(header: dict) -> type:
    kind = header.pop("type", None)
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {str(kind)[:60]!r}")
    return MESSAGE_TYPES[kind]


def _payload(cls: type, declared: Any, payload: bytes) -> bytes:
    if cls.PAYLOAD is None:
        if declared is not None or payload:
            raise ProtocolError("bad_frame", f"{cls.TYPE} carries no payload")
        return b""
    if not isinstance(declared, dict) or set(declared) != {"size", "sha256"}:
        raise ProtocolError("bad_header", f"{cls.TYPE} header needs payload {{size, sha256}}")
    if declared["size"] != len(payload):
        raise ProtocolError("bad_payload", f"payload is {len(payload)} bytes, header says {declared['size']}")
    if hashlib.sha256(payload).hexdigest() != declared["sha256"]:
        raise ProtocolError("bad_payload", "payload sha256 differs from the header (corrupted or tampered)")
    return payload


def _json_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "check" in f.metadata]


def _check_fields(cls: type, data: dict) -> dict:
    """Validate JSON ``data`` against the ``spec`` fields of ``cls``; returns field -> value.

    Raises ValueError on a missing, unknown or invalid field (BundleError from ShapeKey becomes ValueError).
    """
    specs = {f.name: f for f in _json_fields(cls)}
    unknown = sorted(set(data) - set(specs))
    if unknown:
        raise ValueError(f"unknown fields {unknown[:5]}")
    values = {}
    for name, f in specs.items():
        if name not in data:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"missing field {name!r}")
            continue
        try:
            values[name] = f.metadata["check"](data[name])
        except (BundleError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"field {name!r}: {exc}") from exc
    return values


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _to_json(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- bundle transfer in chunks


def bundle_chunks(shape_key_id: str, files: Mapping[str, bytes], *, chunk_bytes: int = 4 << 20) -> Iterator[BundleData]:
    """Split bundle files into ``BundleData`` messages of at most ``chunk_bytes`` payload each.

    Files go in the order given, each in offset order; the last message has ``more=False``.
    """
    if chunk_bytes < 1 or not files:
        raise ValueError("need chunk_bytes >= 1 and at least one file")
    names = list(files)
    for index, name in enumerate(names):
        blob, digest = files[name], hashlib.sha256(files[name]).hexdigest()
        offsets = range(0, max(len(blob), 1), chunk_bytes)
        for offset in offsets:
            last = index == len(names) - 1 and offset == offsets[-1]
            yield BundleData(shape_key_id=shape_key_id, name=name, offset=offset, total_size=len(blob),
                             sha256=digest, more=not last, data=blob[offset : offset + chunk_bytes])


class BundleAssembler:
    """Reassemble and verify the files of one bundle from ``BundleData`` chunks (no I/O).

    Args:
        shape_key_id: the bundle requested; chunks of another bundle are rejected.
        max_total_bytes: bound on the sum of all file sizes (bytes).
    """

    def __init__(self, shape_key_id: str, *, max_total_bytes: int):
        self.shape_key_id = shape_key_id
        self.max_total_bytes = max_total_bytes
        self._files: dict[str, bytearray] = {}
        self._current: BundleData | None = None
        self._declared = 0

    def add(self, chunk: BundleData) -> dict[str, bytes] | None:
        """Add the next chunk; returns name -> file bytes once the last chunk arrived, else None.

        Raises:
            ProtocolError("unexpected"): wrong bundle, chunk out of order, or a file sent twice.
            ProtocolError("too_large"): the files exceed ``max_total_bytes``.
            ProtocolError("bad_payload"): a file's sha256 differs from its declared one.
        """
        if chunk.shape_key_id != self.shape_key_id:
            raise ProtocolError("unexpected", f"chunk of bundle {chunk.shape_key_id}, expected {self.shape_key_id}")
        if any(part in (".", "..") for part in chunk.name.split("/")):
            raise ProtocolError("bad_header", f"bundle file name {chunk.name!r} escapes the bundle")
        buf = self._open(chunk) if chunk.offset == 0 else self._continue(chunk)
        buf += chunk.data
        if len(buf) > chunk.total_size:
            raise ProtocolError("bad_frame", f"{chunk.name}: chunks exceed its declared {chunk.total_size} bytes")
        complete = len(buf) == chunk.total_size
        if complete and hashlib.sha256(buf).hexdigest() != chunk.sha256:
            raise ProtocolError("bad_payload", f"bundle file {chunk.name} differs from its sha256")
        if chunk.more:
            return None
        if not complete:
            raise ProtocolError("bad_frame", f"bundle ended inside {chunk.name}")
        return {name: bytes(b) for name, b in self._files.items()}

    def _open(self, chunk: BundleData) -> bytearray:
        if self._current is not None and len(self._files[self._current.name]) != self._current.total_size:
            raise ProtocolError("unexpected", f"{chunk.name} started before {self._current.name} was complete")
        if chunk.name in self._files:
            raise ProtocolError("unexpected", f"bundle file {chunk.name} sent twice")
        self._declared += chunk.total_size
        if self._declared > self.max_total_bytes:
            raise ProtocolError("too_large", f"bundle exceeds {self.max_total_bytes} bytes")
        self._current = chunk
        self._files[chunk.name] = bytearray()
        return self._files[chunk.name]

    def _continue(self, chunk: BundleData) -> bytearray:
        cur = self._current
        if cur is None or (chunk.name, chunk.total_size, chunk.sha256) != (cur.name, cur.total_size, cur.sha256) \
                or chunk.offset != len(self._files[cur.name]):
            raise ProtocolError("unexpected", f"chunk {chunk.name}@{chunk.offset} out of order")
        return self._files[cur.name]
