"""Wire protocol: every message round-trips; every malformed frame fails with its stable code."""

import hashlib
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

from device_runtime import wire as p
from device_runtime.bundle import ShapeKey
from device_runtime.errors import ProtocolError
from device_runtime.wire.framing import FRAGMENT_BYTES

MAX = 1 << 20
V = p.PROTOCOL_VERSION
SK = ShapeKey((2, 1), prox=True)
W = {
    "layers.0.mlp.experts.down_proj": np.arange(12, dtype=np.float32).reshape(2, 3, 2) / 7,
    "layers.0.mlp.gate.weight": np.full((2, 4), -1.5, dtype=np.float16),
}

MESSAGES = [
    p.Enroll(
        token="tok-abc_123", name="pi-4", profile={"memory_mb": 2048, "cpu": {"cores": 4}}, public_key=b"\x01" * 32
    ),
    p.EnrollOk(device_id="d-1f2e"),
    p.Hello(device_id="d-1f2e", protocol_version=1, profile={"os": "linux", "ram": 3.5}),
    p.Challenge(nonce=bytes(range(32))),
    p.Auth(device_id="d-1f2e", signature=bytes(range(64))),
    p.AuthOk(),
    p.Assignment(
        round_id=3,
        update_id="r3-d-1f2e",
        model_version=2,
        shape_key=SK,
        expert_ids=((4, 0), (7,)),
        config=p.FitConfig(
            batch_size=4,
            learning_rate=3e-4,
            prox_mu=0.01,
            routing_prior=((0.25, 0.75), (1.0, 0.0)),
            update_dtype="float16",
        ),
        tensors=W,
    ),
    p.BundleRequest(shape_key_id=SK.id),
    p.BundleData(
        shape_key_id=SK.id,
        name="sub/training_model.onnx",
        offset=8,
        total_size=20,
        sha256="ab" * 32,
        more=True,
        data=b"\x00\xffpayload",
    ),
    p.Update(
        update_id="r3-d-1f2e",
        round_id=3,
        num_examples=40,
        num_tokens=5120,
        metrics={"loss": 2.5, "train_seconds": 12},
        routing={"usage": [[0.5, 0.5], [1.0]]},
        trained_experts=((4, 0), (7,)),
        tensors=W,
    ),
    p.Ack(update_id="r3-d-1f2e", accepted=False, reason="norm bound"),
    p.Update(
        update_id="r3-d-2f2e",
        round_id=3,
        num_examples=36,
        num_tokens=4608,
        metrics={"loss": 2.5},
        routing={"usage": [[0.5, 0.5], [1.0]]},
        trained_experts=((4,), ()),
        evaluation=p.EvalResult(loss=3.25, num_examples=4, num_tokens=512, accuracy=0.5),
        tensors=W,
    ),
    p.SmashedData(
        update_id="r3-d-3f2e",
        round_id=3,
        step=2,
        channels=(0, 5, 9),
        tensors={
            "smashed": np.ones((2, 4, 3), np.float16),
            "attention_mask": np.ones((2, 4), np.int32),
            "labels": np.full((2, 4), -100, np.int32),
        },
    ),
    p.CutGradient(
        update_id="r3-d-3f2e", round_id=3, step=2, loss=1.5, tensors={"gradient": np.ones((2, 4, 16), np.float16)}
    ),
    p.SplitScalars(update_id="r3-d-3f2e", round_id=3, step=2, scalars=(0.5, -1.25)),
    p.SplitStep(update_id="r3-d-3f2e", round_id=3, first_step=1, scalars=((0.5, -1.25), (2.0, 0.0))),
    p.Heartbeat(),
    p.Error(code="bad_tensor", message="tensor x: shape (2,) != expected (3,)"),
    p.SecAggStart(
        round_id=3, update_id="r3-d-1f2e", weighting="examples", max_weight=80, clip=0, clip_range=1.0, min_holders=2
    ),
    p.SecAggKeys(round_id=3, update_id="r3-d-1f2e", cipher_key=b"c" * 32, mask_key=b"m" * 32),
    p.SecAggRoster(
        round_id=3,
        update_id="r3-d-1f2e",
        threshold=2,
        participants=(
            p.Participant("d-a", b"c" * 32, b"m" * 32, ((4, 0), (7,)), ((4, 0), (7,))),
            p.Participant("d-b", b"C" * 32, b"M" * 32, ((4,), (7,)), ((4, 1), (7, 2))),
        ),
    ),
    p.SecAggShares(round_id=3, update_id="r3-d-1f2e", shares=(p.SealedShare("d-b", bytes(range(92))),)),
    p.SecAggInbox(round_id=3, update_id="r3-d-1f2e", shares=(p.SealedShare("d-a", bytes(range(92))),)),
    p.SecAggMasked(
        round_id=3,
        update_id="r3-d-1f2e",
        metrics={"loss": 2.5},
        routing={"usage": [[0.5, 0.5], [1.0]]},
        trained_experts=((4,), ()),
        data=bytes(range(64)),
    ),
    p.SecAggUnmask(round_id=3, update_id="r3-d-1f2e", survivors=("d-a",), dropped=("d-b",)),
    p.SecAggReveal(
        round_id=3,
        update_id="r3-d-1f2e",
        shares=(p.RevealedShare("d-a", "self", b"s" * 32), p.RevealedShare("d-b", "mask", b"k" * 32)),
    ),
]


