"""Resident and merged frozen experts without a model: the ladder that picks them, the assignment slices that carry
them, and the aggregation of updates whose router rows cover experts the device held frozen (hand-computed).

The graphs themselves (forward equal to the global model's, ORT gradients equal to torch's) are checked in
``tests/test_gradient_parity.py``; one real round of each against the torch reference in
``tests/test_reference_parity.py``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from helpers import EXPERT, ROUTER, make_update, routing, tiny_context, tiny_global

from coordinator.planning import slice_assignment
from coordinator.strategy import FedAvg, HFedMoE
from coordinator.strategy.selection import affordable_fit
from device_runtime.bundle import FROZEN, HELD, Manifest, TensorRole, TensorSpec
from device_runtime.errors import BundleError
from device_runtime.shape_key import ShapeKey, held_experts
from export.planner import TrainingShape, estimate


def test_held_experts_put_the_trained_first_then_the_rest_ascending():
    assert held_experts(((2,), (3, 1)), 4, True) == ((2, 0, 1, 3), (3, 1, 0, 2))
    assert held_experts(((2,), (3, 1)), 4, False) == ((2,), (3, 1))


@pytest.mark.parametrize(
    "key",
    [
        ShapeKey((1, 2)),
        ShapeKey((3,), "lora", 8, True),
        ShapeKey((1, 1), frozen_dtype="float16"),
        ShapeKey((2,), prox=True, frozen_dtype="float16", merged=True),
    ],
)
def test_shape_key_ids_parse_back(key):
    assert ShapeKey.from_id(key.id) == key


def test_shape_key_refuses_bad_ids_and_combinations():
    for text in ("experts", "experts-x", "experts-float32-1", "lora-1", "experts-1.2-merged"):
        with pytest.raises(BundleError):
            ShapeKey.from_id(text)
    with pytest.raises(BundleError, match="experts mode"):
        ShapeKey((1,), "lora", 4, frozen_dtype="float16")
    with pytest.raises(BundleError, match="frozen_dtype"):
        ShapeKey((1,), merged=True)
    assert ShapeKey((1, 3), frozen_dtype="float16").held_label(4) == "3 float16"
    assert ShapeKey((1,), frozen_dtype="float16", merged=True).held_label(4) == "stand-in float16"


def _budget_between(context, low: TrainingShape, high: TrainingShape, kept_low: int, kept_high: int) -> dict:
    """A profile whose budget sits between two estimates."""
    mib = (estimate(context.model, low, kept_low).peak_mib + estimate(context.model, high, kept_high).peak_mib) / 2
    return {"memory_mib": mib, "gflops": 5.0}


def test_the_ladder_resident_then_merged_then_pruned():
    context = replace(tiny_context(), frozen_dtype="float16", merged=True)  # experts large enough to matter:
    context = replace(
        context, model=replace(context.model, hidden=256, intermediate=1024, vocab=64, expert_params=3 * 256 * 1024)
    )
    base = TrainingShape(2, 8)
    resident, merged = replace(base, frozen_dtype="float16"), replace(base, frozen_dtype="float16", merged=True)
    assert estimate(context.model, merged, 1).peak_mib < estimate(context.model, resident, 1).peak_mib
    roomy = _budget_between(context, resident, base, 2, 4)  # resident 2 < budget < all 4 trained < resident 3
    assert affordable_fit(context, context.fit, roomy) == (2, "float16", False)
    tight = _budget_between(context, merged, resident, 1, 1)
    assert affordable_fit(context, context.fit, tight) == (1, "float16", True)
    assert affordable_fit(replace(context, merged=False), context.fit, tight)[1:] == (None, False)  # pruned
    everything = {"memory_mib": estimate(context.model, base, 4).peak_mib + 1, "gflops": 5.0}
    assert affordable_fit(context, context.fit, everything) == (4, None, False)  # nothing left to freeze
    zeroth = {**roomy, "backend": "zo"}
    assert affordable_fit(context, context.fit, zeroth)[1] is None  # forward-only devices are not fed frozen inputs


def _manifest(key: ShapeKey, specs) -> Manifest:
    layers = (0,)
    return Manifest(
        base_model={"id": "t", "sha256": "0"},
        family="mixtral",
        shape_key=key,
        moe_layers=layers,
        num_experts=4,
        experts_per_token=(2,),
        expert_ids=(tuple(range(key.experts_per_layer[0])),),
        tensors=tuple(specs),
        inputs=(),
        outputs=(),
    )


@pytest.mark.parametrize("merged", [False, True])
def test_an_assignment_carries_the_frozen_rows_transposed_in_float16(merged):
    weights = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2) / 7  # (E, out, in)
    gate = np.arange(8, dtype=np.float32).reshape(4, 2)
    key = ShapeKey((1,), frozen_dtype="float16", merged=merged)
    frozen_rows = 1 if merged else 3
    specs = [
        TensorSpec("e.w", (1, 3, 2), layer=0, expert_axis=0, role=TensorRole.EXPERT),
        TensorSpec("g.weight", (4, 2), layer=0, expert_axis=0, rows=HELD, role=TensorRole.ROUTER),
        TensorSpec("frozen_gate_up_0", (frozen_rows, 2, 3), "float16", 0, 0, False, FROZEN, "e.w", True, "expert"),
    ]
    out = slice_assignment({"e.w": weights, "g.weight": gate}, _manifest(key, specs), ((2,),))
    np.testing.assert_array_equal(out["e.w"], weights[[2]])
    np.testing.assert_array_equal(out["g.weight"], gate[[2, 0, 1, 3]])  # local order: trained, then the rest
    rest = weights[[0, 1, 3]]
    want = rest.mean(0, keepdims=True) if merged else rest
    assert out["frozen_gate_up_0"].dtype == np.float16
    np.testing.assert_allclose(out["frozen_gate_up_0"], want.transpose(0, 2, 1), rtol=1e-3)


def _resident_update(cid, n, trained_id, expert_row, gate_rows, usage, s_spec):
    """A resident client of ``tiny_global``'s layout: trains one expert, holds the other three frozen; its router
    rows and routing statistics cover all four in local order (trained first)."""
    held = held_experts(((trained_id,),), 4, True)[0]
    update = make_update(cid, n, (trained_id,), [expert_row], gate_rows, [1, 1], usage=usage[:1], s_spec=s_spec[:1])
    return replace(update, frozen_ids=(held[1:],), routing=(routing(4, usage, s_spec),))


def test_hfedmoe_router_rows_of_resident_and_pruned_clients_by_hand():
    # r: resident, trains expert 2, local order (2, 0, 1, 3); a: pruned, holds and trains 0 and 1 (a 2-row router)
    r = _resident_update(
        "r", 2, 2, [50, 50], [[4, 4], [1, 1], [2, 2], [3, 3]], usage=[0.4, 0.3, 0.2, 0.1], s_spec=[0.8, 0.6, 0.4, 0.2]
    )
    a = make_update("a", 1, (0, 1), [[1, 2], [3, 4]], [[10, 10], [20, 20]], [1, 1], usage=[0.7, 0.3], s_spec=[0.9, 0.5])
    assert r.held_ids(0) == (2, 0, 1, 3) and r.rows(ROUTER) == (2, 0, 1, 3) and r.rows(EXPERT) == (2,)
    out, _, _ = HFedMoE(tau=0.05, lam=0.5).aggregate_fit(1, [r, a], [], tiny_global())
    alpha_r = (0.4 * 0.6 + 0.3 * 0.45 + 0.2 * 0.3 + 0.1 * 0.15) / 4  # sum over all 4 held: u * (u + s) / 2
    alpha_a = (0.7 * 0.8 + 0.3 * 0.4) / 4
    np.testing.assert_allclose(
        out["gate.weight"],
        [
            [(alpha_r * 1 + alpha_a * 10) / (alpha_r + alpha_a)] * 2,  # expert 0: r's local row 1, a's row 0
            [(alpha_r * 2 + alpha_a * 20) / (alpha_r + alpha_a)] * 2,  # expert 1: r's local row 2, a's row 1
            [4, 4],  # expert 2: r only
            [3, 3],  # expert 3: r held it frozen: its row trained
        ],
        rtol=1e-6,
    )
    np.testing.assert_allclose(out["experts.w"], [[1, 2], [3, 4], [50, 50], [30, 30]])  # frozen rows never sent


def test_fedavg_averages_router_rows_over_every_holder_and_expert_rows_over_trainers():
    r = _resident_update("r", 3, 1, [70, 70], [[8, 8], [4, 4], [4, 4], [4, 4]], usage=[0.25] * 4, s_spec=[0.5] * 4)
    out, _, _ = FedAvg().aggregate_fit(
        1, [r, make_update("a", 1, (1, 2), [[1, 1], [2, 2]], [[0, 0], [0, 0]], [0, 0])], [], tiny_global()
    )
    np.testing.assert_allclose(out["gate.weight"], [[4, 4], [6, 6], [3, 3], [4, 4]])  # (3 * 8 + 1 * 0) / 4 for 1
    np.testing.assert_allclose(out["experts.w"], [[0, 0], [(3 * 70 + 1) / 4] * 2, [2, 2], [30, 30]])


def test_an_update_whose_router_does_not_cover_its_held_experts_is_rejected():
    r = _resident_update("r", 2, 2, [5, 5], [[4, 4], [1, 1], [2, 2], [3, 3]], usage=[0.25] * 4, s_spec=[0.5] * 4)
    short = replace(r, tensors={**r.tensors, "gate.weight": r.tensors["gate.weight"][:2]})
    overlapping = replace(r, frozen_ids=((2, 0, 1),))
    for bad, reason in ((short, "gate.weight"), (overlapping, "distinct")):
        _, metrics, _ = FedAvg().aggregate_fit(1, [bad], [], tiny_global())
        assert reason in metrics["rejected"]["r"]
