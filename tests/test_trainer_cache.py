"""The device keeps its trainer from round to round (``device_runtime.trainer_cache``), on a real tiny bundle
with ONNX Runtime: a kept trainer starts each round from the round's tensors, is rebuilt for other bundle
files, is dropped after a failed round, and a zeroth-order one gives exactly a fresh trainer's update."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from device_runtime.errors import DataError
from device_runtime.fit_round import fit_assignment
from device_runtime.trainer_cache import TrainerCache

pytest.importorskip("onnxruntime.training.api")
pytest.importorskip("torch")
from helpers import tiny_bundle  # noqa: E402
from test_client import assignment_of  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("trainer_cache"), copies=4)


def two_rounds(bundle, data, trainers, *, backend="ort-training"):
    """Round 1 from the bundle's weights, round 2 from round 1's update (as the coordinator would send it)."""
    first = fit_assignment(
        bundle, assignment_of(bundle, "r1-a", local_steps=3), data, threads=1, backend=backend, trainers=trainers
    )
    second = assignment_of(bundle, "r2-a", local_steps=3)
    second = replace(second, round_id=2, tensors={**second.tensors, **first.tensors})
    return first, fit_assignment(bundle, second, data, threads=1, backend=backend, trainers=trainers)


def test_a_kept_trainer_starts_round_two_from_its_assignment_and_carries_adamw_moments(tiny):
    bundle, data = tiny
    kept, fresh = TrainerCache(), TrainerCache(reuse=False)
    _, kept_second = two_rounds(bundle, data, kept)
    _, fresh_second = two_rounds(bundle, data, fresh)
    assert (kept.builds, fresh.builds) == (1, 2)
    # the first loss is the forward at the assignment's tensors: the kept trainer really loaded round 2's
    assert kept_second.metrics["loss_first"] == pytest.approx(fresh_second.metrics["loss_first"], rel=1e-6)
    # later steps differ: AdamW's moments from round 1 carried over (with fresh ones they would be equal)
    assert kept_second.metrics["loss_last"] != pytest.approx(fresh_second.metrics["loss_last"], rel=1e-6)


def test_a_fresh_trainer_every_round_gives_the_same_update_as_a_new_process_would(tiny):
    bundle, data = tiny
    _, a = two_rounds(bundle, data, TrainerCache(reuse=False))
    _, b = two_rounds(bundle, data, None)
    assert set(a.tensors) == set(b.tensors)
    assert all(np.array_equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


def test_other_bundle_files_or_a_failed_round_build_a_new_trainer(tiny, tmp_path):
    bundle, data = tiny
    trainers = TrainerCache()
    fit_assignment(bundle, assignment_of(bundle, local_steps=1), data, threads=1, trainers=trainers)
    other, _ = tiny_bundle(tmp_path / "other", keep=((0, 1), (2, 3)))  # same shape key, other files
    fit_assignment(other, assignment_of(other, local_steps=1), data, threads=1, trainers=trainers)
    assert trainers.builds == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError):
        fit_assignment(other, assignment_of(other, local_steps=1), empty, threads=1, trainers=trainers)
    fit_assignment(other, assignment_of(other, local_steps=1), data, threads=1, trainers=trainers)
    assert trainers.builds == 3


def test_a_kept_zeroth_order_trainer_gives_exactly_a_fresh_trainers_update(tiny):
    bundle, data = tiny
    kept = TrainerCache()
    kept_first, kept_second = two_rounds(bundle, data, kept, backend="zo")
    fresh_first, fresh_second = two_rounds(bundle, data, TrainerCache(reuse=False), backend="zo")
    assert kept.builds == 1
    for kept_update, fresh_update in ((kept_first, fresh_first), (kept_second, fresh_second)):
        assert all(np.array_equal(kept_update.tensors[n], fresh_update.tensors[n]) for n in fresh_update.tensors)


def test_a_trainer_is_kept_only_if_its_data_segment_and_the_updates_wire_copies_fit_the_budget(tiny):
    from device_runtime.memory import status_kib

    bundle, data = tiny
    data_bytes = status_kib("VmData") * 1024
    roomy, tight = TrainerCache(memory_limit_bytes=4 * data_bytes), TrainerCache(memory_limit_bytes=data_bytes // 2)
    for trainers in (roomy, tight):
        two_rounds(bundle, data, trainers)
    assert (roomy.builds, tight.builds) == (1, 2)