EVALUATED = next(i for i, m in enumerate(MESSAGES) if getattr(m, "evaluation", None) is not None)


def frame(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack(">I", len(raw)) + raw + payload


def code_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        p.decode(data, max_size=kwargs.pop("max_size", MAX), **kwargs)
    return info.value.code


def test_every_message_type_is_covered():
    assert {type(m) for m in MESSAGES} == set(p.MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.TYPE)
def test_round_trip(msg):
    back = p.decode(p.encode(msg), max_size=MAX)
    assert type(back) is type(msg) and back == msg
    if msg.PAYLOAD == "tensors":
        assert set(back.tensors) == set(msg.tensors)
        for name, array in msg.tensors.items():
            assert back.tensors[name].dtype == array.dtype
            np.testing.assert_array_equal(back.tensors[name], array)


def test_frame_layout_is_length_prefixed_json_then_payload():
    data = p.encode(MESSAGES[8])  # BundleData
    (hlen,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4 : 4 + hlen])
    assert header["v"] == p.PROTOCOL_VERSION and header["type"] == "bundle_data"
    assert data[4 + hlen :] == b"\x00\xffpayload"
    assert header["payload"] == {"size": 9, "sha256": hashlib.sha256(b"\x00\xffpayload").hexdigest()}


def test_expected_tensors_match_and_mismatch():
    data = p.encode(MESSAGES[9])
    shapes = {name: a.shape for name, a in W.items()}
    assert set(p.decode(data, max_size=MAX, expected_tensors=shapes).tensors) == set(W)
    wrong_shape = {**shapes, "layers.0.mlp.gate.weight": (4, 2)}
    assert code_of(data, expected_tensors=wrong_shape) == "bad_tensor"
    assert code_of(data, expected_tensors={**shapes, "extra": (1,)}) == "bad_tensor"
    assert code_of(data, expected_tensors={"layers.0.mlp.gate.weight": (2, 4)}) == "bad_tensor"


def test_float16_on_the_wire_halves_bytes_and_upcasts():
    x = {"w": np.linspace(-2, 2, 1000, dtype=np.float32)}
    full, half = p.tensors_to_bytes(x), p.tensors_to_bytes(x, wire_dtype="float16")
    assert len(full) - len(half) == 2000
    back = p.to_float32(p.bytes_to_tensors(half))["w"]
    assert back.dtype == np.float32 and np.max(np.abs(back - x["w"])) <= 2**-10
    with pytest.raises(ProtocolError, match="overflows") as info:
        p.tensors_to_bytes({"w": np.array([7e4], np.float32)}, wire_dtype="float16")
    assert info.value.code == "bad_tensor"


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "bad_frame"),
        (b"\x00\x00", "bad_frame"),  # truncated header length
        (struct.pack(">I", 50) + b'{"v":1}', "bad_frame"),  # header length beyond the data
        (struct.pack(">I", p.MAX_HEADER_BYTES + 1) + b"{}", "too_large"),
        (struct.pack(">I", 5) + b"{nope", "bad_header"),  # invalid JSON
        (struct.pack(">I", 2) + b"\xff\xfe", "bad_header"),  # invalid UTF-8
        (frame([1, 2]), "bad_header"),  # not an object
        (frame({"type": "heartbeat"}), "bad_header"),  # no version
        (frame({"v": p.PROTOCOL_VERSION + 1, "type": "heartbeat"}), "version"),
        (frame({"v": V, "type": "shutdown"}), "unknown_type"),
        (frame({"v": V}), "unknown_type"),
        (frame({"v": V, "type": "heartbeat", "extra": 1}), "bad_header"),  # unknown field
        (frame({"v": V, "type": "ack", "update_id": "u", "accepted": 1}), "bad_header"),  # wrong type
        (frame({"v": V, "type": "enroll_ok"}), "bad_header"),  # missing field
        (frame({"v": V, "type": "enroll_ok", "device_id": "../etc"}), "bad_header"),
        (frame({"v": V, "type": "enroll_ok", "device_id": ".."}), "bad_header"),
        (frame({"v": V, "type": "challenge", "nonce": "AAAA"}), "bad_header"),  # nonce not 32 bytes
        (frame({"v": V, "type": "heartbeat"}, b"x"), "bad_frame"),  # payload where none belongs
        (struct.pack(">I", 37) + b'{"v":%d,"type":"ack","loss":NaN,"x":1}' % V, "bad_header"),
    ],
)
def test_malformed_frames(data, code):
    assert code_of(data) == code


