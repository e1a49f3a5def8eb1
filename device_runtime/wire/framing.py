"""Framing: one message <-> one websocket binary message (layout in ``device_runtime.wire``), no I/O."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, TypeVar, cast, overload

import msgspec
import numpy as np

from device_runtime.errors import ProtocolError
from device_runtime.signing import canonical_header, decode_signature, encode_signature
from device_runtime.wire.fields import MAX_HEADER_BYTES, PROTOCOL_VERSION, json_fields, printable, to_json, validate
from device_runtime.wire.messages import MESSAGE_TYPES, Error, Message
from device_runtime.wire.tensors import bytes_to_tensors, safetensors_parts

_LEN = struct.Struct(">I")


class _TensorsPayload(Protocol):
    """A message whose ``PAYLOAD`` is ``"tensors"``: its field ``tensors`` is the payload."""

    tensors: dict[str, np.ndarray]


class _BytesPayload(Protocol):
    """A message whose ``PAYLOAD`` is ``"bytes"``: its field ``data`` is the payload."""

    data: bytes


FRAGMENT_BYTES = 1 << 20
"""The largest websocket frame :func:`fragments` makes (bytes): websockets copies a frame's data twice as it sends it
(client masking, then serialisation), so whole-message frames cost a device twice an update's size at once."""


def encode(msg: Message, *, sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """Frame a message as one binary websocket message: :func:`encode_parts` joined (one copy of the payload)."""
    return b"".join(encode_parts(msg, sign=sign))


def fragments(parts: Iterable[bytes | memoryview], size: int = FRAGMENT_BYTES) -> Iterator[memoryview]:
    """Views of ``parts`` of at most ``size`` bytes each, in order, nothing copied: ``websocket.send`` of them sends
    one fragmented message whose data is the parts joined (what the receiver reassembles and :func:`decode` reads)."""
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, len(view), size):
            yield view[start : start + size]


def encode_parts(msg: Message, *, sign: Callable[[bytes], bytes] | None = None) -> list[bytes | memoryview]:
    """The binary websocket message of ``msg`` as parts that, joined, are its frame: the header's length and the
    header, then the payload's parts (views of the message's arrays or bytes, not copied).

    Args:
        msg: the message.
        sign: for a ``SIGNED`` type, canonical header bytes -> signature (``signing.Signer.assignment``),
            put in the header as ``signature``; ignored for other types.

    Raises:
        ProtocolError("bad_tensor"): a tensor is not serialisable (see ``wire.tensors_to_bytes``).
        ProtocolError("too_large"): the JSON header exceeds ``MAX_HEADER_BYTES``.
    """
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    for name in json_fields(type(msg)):
        header[name] = to_json(getattr(msg, name))
    parts: list[bytes | memoryview] = []
    if msg.PAYLOAD == "tensors":  # the safetensors header, then views of the arrays: copied once, into the frame
        parts = list(safetensors_parts(cast(_TensorsPayload, msg).tensors))
    elif msg.PAYLOAD == "bytes":
        parts = [cast(_BytesPayload, msg).data]
    if msg.PAYLOAD is not None:
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        header["payload"] = {"size": sum(len(part) for part in parts), "sha256": digest.hexdigest()}
    if sign is not None and msg.SIGNED:
        header["signature"] = encode_signature(sign(canonical_header(header)))
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"{msg.TYPE} header is {len(raw)} bytes (max {MAX_HEADER_BYTES})")
    return [_LEN.pack(len(raw)), raw, *parts]


def frame_payload(frame: bytes) -> memoryview:
    """The payload of a frame made by :func:`encode` (a view, no copy): for a ``tensors`` message, the safetensors
    blob. Raises ProtocolError("bad_frame"): not a whole frame."""
    if len(frame) < _LEN.size:
        raise ProtocolError("bad_frame", f"frame of {len(frame)} bytes has no header length")
    (hlen,) = _LEN.unpack_from(frame)
    if _LEN.size + hlen > len(frame):
        raise ProtocolError("bad_frame", f"header length {hlen} runs past the {len(frame)}-byte frame")
    return memoryview(frame)[_LEN.size + hlen :]


