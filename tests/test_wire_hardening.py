"""Hostile frames found by probing a real coordinator (issue 10): each raises ProtocolError, never a crash."""

import hashlib
import json
import struct

import numpy as np
import pytest

from device_runtime import wire
from device_runtime.bundle import ShapeKey
from device_runtime.errors import ProtocolError

MAX = 1 << 20
MAX_NUM_EXAMPLES = 1 << 30


def frame(header: str | dict, payload: bytes = b"") -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack(">I", len(raw)) + raw + payload


def code_of(data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        wire.decode(data, max_size=MAX)
    return info.value.code


def _assignment_header(**config) -> tuple[dict, bytes]:
    msg = wire.Assignment(
        round_id=1,
        update_id="u-1",
        model_version=0,
        shape_key=ShapeKey((1,)),
        expert_ids=((0,),),
        config=wire.FitConfig(),
        tensors={"w": np.zeros(2, np.float32)},
    )
    data = wire.encode(msg)
    (hlen,) = struct.unpack(">I", data[:4])
    return json.loads(data[4 : 4 + hlen]), data[4 + hlen :]


@pytest.mark.parametrize("literal", ["1" + "0" * 400, "-" + "9" * 400, "1e999"], ids=["1e400", "-1e400", "1e999"])
def test_huge_number_in_a_float_field_is_bad_header(literal):
    # old code: OverflowError from float(10**400) escaped decode and crashed the connection handler
    update = wire.Update(
        update_id="u-1",
        round_id=1,
        num_examples=1,
        num_tokens=1,
        metrics={},
        routing={},
        trained_experts=((0,),),
        evaluation=wire.EvalResult(loss=1.5, num_examples=1, num_tokens=1),
        tensors={"w": np.zeros(2, np.float32)},
    )
    data = wire.encode(update)
    (hlen,) = struct.unpack(">I", data[:4])
    raw = data[4 : 4 + hlen].decode().replace('"loss":1.5', f'"loss":{literal}')
    assert literal in raw
    assert code_of(frame(raw, data[4 + hlen :])) == "bad_header"
    header, payload = _assignment_header()
    raw = json.dumps(header).replace('"learning_rate": 0.0001', f'"learning_rate": {literal}')
    assert literal in raw
    assert code_of(frame(raw, payload)) == "bad_header"


def test_huge_number_in_the_shape_key_is_bad_header():
    header, payload = _assignment_header()
    raw = json.dumps(header).replace('"experts_per_layer": [1]', '"experts_per_layer": [1e999]')
    assert "1e999" in raw
    assert code_of(frame(raw, payload)) == "bad_header"  # old code: OverflowError from int(inf)


def test_unhashable_safetensors_dtype_is_bad_tensor():
    st = json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    blob = struct.pack("<Q", len(st)) + st + b"\0" * 4
    assert code_of(_update_frame(blob)) == "bad_tensor"  # old code: TypeError (unhashable list)


def _update_frame(blob: bytes, **fields) -> bytes:
    header = {
        "v": wire.PROTOCOL_VERSION,
        "type": "update",
        "update_id": "u",
        "round_id": 0,
        "num_examples": 1,
        "num_tokens": 1,
        "metrics": {},
        "routing": {},
        "trained_experts": [],
        "payload": {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()},
        **fields,
    }
    return frame(header, blob)


@pytest.mark.parametrize(
    "header",
    [
        {"v": wire.PROTOCOL_VERSION, "type": "enroll_ok", "device_id": "d-1\n"},
        {"v": wire.PROTOCOL_VERSION, "type": "bundle_request", "shape_key_id": "experts-1\n"},
        {"v": wire.PROTOCOL_VERSION, "type": "error", "code": "auth\n", "message": "x"},
    ],
)
def test_names_with_a_trailing_newline_are_refused(header):
    assert code_of(frame(header)) == "bad_header"  # old code: "$" matched before the final newline


def test_tensor_and_metric_names_with_a_trailing_newline_are_refused():
    with pytest.raises(ProtocolError) as info:
        wire.tensors_to_bytes({"w\n": np.zeros(1, np.float32)})
    assert info.value.code == "bad_tensor"
    assert code_of(_update_frame(wire.tensors_to_bytes({}), metrics={"loss\n": 1.0})) == "bad_header"


@pytest.mark.parametrize("profile", [[1, 2], "pi", 3, None, {f"k{i}": i for i in range(300)}, {"a": "x" * 20_000}])
def test_profile_must_be_a_small_json_object(profile):
    hello = {
        "v": wire.PROTOCOL_VERSION,
        "type": "hello",
        "device_id": "d-1",
        "protocol_version": wire.PROTOCOL_VERSION,
        "profile": profile,
    }
    assert code_of(frame(hello)) == "bad_header"  # old code: any JSON value (a list crashed `devices`)


def test_num_examples_is_bounded():
    assert (
        wire.decode(_update_frame(wire.tensors_to_bytes({}), num_examples=MAX_NUM_EXAMPLES), max_size=MAX).num_examples
        == MAX_NUM_EXAMPLES
    )
    for bad in (MAX_NUM_EXAMPLES + 1, 2**63 - 1):
        assert code_of(_update_frame(wire.tensors_to_bytes({}), num_examples=bad)) == "bad_header"


def test_peer_error_text_is_printable_and_bounded_before_anyone_logs_it():
    hostile = "boom\n2026-12-01 INFO fake line\r\x1b[31mred\u2028" + "x" * 5000
    msg = wire.decode(
        frame({"v": wire.PROTOCOL_VERSION, "type": "error", "code": "internal", "message": hostile[:2000]}),
        max_size=MAX,
    )
    assert msg.message.isprintable() and msg.message.startswith("boom 2026-12-01 INFO fake line")
    with pytest.raises(ProtocolError) as info:
        wire.expect(msg, wire.AuthOk)
    assert str(info.value).isprintable() and info.value.code == "internal"
    assert len(wire.Error(code="internal", message=hostile).message) <= 2000


def test_free_form_json_numbers_are_bounded():
    # old code: any integer (10**30 here) reached the routing statistics, where float() or numpy overflow
    huge = _update_frame(wire.tensors_to_bytes({}), routing={"usage": [[10**30]]})
    assert code_of(huge) == "bad_header"
    ok = wire.decode(_update_frame(wire.tensors_to_bytes({}), routing={"usage": [[2**63 - 1, 0.5]]}), max_size=MAX)
    assert ok.routing == {"usage": [[2**63 - 1, 0.5]]}


def test_a_zero_dimensional_tensor_keeps_its_shape():
    back = wire.bytes_to_tensors(wire.tensors_to_bytes({"s": np.float32(2.5)}))["s"]
    assert back.shape == () and back == 2.5  # old code: np.ascontiguousarray made it shape (1,)


def test_local_name_checks_refuse_a_trailing_newline(tmp_path):
    # old code: "^...$" with re.match accepted "name\n" in the bundle manifest, the caches and the tensor store
    from coordinator.tensor_store import TensorStore
    from device_runtime.bundle import TensorSpec
    from device_runtime.bundle_cache import BundleCache
    from device_runtime.errors import BundleError, ModelError
    from device_runtime.update_store import UpdateStore

    with pytest.raises(BundleError):
        TensorSpec(name="layers.0.w\n", shape=(1,))
    with pytest.raises(BundleError):
        BundleCache(tmp_path / "bundles").install("experts-1\n", {})
    with pytest.raises(ProtocolError):
        UpdateStore(tmp_path / "updates").discard("u-1\n")
    with pytest.raises(ModelError):
        TensorStore(tmp_path / "tensors").path("a" * 64 + "\n")


def test_an_ack_reason_cannot_forge_device_log_lines():
    """The device logs a rejected update's Ack.reason; old code kept its newlines and escapes verbatim, so a
    coordinator (or a man in the middle on ws://) could write fake lines into the device's log."""
    reason = "bad\n2026-12-01 10:00:00 INFO fedmoe.device: update u accepted\x1b[2J"
    msg = wire.decode(
        frame({"v": wire.PROTOCOL_VERSION, "type": "ack", "update_id": "u", "accepted": False, "reason": reason}),
        max_size=MAX,
    )
    assert msg.reason == "bad 2026-12-01 10:00:00 INFO fedmoe.device: update u accepted [2J"
    assert wire.Ack(update_id="u", accepted=False, reason="a\rb").reason == "a b"