def test_non_finite_metric_and_bad_config_rejected():
    update = p.encode(MESSAGES[9])
    (hlen,) = struct.unpack(">I", update[:4])
    header, payload = json.loads(update[4 : 4 + hlen]), update[4 + hlen :]
    header["metrics"]["loss"] = 1e999  # parses as inf
    assert code_of(frame(header, payload)) == "bad_header"
    assignment = p.encode(MESSAGES[6])
    (hlen,) = struct.unpack(">I", assignment[:4])
    header, payload = json.loads(assignment[4 : 4 + hlen]), assignment[4 + hlen :]
    for key, value in [("batch_size", 0), ("learning_rate", -1.0), ("update_dtype", "int8")]:
        bad = {**header, "config": {**header["config"], key: value}}
        assert code_of(frame(bad, payload)) == "bad_header", key
    assert code_of(frame({**header, "expert_ids": [[4, 0], [7, 1]]}, payload)) == "bad_header"  # != shape key


@pytest.mark.parametrize(
    "field, value",
    [("loss", 1e999), ("loss", -0.5), ("loss", 1e6), ("num_examples", 0), ("num_tokens", -1), ("accuracy", 1.5)],
)
def test_an_evaluation_out_of_bounds_is_bad_header(field, value):
    """Federated evaluation numbers come from the network: finite, loss in [0, MAX_EVAL_LOSS], accuracy in [0, 1],
    at least one example."""
    data = p.encode(MESSAGES[EVALUATED])
    (hlen,) = struct.unpack(">I", data[:4])
    header, payload = json.loads(data[4 : 4 + hlen]), data[4 + hlen :]
    assert header["evaluation"]["loss"] == 3.25
    assert p.decode(frame(header, payload), max_size=MAX).evaluation == MESSAGES[EVALUATED].evaluation
    bad = {**header, "evaluation": {**header["evaluation"], field: value}}
    assert code_of(frame(bad, payload)) == "bad_header"


def test_oversized_frame():
    data = p.encode(MESSAGES[9])
    assert code_of(data, max_size=len(data) - 1) == "too_large"
    assert p.decode(data, max_size=len(data)).TYPE == "update"


def _with_payload(payload: bytes, *, declared: dict | None = None) -> bytes:
    header = {
        "v": V,
        "type": "update",
        "update_id": "u",
        "round_id": 0,
        "num_examples": 1,
        "num_tokens": 1,
        "metrics": {},
        "routing": {},
        "trained_experts": [],
        "payload": declared or {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()},
    }
    return frame(header, payload)


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_payload_sha_and_size_mismatch():
    good = p.tensors_to_bytes(W)
    assert p.decode(_with_payload(good), max_size=MAX).TYPE == "update"
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    assert (
        code_of(_with_payload(tampered, declared={"size": len(good), "sha256": hashlib.sha256(good).hexdigest()}))
        == "bad_payload"
    )
    assert (
        code_of(_with_payload(good, declared={"size": len(good) + 1, "sha256": hashlib.sha256(good).hexdigest()}))
        == "bad_payload"
    )
    assert code_of(_with_payload(good, declared={"size": len(good)})) == "bad_header"