def decode(
    data: bytes,
    *,
    max_size: int,
    expected_tensors: Mapping[str, tuple[int, ...]] | None = None,
    verify: Callable[[bytes, bytes | None], None] | None = None,
) -> Message:
    """Parse and validate one frame.

    Args:
        data: the websocket binary message.
        max_size: largest frame accepted (bytes); match the websocket's ``max_size``.
        expected_tensors: for tensor-carrying types, the exact name -> shape map required.
        verify: for a ``SIGNED`` type, ``(canonical header, signature or None)`` -> None or raises
            ProtocolError (``signing.Verifier.assignment``); called once the payload matched the header's
            sha256 and before any field or tensor is parsed. None: a signature is ignored.

    Raises:
        ProtocolError: with ``code`` in ``ERROR_CODES``, for any input (never another exception type).
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
    signature = header.pop("signature", None) if cls.SIGNED else None
    declared = header.pop("payload", None)
    payload = _payload(cls, declared, memoryview(data)[_LEN.size + hlen :])  # a view: tensors are copied once, below
    if verify is not None and cls.SIGNED:
        _verify(verify, cls, header, declared, signature)
    try:
        msg = validate(cls, header)
    except ValueError as exc:
        raise ProtocolError("bad_header", f"{cls.TYPE}: {printable(str(exc), 500)}") from exc
    if cls.PAYLOAD == "tensors":
        return dataclasses.replace(msg, tensors=bytes_to_tensors(payload, expected=expected_tensors))
    if cls.PAYLOAD == "bytes":
        return dataclasses.replace(msg, data=bytes(payload))
    return msg


_M = TypeVar("_M", bound=Message)


@overload
def expect(msg: Message, kind: type[_M], /) -> _M: ...
@overload
def expect(msg: Message, *types: type[Message]) -> Message: ...
def expect(msg: Message, *types: type[Message]) -> Message:
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


def _verify(
    verify: Callable[[bytes, bytes | None], None],
    cls: type[Message],
    fields: dict[str, Any],
    declared: Any,
    signature: Any,
) -> None:
    """Run ``verify`` on the canonical form of the header as sent; its error names the message."""
    payload = {"payload": declared} if cls.PAYLOAD is not None else {}  # a message without payload signs none
    signed = canonical_header({"v": PROTOCOL_VERSION, "type": cls.TYPE, **fields, **payload})
    try:
        verify(signed, decode_signature(signature))
    except ProtocolError as exc:
        what = printable(f"{cls.TYPE} {fields.get('update_id', '?')} of round {fields.get('round_id', '?')}", 200)
        raise ProtocolError(exc.code, f"{what} refused: {exc}") from exc


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError("bad_header", f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header must be a JSON object")
    version = header.pop("v", None)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("bad_header", "header lacks an integer protocol version 'v'")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version", f"peer speaks protocol v{version}, this side speaks v{PROTOCOL_VERSION}; upgrade the older side"
        )
    return header


def _message_class(header: dict[str, Any]) -> type[Message]:
    kind = header.pop("type", None)
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {str(kind)[:60]!r}")
    return MESSAGE_TYPES[kind]


def _payload(cls: type[Message], declared: Any, payload: memoryview) -> memoryview:
    if cls.PAYLOAD is None:
        if declared is not None or len(payload):
            raise ProtocolError("bad_frame", f"{cls.TYPE} carries no payload")
        return payload
    if not isinstance(declared, dict) or set(declared) != {"size", "sha256"}:
        raise ProtocolError("bad_header", f"{cls.TYPE} header needs payload {{size, sha256}}")
    if declared["size"] != len(payload):
        raise ProtocolError("bad_payload", f"payload is {len(payload)} bytes, header says {declared['size']}"[:200])
    if hashlib.sha256(payload).hexdigest() != declared["sha256"]:
        raise ProtocolError("bad_payload", "payload sha256 differs from the header (corrupted or tampered)")
    return payload
