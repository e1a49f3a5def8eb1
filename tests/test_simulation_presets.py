"""The simulation's presets and how --trainable / --lora-rank / --learning-rate combine with them."""

import pytest

from coordinator.simulation.cli import _with_trainable
from coordinator.simulation.simulate import LEARNING_RATES, PRESETS
from device_runtime.errors import ConfigError


def test_lora_on_the_default_preset_is_rank_8_at_the_lora_rate():
    chosen = _with_trainable(PRESETS["default"], "lora", None, None)
    assert (chosen.trainable_mode, chosen.lora_rank, chosen.learning_rate) == ("lora", 8, LEARNING_RATES["lora"])


def test_switching_the_mode_takes_that_modes_rate_unless_one_is_given():
    from dataclasses import replace

    lora_preset = replace(PRESETS["default"], trainable_mode="lora", lora_rank=8, learning_rate=2e-3)
    experts = _with_trainable(lora_preset, "experts", None, None)
    assert (experts.trainable_mode, experts.lora_rank, experts.learning_rate) == ("experts", 0, 5e-4)
    given = _with_trainable(replace(lora_preset, learning_rate=1e-3), "experts", None, 1e-3)
    assert given.learning_rate == 1e-3
    lora = _with_trainable(PRESETS["smoke"], "lora", 4, None)
    assert (lora.trainable_mode, lora.lora_rank, lora.learning_rate) == ("lora", 4, LEARNING_RATES["lora"])


def test_a_lora_rank_without_lora_is_refused():
    with pytest.raises(ConfigError, match="--lora-rank needs --trainable lora"):
        _with_trainable(PRESETS["smoke"], None, 4, None)


def test_torch_reference_names_are_strategies_with_the_prefix():
    from coordinator.simulation.cli import _strategies

    assert _strategies("hfedmoe", "centralized,hfedmoe,torch-hfedmoe") == ("centralized", "hfedmoe", "torch-hfedmoe")
    with pytest.raises(ConfigError, match="torch-<strategy>"):
        _strategies("hfedmoe", "torch-nosuch")


def test_presets_train_with_the_answer_shift_and_give_the_devices_the_labels(tmp_path):
    from coordinator.simulation.simulate import SimulationPlan, _fit

    plan = SimulationPlan(
        name="x",
        out=tmp_path,
        strategies=("hfedmoe",),
        preset=PRESETS["default"],
        devices=(),
        alpha=1.0,
        seed=0,
        data_file=None,
        text_field="text",
        label_field="label",
        slots=2,
    )
    fit = _fit(plan, ["business", "sport"])
    assert (fit.labels, fit.logit_adjustment) == (("business", "sport"), 1.0)
