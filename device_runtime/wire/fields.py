"""The protocol's vocabulary: limits, error codes, and the field types every message is validated against.

Field types are ``typing.Annotated`` types with :class:`msgspec.Meta` constraints; :func:`validate`
turns a decoded JSON object into a message dataclass with them (msgspec checks types, ranges, lengths
and patterns; this module adds that unknown fields are errors). Patterns are anchored with ``\\A`` and
``\\Z`` (msgspec searches them), so a trailing newline never passes.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, TypeVar, Union

import msgspec

from device_runtime.errors import BundleError
from device_runtime.units import MIB

# 2: assignments carry the coordinator's signature (device_runtime.signing)
# 3: the messages "enroll" / "enroll_ok" (were "enrol" / "enrol_ok": one spelling of enroll); "evaluate" /
#    "evaluate_res" removed (federated evaluation rides on fit: FitConfig.eval_fraction, Update.evaluation)
# 4: split mode (HO-SFL): FitConfig.split and the messages "smashed_data", "cut_gradient", "split_scalars",
#    "split_step"; the secure-aggregation messages "secagg_*" (device_runtime.wire.secure)
PROTOCOL_VERSION = 4
MAX_HEADER_BYTES = MIB  # JSON header bound (bytes); weights travel in the payload
MAX_EXPERT_ID = 1 << 20
MAX_NUM_EXAMPLES = 1 << 30  # sequences a device may report per round (about 10**9: no device gets near)
MAX_NUM_TOKENS = 1 << 40
MAX_TEXT = 2000  # characters of a free-text field (error messages, ack reasons)
MAX_EVAL_LOSS = 1e3  # nats per token of an EvalResult (ln of a 10**6-token vocabulary is 14)
MAX_LABELS = 1024  # candidate labels of FitConfig.labels (logit adjustment)
MAX_SECURE_PEERS = 1024  # devices of one securely aggregated round (each sends a sealed share to every other)
MAX_ZO_SEEDS = 4096  # seeds of a zeroth-order ZoUpdate (FedKSeed's K; ~100 KB of header at most)
MAX_PERTURBATIONS = 64  # HO-SFL's P: perturbed forwards per split step (the paper uses 2 for language)
MAX_SPLIT_HISTORY = 4096  # steps of (seed, vbar) history one SplitStep may replay to a device that fell behind
MAX_HIDDEN = 1 << 16  # hidden size of smashed data (channels)
ERROR_CODES = (
    "bad_frame",  # frame shorter than its declared lengths, or a payload where none belongs
    "too_large",  # frame beyond max_size, or header beyond MAX_HEADER_BYTES
    "bad_header",  # header is not UTF-8 JSON, or a field is missing, unknown or out of range
    "unknown_type",  # "type" names no message of this protocol version
    "version",  # "v" is not PROTOCOL_VERSION
    "bad_payload",  # payload size or sha256 differs from the header
    "bad_tensor",  # tensor name, dtype, shape or offsets invalid, or not the expected set
    "bad_signature",  # an assignment or bundle is unsigned or its signature does not verify (device side)
    "unexpected",  # a valid message that is not allowed at this point of the conversation
    "auth",  # enrollment or authentication failed (sent in Error messages)
    "internal",  # the peer failed while handling a valid message
)

_NAME_CHARS = r"[A-Za-z0-9_.\-]"
NAME = re.compile(_NAME_CHARS + "{1,200}")  # tensor and metric names
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")  # ids never start with "." (safe as file names)
SHA256 = re.compile(r"[0-9a-f]{64}")  # these regexes: use with fullmatch
_FLOAT_MAX = sys.float_info.max


def _pattern(regex: str, max_length: int | None = None) -> msgspec.Meta:
    """The constraint of a string that matches ``regex`` whole (anchored: msgspec searches)."""
    return msgspec.Meta(pattern=rf"\A(?:{regex})\Z", max_length=max_length)


def Text(max_length: int) -> Any:
    """Free text of at most ``max_length`` characters."""
    return Annotated[str, msgspec.Meta(max_length=max_length)]


def Int(lo: int = 0, hi: int = 2**63 - 1) -> Any:
    """An integer in ``[lo, hi]`` (JSON booleans and floats are refused)."""
    return Annotated[int, msgspec.Meta(ge=lo, le=hi)]


def Float(lo: float = -_FLOAT_MAX) -> Any:
    """A finite number ``>= lo`` (a JSON integer is accepted and becomes a float)."""
    return Annotated[float, msgspec.Meta(ge=lo, le=_FLOAT_MAX)]


def Raw(nbytes: int) -> Any:
    """Exactly ``nbytes`` bytes, base64 in JSON."""
    return Annotated[bytes, msgspec.Meta(min_length=nbytes, max_length=nbytes)]


def Tuples(item: Any, max_length: int = 4096) -> Any:
    """A JSON list of lists of ``item`` as a tuple of tuples, each at most ``max_length`` long."""
    inner = Annotated[tuple[item, ...], msgspec.Meta(max_length=max_length)]
    return Annotated[tuple[inner, ...], msgspec.Meta(max_length=max_length)]


# The field types of the messages. Each is a module-level alias spelled out (not a call of the helpers above,
# which build the same types at run time) so that type checkers see ``int``, ``str`` ... with msgspec's constraints.
Name: TypeAlias = Annotated[str, _pattern(NAME.pattern)]  # tensor and metric names
Id: TypeAlias = Annotated[str, _pattern(ID.pattern)]
RelPath: TypeAlias = Annotated[str, _pattern(rf"{_NAME_CHARS}+(?:/{_NAME_CHARS}+)*", 300)]
Sha256: TypeAlias = Annotated[str, _pattern(SHA256.pattern)]
Count: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
WireDtype = Literal["float32", "float16"]
ExpertId: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=MAX_EXPERT_ID)]  # a global expert id
ExpertIds: TypeAlias = Annotated[  # per MoE layer, global expert ids (Tuples(ExpertId))
    tuple[Annotated[tuple[ExpertId, ...], msgspec.Meta(max_length=4096)], ...], msgspec.Meta(max_length=4096)
]
Finite: TypeAlias = Annotated[float, msgspec.Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]  # Float()
NonNegative: TypeAlias = Annotated[float, msgspec.Meta(ge=0.0, le=_FLOAT_MAX)]  # Float(0.0)
Metrics: TypeAlias = Annotated[dict[Name, Finite], msgspec.Meta(max_length=1024)]
ShortText: TypeAlias = Annotated[str, msgspec.Meta(max_length=200)]  # Text(200): tokens, labels
LongText: TypeAlias = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]  # Text(MAX_TEXT): messages, reasons
NumExamples: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=MAX_NUM_EXAMPLES)]
NumTokens: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=MAX_NUM_TOKENS)]
EvalExamples: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=MAX_NUM_EXAMPLES)]  # an EvalResult scores >= 1
EvalLoss: TypeAlias = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_EVAL_LOSS)]  # nats per token
Fraction: TypeAlias = Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)]  # a share in [0, 1): FitConfig.eval_fraction
Probability: TypeAlias = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]  # in [0, 1]: an accuracy
BatchSize: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]  # sequences per step
SeqLen: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]  # tokens per sequence
LocalSteps: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=1 << 30)]  # optimizer steps (0: one epoch)
Seed32: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
ZoSeedCount: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=MAX_ZO_SEEDS)]
VersionNumber: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]  # a protocol version
Probabilities: TypeAlias = Annotated[  # per MoE layer, a distribution over experts (Tuples(NonNegative))
    tuple[Annotated[tuple[NonNegative, ...], msgspec.Meta(max_length=4096)], ...], msgspec.Meta(max_length=4096)
]
Bytes32: TypeAlias = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]  # Raw(32): keys, nonces
Bytes64: TypeAlias = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]  # Raw(64): signatures


def _json(depth: int, max_items: int) -> Any:
    """Free-form JSON nested at most ``depth`` containers deep, each of at most ``max_items`` entries."""
    key: Any = Text(200)  # types built at run time, for msgspec
    scalar = (Text(10_000), Int(-(2**63), 2**63 - 1), Float(), bool, None)
    value: Any = Union[scalar]  # noqa: UP007 (a union built from a tuple: no `|` spelling)
    for _ in range(depth):
        value = Union[
            (
                *scalar,
                Annotated[list[value], msgspec.Meta(max_length=max_items)],
                Annotated[dict[key, value], msgspec.Meta(max_length=max_items)],
            )
        ]
    return value


def JsonObject(depth: int = 4, max_items: int = 65_536) -> Any:
    """A JSON object (never another JSON value) of free-form, bounded JSON values."""
    key: Any = Text(200)  # types built at run time, for msgspec
    value: Any = _json(depth - 1, max_items)
    return Annotated[dict[key, value], msgspec.Meta(max_length=max_items)]


if TYPE_CHECKING:
    # Free-form JSON objects: msgspec validates them against a depth- and size-bounded union built in a loop
    # (:func:`JsonObject`), which no type checker can follow; statically they are what they are, JSON objects.
    Profile: TypeAlias = dict[str, Any]
    JsonDict: TypeAlias = dict[str, Any]
else:
    Profile = JsonObject(depth=3, max_items=256)  # a device profile: a small object (see device_runtime.profile)
    JsonDict = JsonObject()  # any JSON object, at most 4 containers deep, each at most 65,536 entries

T = TypeVar("T")


def validate(cls: type[T], data: Any) -> T:
    """Build dataclass ``cls`` from decoded JSON ``data`` (an object of its :func:`json_fields`).

    Returns:
        the instance; fields absent from ``data`` take their defaults.

    Raises:
        ValueError: ``data`` is not an object, a field is unknown, missing or invalid (msgspec's
            ``ValidationError`` is a ValueError; a ``BundleError`` from a nested record is re-raised as one).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object")
    unknown = set(data) - set(json_fields(cls))
    if unknown:
        raise ValueError(f"unknown fields {sorted(map(str, unknown))[:5]}")
    try:
        return msgspec.convert(data, cls)
    except BundleError as exc:
        raise ValueError(str(exc)) from exc


def payload_field(**kwargs: Any) -> Any:
    """A dataclass field that travels in the frame's payload, never in its JSON header."""
    return dataclasses.field(compare=False, metadata={"payload": True}, **kwargs)


def json_fields(cls: type[Any]) -> list[str]:
    """Names of the fields of dataclass ``cls`` that travel in the JSON header, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("payload")]


def to_json(value: Any) -> Any:
    """A field value as JSON-ready builtins (dataclasses -> objects, tuples -> lists, bytes -> base64)."""
    return msgspec.to_builtins(value)


def printable(text: str, max_length: int = MAX_TEXT) -> str:
    """``text`` safe to log: non-printable characters (newlines, escapes, controls) become spaces, and at
    most ``max_length`` characters are kept."""
    return "".join(c if c.isprintable() else " " for c in text[:max_length])
