"""Property-based tests of the wire (hypothesis): decode of any bytes raises only ProtocolError, and every
message type round-trips through encode/decode. Strategies are derived from the messages' own annotated
field types, so a new field or message is covered without editing this file.

Budget: about 1,200 examples in total (15 types x 40 round trips, 3 x 200 hostile frames): 9.6 s of CPU
(user + sys, pytest start-up included), 21-25 s wall at load 9.
"""

import dataclasses
import hashlib
import json
import struct
import types
import typing

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_runtime import wire
from device_runtime.bundle import TRAINABLE_MODES, ShapeKey
from device_runtime.errors import ProtocolError

MAX = 1 << 20
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT_MAX = 1.7976931348623157e308


def _meta(tp) -> tuple[type, msgspec.Meta]:
    if typing.get_origin(tp) is typing.Annotated:
        base, *extras = typing.get_args(tp)
        return base, next((m for m in extras if isinstance(m, msgspec.Meta)), msgspec.Meta())
    return tp, msgspec.Meta()


def strategy_for(tp) -> st.SearchStrategy:
    """Values valid for annotated field type ``tp`` (small containers, to keep examples fast)."""
    base, meta = _meta(tp)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if base is bool:
        return st.booleans()
    if base is int:
        low = meta.ge if meta.ge is not None else meta.gt + 1 if meta.gt is not None else -(2**63)
        return st.integers(low, meta.le if meta.le is not None else meta.lt - 1 if meta.lt is not None else 2**63 - 1)
    if base is float:
        high = meta.le if meta.le is not None else meta.lt if meta.lt is not None else FLOAT_MAX
        low = meta.ge if meta.ge is not None else meta.gt if meta.gt is not None else -FLOAT_MAX
        return st.floats(
            low,
            high,
            allow_nan=False,
            allow_infinity=False,
            exclude_min=meta.gt is not None,
            exclude_max=meta.lt is not None,
        )
    if base is str:
        if meta.pattern is not None:
            limit = meta.max_length
            return st.from_regex(meta.pattern).filter(lambda text: limit is None or len(text) <= limit)
        return st.text(max_size=min(meta.max_length or 50, 50))
    if base is bytes:
        return st.binary(min_size=meta.min_length or 0, max_size=meta.max_length or 64)
    if base is type(None):
        return st.none()
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in args])
    if origin is tuple:
        return st.lists(
            strategy_for(args[0]), min_size=meta.min_length or 0, max_size=min(meta.max_length or 4, 4)
        ).map(tuple)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=min(meta.max_length or 4, 4))
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=min(meta.max_length or 4, 4))
    if base is ShapeKey:
        return shape_keys()
    if base is wire.ZoUpdate:
        return zo_updates()
    if dataclasses.is_dataclass(base):
        return records(base)
    raise AssertionError(f"no strategy for {tp!r}: extend strategy_for")


def shape_keys(experts_per_layer=None) -> st.SearchStrategy:
    counts = (
        st.lists(st.integers(1, 8), min_size=1, max_size=4).map(tuple)
        if experts_per_layer is None
        else st.just(experts_per_layer)
    )
    mode = st.sampled_from(TRAINABLE_MODES)
    return st.builds(
        lambda c, m, r, p: ShapeKey(c, m, r if m == "lora" else 0, p), counts, mode, st.integers(1, 64), st.booleans()
    )


def zo_updates() -> st.SearchStrategy:
    """Seed-and-scalar updates: 1-4 distinct seeds, one finite scalar each (``ZoUpdate.__post_init__``)."""
    pairs = st.lists(
        st.tuples(st.integers(0, 2**63 - 1), strategy_for(wire.fields.Float())),
        min_size=1,
        max_size=4,
        unique_by=lambda pair: pair[0],
    )
    return st.builds(
        lambda p, d: wire.ZoUpdate(seeds=tuple(s for s, _ in p), scalars=tuple(c for _, c in p), distribution=d),
        pairs,
        st.sampled_from(["rademacher", "gaussian"]),
    )


def records(cls, **fixed) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {
        f.name: fixed.get(f.name, strategy_for(hints[f.name]))
        for f in dataclasses.fields(cls)
        if f.name in wire.fields.json_fields(cls)
    }
    return st.fixed_dictionaries(kwargs).map(lambda kw: cls(**kw))


TENSORS = st.dictionaries(
    st.from_regex(wire.fields.NAME.pattern, fullmatch=True),
    st.tuples(st.sampled_from([np.float32, np.float16]), st.lists(st.integers(0, 3), max_size=3)).map(
        lambda t: np.arange(int(np.prod(t[1])), dtype=t[0]).reshape(t[1]) / 3
    ),
    max_size=3,
)


