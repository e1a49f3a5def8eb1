"""The device's logit adjustment (``device_runtime.answer_prior``): label prior -> answer shift, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from device_runtime.answer_prior import (
    LOG_PRIOR_FLOOR,
    answer_shift,
    answer_token_ids,
    first_targets,
    local_answer_shift,
)
from device_runtime.data import LocalDataset, TextEncoder
from device_runtime.errors import ConfigError
from device_runtime.wire import FitConfig
from tests.helpers import RECORDS, TRAINER_MIXTRAL, tiny_checkpoint

WORD_ID = {w: i + 3 for i, w in enumerate(TRAINER_MIXTRAL.words)}  # tiny_checkpoint's WordLevel vocabulary


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> TextEncoder:
    root = tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TRAINER_MIXTRAL)
    return TextEncoder(root / "tokenizer.json", seq_len=16)


def test_shift_is_tau_log_prior_and_the_floor_for_absent_labels():
    ids, bias = answer_shift([10, 11, 12], firsts=[10, 10, 10, 11, 99], tau=0.5)  # 99: not an answer token
    assert ids.tolist() == [10, 11, 12] and ids.dtype == np.int64 and bias.dtype == np.float32
    np.testing.assert_allclose(bias, [0.5 * math.log(3 / 4), 0.5 * math.log(1 / 4), 0.5 * LOG_PRIOR_FLOOR], rtol=1e-6)


def test_no_answer_example_gives_no_shift_and_bad_tau_is_refused():
    assert answer_shift([10, 11], firsts=[99], tau=1.0)[1].tolist() == [0.0, 0.0]
    for tau in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            answer_shift([10, 11], firsts=[10], tau=tau)


def test_answer_ids_are_the_labels_first_tokens(encoder):
    assert answer_token_ids(encoder, ["sport", "business", "tech"]) == [
        WORD_ID[w] for w in ("sport", "business", "tech")
    ]
    with pytest.raises(ConfigError, match="at least two labels"):
        answer_token_ids(encoder, ["sport", "sport"])


def test_local_shift_counts_the_devices_own_labels(encoder):
    records = [RECORDS[0], RECORDS[0], RECORDS[0], RECORDS[1]]  # 3 sport, 1 business, no tech
    dataset = LocalDataset(records, encoder, eval_fraction=0.0)
    assert sorted(first_targets(dataset.train)) == sorted([WORD_ID["sport"]] * 3 + [WORD_ID["business"]])
    ids, bias = local_answer_shift(dataset, ["business", "sport", "tech"], 1.0)
    assert ids.tolist() == [WORD_ID["business"], WORD_ID["sport"], WORD_ID["tech"]]
    np.testing.assert_allclose(bias, [math.log(1 / 4), math.log(3 / 4), LOG_PRIOR_FLOOR], rtol=1e-6)
    assert local_answer_shift(dataset, None, 0.0) is None
    with pytest.raises(ConfigError, match="labels"):
        local_answer_shift(dataset, None, 1.0)


def test_coordinator_config_needs_labels_with_logit_adjustment():
    with pytest.raises(ConfigError, match="labels"):
        CoordinatorConfig(checkpoint="x", fit=FitConfig(logit_adjustment=1.0))
    assert CoordinatorConfig(checkpoint="x", fit={"logit_adjustment": 1.0, "labels": ["a", "b"]}).fit.labels == (
        "a",
        "b",
    )
