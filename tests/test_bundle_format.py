"""The bundle manifest's format: every tensor carries its role, and a manifest of another format version is refused
with the next step (the device) or written again (the coordinator's bundle cache)."""

from __future__ import annotations

import json
import os

import pytest

from device_runtime.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    ShapeKey,
    TensorRole,
    TensorSpec,
    tensor_role,
)
from device_runtime.errors import BundleError

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
ROUTER = "model.layers.0.mlp.gate.weight"
LORA_A = "model.layers.0.mlp.experts.gate_up_lora_A"


def manifest() -> Manifest:
    return Manifest(
        base_model={"id": "m", "sha256": "0" * 64},
        family="mixtral",
        shape_key=ShapeKey((2,)),
        moe_layers=(0,),
        num_experts=4,
        experts_per_token=(2,),
        expert_ids=((0, 3),),
        tensors=(
            TensorSpec(GATE_UP, (2, 6, 4), layer=0, expert_axis=0, role=TensorRole.EXPERT),
            TensorSpec(ROUTER, (2, 4), layer=0, expert_axis=0, role=TensorRole.ROUTER),
        ),
        inputs=("input_ids",),
        outputs=("loss",),
    )


def test_roles_survive_the_manifest_round_trip():
    parsed = Manifest.from_json(manifest().to_json())
    assert [t.role for t in parsed.tensors] == [TensorRole.EXPERT, TensorRole.ROUTER]
    assert json.loads(manifest().to_json())["tensors"][1]["role"] == "router"


def test_a_manifest_of_another_format_version_names_the_next_step():
    data = json.loads(manifest().to_json())
    data["format_version"] = FORMAT_VERSION - 1
    with pytest.raises(BundleError, match="upgrade fedmoe on the device or re-export the bundle"):
        Manifest.from_json(json.dumps(data))


def test_a_tensor_without_a_role_is_a_malformed_manifest():
    data = json.loads(manifest().to_json())
    del data["tensors"][0]["role"]
    with pytest.raises(BundleError, match="malformed manifest"):
        Manifest.from_json(json.dumps(data))
    data["tensors"][0]["role"] = "attention"
    with pytest.raises(BundleError, match="malformed manifest"):
        Manifest.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "spec",
    [
        dict(layer=0, expert_axis=0),  # SHARED (the default) with an expert axis
        dict(layer=0, role=TensorRole.EXPERT),  # an indexed role without an expert axis
        dict(expert_axis=0, role=TensorRole.ROUTER),  # ... or without a layer
    ],
)
def test_a_role_and_its_expert_axis_must_agree(spec):
    with pytest.raises(BundleError, match="indexed by expert"):
        TensorSpec("t.w", (2, 2), **spec)


def test_roles_by_name():
    assert [tensor_role(n) for n in (GATE_UP, ROUTER, LORA_A)] == [
        TensorRole.EXPERT,
        TensorRole.ROUTER,
        TensorRole.LORA,
    ]


def test_the_coordinator_writes_again_a_bundle_of_an_older_format(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from helpers import COORD_MIXTRAL, tiny_checkpoint

    from coordinator.planning import BundleStore
    from device_runtime.wire import FitConfig

    monkeypatch.setenv("FEDMOE_CACHE", str(tmp_path / "cache"))
    cache = BundleStore(tmp_path / "bundles", tiny_checkpoint(tmp_path / "ckpt", COORD_MIXTRAL), FitConfig())
    key = ShapeKey((2, 2))
    cache.ensure(key)
    path = tmp_path / "bundles" / key.id / MANIFEST
    data = json.loads(path.read_text())
    data["format_version"] = FORMAT_VERSION - 1
    path.write_text(json.dumps(data))
    fresh = BundleStore(cache.root, cache.checkpoint, FitConfig()).ensure(key)
    assert fresh.format_version == FORMAT_VERSION
    assert json.loads(path.read_text())["format_version"] == FORMAT_VERSION


def test_the_coordinator_writes_a_rounds_bundles_in_one_child_process_and_never_imports_torch(tmp_path):
    """The export (torch, ONNX) runs in a child process that ends with it: a serving coordinator's memory stays
    free of both (``bench/bench_connections.py``, 1000 devices, 3 rounds of 100: RSS after the rounds 676 MiB when
    the export ran in process, 305 MiB since). A round's new bundles share one child (its start and torch import
    cost ~6 s)."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    from helpers import COORD_MIXTRAL, tiny_checkpoint

    checkpoint = tiny_checkpoint(tmp_path / "ckpt", COORD_MIXTRAL)
    code = (
        "import sys\n"
        "import coordinator.planning as planning\n"
        "from device_runtime.bundle import ShapeKey\n"
        "from device_runtime.wire import FitConfig\n"
        "children, spawn = [], planning._in_child_process\n"
        "planning._in_child_process = lambda *a: children.append(a) or spawn(*a)\n"
        f"store = planning.BundleStore({str(tmp_path / 'bundles')!r}, {str(checkpoint)!r}, FitConfig())\n"
        "manifests = store.ensure_all([ShapeKey((2, 2)), ShapeKey((1, 1)), ShapeKey((2, 2))])\n"
        "assert [m.shape_key for m in manifests.values()] == [ShapeKey((2, 2)), ShapeKey((1, 1))]\n"
        "assert store.ensure(ShapeKey((1, 1))).shape_key == ShapeKey((1, 1))\n"
        "assert len(children) == 1, children\n"
        "assert 'torch' not in sys.modules, 'the coordinator imported torch'\n"
    )
    env = {**os.environ, "FEDMOE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for key in (ShapeKey((2, 2)), ShapeKey((1, 1))):
        assert (tmp_path / "bundles" / key.id / MANIFEST).is_file()
