"""The fedmoe wire protocol, version 4: message types and their binary framing, free of I/O.

Shared by the device runtime and the coordinator. Every protocol message travels as ONE websocket binary
message (frame) laid out as::

    +----------------+---------------------------+-----------------------------+
    | 4 bytes        | header_len bytes          | payload_size bytes          |
    | header_len     | UTF-8 JSON header         | optional payload            |
    | (big-endian)   | {"v": 4, "type": ..., ...} | safetensors blob or raw     |
    +----------------+---------------------------+-----------------------------+

The header holds the message's fields and, when the type carries a payload,
``"payload": {"size": <bytes>, "sha256": <hex>}``. Tensor payloads (``Assignment``, ``Update``)
are safetensors blobs (never pickle) of float32 or float16 tensors; the ``BundleData``
payload is one chunk of one bundle file. Bytes fields (nonce, public key, signature) are base64 in JSON.
An ``Assignment`` header also carries the coordinator's ``"signature"`` over its canonical form (version 2's
one change; ``device_runtime.signing``, ``docs/round.md``).

:func:`decode` checks everything received before use: frame and header lengths, the schema of the type
(unknown or missing fields are errors), the payload size and sha256, and for tensors every name
(``[A-Za-z0-9_.-]``), dtype (float32 / float16), shape and byte offset, optionally against an expected
name -> shape map. Each failure raises :class:`~device_runtime.errors.ProtocolError` with one of the
stable :data:`ERROR_CODES`, which a peer can send back in an :class:`Error` message.

Conversation (the server and the client own the I/O and the ordering)::

    enroll:   device -> Enroll(token, name, profile, public_key)      coordinator -> EnrollOk(device_id)
    connect: device -> Hello(device_id, protocol_version, profile)  coordinator -> Challenge(nonce)
             device -> Auth(device_id, signature)                   coordinator -> AuthOk() | Error
    round:   coordinator -> Assignment(...)   [device -> BundleRequest  coordinator -> BundleData...]
             device -> Update(...)             coordinator -> Ack(update_id, accepted, reason)
                       (a zeroth-order device may send Update(zo=ZoUpdate(seeds, scalars)) and no tensors)
             (evaluation rides on the round: with FitConfig.eval_fraction > 0 the Update carries
              evaluation=EvalResult(...), the received model's score on the device's held-out split)
    split:   (a split device's assignment, FitConfig.split; per step, ``device_runtime.split_trainer``)
             device -> SmashedData(step, z)    coordinator -> CutGradient(step, lambda, loss)
             device -> SplitScalars(step, v)   coordinator -> SplitStep(first_step, vbar...)
             then the device's Update carries no tensors: the coordinator replayed its steps
    secure round (``[privacy] secure_aggregation``; ``wire.secure``): SecAggStart before the Assignment, then
             SecAggKeys / SecAggRoster / SecAggShares / SecAggInbox, the masked result SecAggMasked (Ack),
             SecAggUnmask / SecAggReveal
    any time: Heartbeat(), Error(code, message)

Modules, one job each: ``fields`` (limits, error codes, field types, validation with msgspec),
``tensors`` (safetensors blobs and their header checks), ``messages`` (the message dataclasses),
``framing`` (encode / decode / expect), ``transfer`` (bundle files in chunks), ``secure`` (the
secure-aggregation messages). This package exports
their public names.
"""

from device_runtime.wire.fields import ERROR_CODES, MAX_HEADER_BYTES, PROTOCOL_VERSION, validate
from device_runtime.wire.framing import (
    FRAGMENT_BYTES,
    decode,
    encode,
    encode_parts,
    expect,
    fragments,
    frame_payload,
)
from device_runtime.wire.messages import (
    MESSAGE_TYPES,
    Ack,
    Assignment,
    Auth,
    AuthOk,
    BundleData,
    BundleRequest,
    Challenge,
    CutGradient,
    Enroll,
    EnrollOk,
    Error,
    EvalResult,
    FitConfig,
    Heartbeat,
    Hello,
    Message,
    SmashedData,
    SplitConfig,
    SplitScalars,
    SplitStep,
    Update,
    ZoUpdate,
)
from device_runtime.wire.secure import (
    SECURE_FROM_DEVICE,
    SECURE_TO_DEVICE,
    ImportanceWeighting,
    Participant,
    RevealedShare,
    SealedShare,
    SecAggInbox,
    SecAggKeys,
    SecAggMasked,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
)
from device_runtime.wire.tensors import MAX_TENSORS, WIRE_DTYPES, bytes_to_tensors, tensors_to_bytes, to_float32
from device_runtime.wire.transfer import BundleAssembler, BundleFile, bundle_chunks

__all__ = [
    "FRAGMENT_BYTES",
    "ERROR_CODES",
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "WIRE_DTYPES",
    "Ack",
    "Assignment",
    "Auth",
    "AuthOk",
    "BundleAssembler",
    "BundleFile",
    "BundleData",
    "BundleRequest",
    "Challenge",
    "CutGradient",
    "Enroll",
    "EnrollOk",
    "Error",
    "EvalResult",
    "FitConfig",
    "Heartbeat",
    "Hello",
    "Message",
    "ImportanceWeighting",
    "Participant",
    "RevealedShare",
    "SECURE_FROM_DEVICE",
    "SECURE_TO_DEVICE",
    "SealedShare",
    "SecAggInbox",
    "SecAggKeys",
    "SecAggMasked",
    "SecAggReveal",
    "SecAggRoster",
    "SecAggShares",
    "SecAggStart",
    "SecAggUnmask",
    "SmashedData",
    "SplitConfig",
    "SplitScalars",
    "SplitStep",
    "Update",
    "ZoUpdate",
    "bundle_chunks",
    "bytes_to_tensors",
    "decode",
    "encode",
    "encode_parts",
    "fragments",
    "expect",
    "frame_payload",
    "tensors_to_bytes",
    "to_float32",
    "validate",
]
