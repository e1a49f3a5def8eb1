"""The planner sizes a zeroth-order device's expert subset by the forward-only footprint (no gradients,
no AdamW state, no activations kept for a backward), so the same budget holds more experts."""

from __future__ import annotations

import pytest

from coordinator.strategy.selection import training_order
from device_runtime.errors import ConfigError
from export.planner import Budget, ModelShape, TrainingShape, estimate, plan

# SmolLM2-135M upcycled to 4 experts (top-2), first 8 layers: the simulation's default model.
SMOLLM2_8L = ModelShape(
    hidden=576,
    intermediate=1536,
    vocab=49152,
    num_layers=8,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    moe_layers=8,
    num_experts=4,
    experts_per_token=2,
    shared_params=49152 * 576 + 8 * (2 * 576 * 576 + 2 * 576 * 192 + 2 * 576) + 576,
    expert_params=3 * 576 * 1536,
)


def test_a_zeroth_order_step_needs_no_gradient_state_and_less_memory():
    first = estimate(SMOLLM2_8L, TrainingShape(4, 128), 2)
    zeroth = estimate(SMOLLM2_8L, TrainingShape(4, 128, order="zeroth-order"), 2)
    assert zeroth.parts["grad_and_adamw"] == 0 < first.parts["grad_and_adamw"]
    assert zeroth.parts["activations"] < first.parts["activations"]
    assert zeroth.peak_mib < first.peak_mib and zeroth.step_s == pytest.approx(first.step_s * 2 / 3)


def test_the_same_budget_affords_more_experts_to_a_zeroth_order_device():
    budget = Budget(memory_mib=1536, gflops=5.0)  # the default simulation's Raspberry Pi
    first = plan(SMOLLM2_8L, TrainingShape(4, 128), budget).experts_per_layer
    zeroth = plan(SMOLLM2_8L, TrainingShape(4, 128, order="zeroth-order"), budget).experts_per_layer
    assert first < zeroth
    assert training_order({"backend": "zo"}) == "zeroth-order"
    assert training_order({"backend": "ort-training"}) == training_order({}) == "first-order"
    with pytest.raises(ConfigError, match="order must be one of"):
        TrainingShape(order="second-order")


def test_simulation_profiles_give_devices_a_backend():
    from coordinator.simulation.profiles import load_profiles, parse_profiles

    text = """
[[device]]
kind = "raspberry-pi"
memory_mib = 1536
backend = "zo"
count = 2

[[device]]
kind = "laptop"
memory_mib = 8192
"""
    devices = parse_profiles(text)
    assert [(d.name, d.backend) for d in devices] == [
        ("raspberry-pi-0", "zo"),
        ("raspberry-pi-1", "zo"),
        ("laptop-2", ""),
    ]
    with pytest.raises(ConfigError, match="backend 'sgd'"):
        parse_profiles(text.replace('"zo"', '"sgd"'))
    assert all(d.backend == "" for d in load_profiles(None, num_devices=3))