@st.composite
def messages(draw, cls):
    fixed = {}
    if "shape_key" in wire.fields.json_fields(cls):  # expert_ids must match the shape key's counts
        key = draw(shape_keys())
        fixed["shape_key"] = st.just(key)
        fixed["expert_ids"] = st.tuples(
            *[st.lists(st.integers(0, 1 << 20), min_size=n, max_size=n).map(tuple) for n in key.experts_per_layer]
        )
    fields = wire.fields.json_fields(cls)
    if "participants" in fields:  # a roster: distinct devices in id order, 2 <= t <= n
        people = draw(st.lists(records(wire.Participant), min_size=2, max_size=4, unique_by=lambda p: p.device_id))
        fixed["participants"] = st.just(tuple(sorted(people, key=lambda p: p.device_id)))
        fixed["threshold"] = st.integers(2, len(people))
    if "shares" in fields:  # one share per peer (or owner)
        item = typing.get_args(_meta(typing.get_type_hints(cls, include_extras=True)["shares"])[0])[0]
        key = "peer" if "peer" in {f.name for f in dataclasses.fields(item)} else "owner"
        fixed["shares"] = st.lists(records(item), max_size=4, unique_by=lambda x: getattr(x, key)).map(tuple)
    if "survivors" in fields:  # survivors and dropped: distinct devices
        ids = draw(st.lists(st.from_regex(wire.fields.ID.pattern, fullmatch=True), max_size=4, unique=True))
        cut = draw(st.integers(0, len(ids)))
        fixed["survivors"], fixed["dropped"] = st.just(tuple(ids[:cut])), st.just(tuple(ids[cut:]))
    if "importance" in fields:  # HFedMoE's parameters go with weighting "hfedmoe", and only there
        importance = draw(st.none() | records(wire.ImportanceWeighting))
        fixed["importance"] = st.just(importance)
        fixed["weighting"] = st.just("hfedmoe") if importance else st.sampled_from(["examples", "unit"])
    msg = draw(records(cls, **fixed))
    if cls.PAYLOAD == "tensors":
        msg = dataclasses.replace(msg, tensors=draw(TENSORS))
    elif cls.PAYLOAD == "bytes":
        msg = dataclasses.replace(msg, data=draw(st.binary(max_size=256)))
    return msg


@pytest.mark.parametrize("cls", list(wire.MESSAGE_TYPES.values()), ids=lambda c: c.TYPE)
def test_every_message_type_round_trips(cls):
    @ROUND_TRIP
    @given(messages(cls))
    def check(msg):
        data = wire.encode(msg)
        back = wire.decode(data, max_size=len(data))
        assert type(back) is cls and back == msg and wire.encode(back) == data
        if cls.PAYLOAD == "tensors":
            assert {n: (a.dtype, a.shape) for n, a in back.tensors.items()} == {
                n: (a.dtype, a.shape) for n, a in msg.tensors.items()
            }
            for name, array in msg.tensors.items():
                np.testing.assert_array_equal(back.tensors[name], array)

    check()


def _only_protocol_errors(data: bytes) -> None:
    try:
        wire.decode(data, max_size=MAX)
    except ProtocolError as exc:
        assert exc.code in wire.ERROR_CODES


@FUZZ
@given(st.binary(max_size=512))
def test_decode_of_any_bytes_raises_only_protocol_error(data):
    _only_protocol_errors(data)


@FUZZ
@given(st.binary(max_size=512), st.binary(max_size=64))
def test_decode_of_any_framed_header_raises_only_protocol_error(header, payload):
    _only_protocol_errors(struct.pack(">I", len(header)) + header + payload)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats()
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from(sorted(wire.MESSAGE_TYPES)), st.data())
def test_decode_of_a_mutated_valid_header_raises_only_protocol_error(kind, data):
    """Start from a valid frame, replace or add one header field by any JSON value, keep or redo the payload."""
    msg = data.draw(messages(wire.MESSAGE_TYPES[kind]))
    frame = wire.encode(msg)
    (hlen,) = struct.unpack(">I", frame[:4])
    header, payload = json.loads(frame[4 : 4 + hlen]), frame[4 + hlen :]
    key = data.draw(st.sampled_from([*header, "payload", "extra"]) | st.text(max_size=5))
    header[key] = data.draw(JSON)
    if data.draw(st.booleans()):
        payload = data.draw(st.binary(max_size=64))
        if isinstance(header.get("payload"), dict):
            header["payload"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    raw = json.dumps(header).encode()
    _only_protocol_errors(struct.pack(">I", len(raw)) + raw + payload)