@pytest.mark.parametrize(
    "header, data",
    [
        ({"bad name!": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        ({"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
        ({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        ({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}, b"\0" * 4),  # shape beyond bytes
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),  # offsets beyond data
        (
            {
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
        ),  # overlap
        ({"w": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 4]}}, b"\0" * 4),
        ({"w": [1, 2]}, b""),
    ],
)
def test_bad_tensors(header, data):
    assert code_of(_with_payload(_safetensors(header, data))) == "bad_tensor"


def test_tensors_to_bytes_rejects_bad_names_and_dtypes():
    for tensors in ({"a/b": np.zeros(1, np.float32)}, {"w": np.zeros(1, np.float64)}, {"w": np.zeros(1, np.int64)}):
        with pytest.raises(ProtocolError) as info:
            p.tensors_to_bytes(tensors)
        assert info.value.code == "bad_tensor"


def test_expect():
    assert p.expect(p.AuthOk(), p.AuthOk) == p.AuthOk()
    with pytest.raises(ProtocolError) as info:
        p.expect(p.Heartbeat(), p.Challenge, p.AuthOk)
    assert info.value.code == "unexpected"
    with pytest.raises(ProtocolError, match="revoked") as info:
        p.expect(p.Error(code="auth", message="device revoked"), p.AuthOk)
    assert info.value.code == "auth"


def test_bundle_chunks_reassemble_across_messages(tmp_path):
    files = {"training_model.onnx": bytes(range(256)) * 5, "empty.txt": b"", "manifest.json": b"{}"}
    chunks = list(p.bundle_chunks("experts-2.1", files, chunk_bytes=100))
    assert len(chunks) == 13 + 1 + 1 and [c.more for c in chunks].count(False) == 1 and not chunks[-1].more
    assembler = p.BundleAssembler("experts-2.1", tmp_path, max_total_bytes=2000)
    results = [assembler.add(p.decode(p.encode(c), max_size=MAX)) for c in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert {name: path.read_bytes() for name, path in results[-1].items()} == files


def _assemble(chunks, max_total_bytes=10_000):
    directory = Path(tempfile.mkdtemp())
    assembler = p.BundleAssembler("k", directory, max_total_bytes=max_total_bytes)
    with pytest.raises(ProtocolError) as info:
        for chunk in chunks:
            assembler.add(chunk)
    assert not directory.exists()  # partial files deleted
    return info.value.code


def test_bundle_assembler_rejects_bad_sequences():
    files = {"a.onnx": b"x" * 250, "b.onnx": b"y" * 10}
    chunks = list(p.bundle_chunks("k", files, chunk_bytes=100))
    assert _assemble(chunks, max_total_bytes=259) == "too_large"
    assert _assemble([chunks[0], chunks[2]]) == "unexpected"  # gap
    assert _assemble([chunks[0], chunks[3]]) == "unexpected"  # next file before this one is complete
    assert _assemble(chunks[:3] + chunks[:1]) == "unexpected"  # file sent twice
    assert _assemble(list(p.bundle_chunks("other", files))) == "unexpected"
    corrupt = chunks[2].__class__(**{**chunks[2].__dict__, "data": b"z" * 50})
    assert _assemble([*chunks[:2], corrupt]) == "bad_payload"
    early_end = chunks[1].__class__(**{**chunks[1].__dict__, "more": False})
    assert _assemble([chunks[0], early_end]) == "bad_frame"
    escape = chunks[0].__class__(**{**chunks[0].__dict__, "name": "../a.onnx"})
    assert _assemble([escape]) == "bad_header"


@pytest.mark.parametrize("msg", [m for m in MESSAGES if m.SIGNED], ids=lambda m: m.TYPE)
def test_every_signed_message_verifies_for_its_device_only(msg):
    """Signed with the coordinator's ECDSA key for one device, each SIGNED type (with or without a payload) verifies
    for that device, and is refused for another or with a changed field."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from device_runtime.signing import Signer, Verifier

    key = ec.generate_private_key(ec.SECP256R1())
    signer, verifier = Signer(key), Verifier(key.public_key())
    data = p.encode(msg, sign=signer.assignment("d-a"))
    assert p.decode(data, max_size=MAX, verify=verifier.assignment("d-a")) == msg
    assert code_of(data, verify=verifier.assignment("d-b")) == "bad_signature"
    tampered = data.replace(b'"round_id":3', b'"round_id":4')
    assert tampered != data and code_of(tampered, verify=verifier.assignment("d-a")) == "bad_signature"


def test_fragments_are_views_of_the_frame_no_larger_than_the_cap():
    """What a device sends: the frame of ``encode`` in views of at most FRAGMENT_BYTES (websockets copies each frame
    it sends twice, so a whole-update frame cost a 1.5 GiB Pi 2 x 85 MB at once: it ran out of memory re-sending its
    masked update)."""
    data = bytes(range(256)) * 10_000  # 2.56 MB, three fragments of 1 MiB and one short
    msg = p.SecAggMasked(round_id=1, update_id="u1", metrics={}, routing={}, trained_experts=(), data=data)
    parts = p.encode_parts(msg)
    pieces = list(p.fragments(parts))
    assert b"".join(pieces) == p.encode(msg)
    assert max(map(len, pieces)) == FRAGMENT_BYTES
    assert len(pieces) == 2 + -(-len(data) // FRAGMENT_BYTES)  # the header's length, the header, the payload's slices
    assert any(piece.obj is data for piece in pieces)  # a view of the message's own bytes, not a copy
