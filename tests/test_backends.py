"""Training backends on a real tiny bundle: the registry's choice, the zeroth-order (MeZO) trainer on the
bundle's eval graph against ORT training's own forward, its step algebra and the seeded directions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from device_runtime.bundle import TOKENIZER_FILE
from device_runtime.data import LocalDataset
from device_runtime.errors import ConfigError
from device_runtime.zo_directions import direction, perturb

pytest.importorskip("onnxruntime.training.api")
pytest.importorskip("torch")
from helpers import SEQ_LEN, tiny_bundle  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A verified tiny bundle (experts (0, 2) and (1, 3) of 4 per layer), its dataset and data file."""
    bundle, data = tiny_bundle(tmp_path_factory.mktemp("backends"))
    dataset = LocalDataset.from_jsonl(data, bundle.path(TOKENIZER_FILE), seq_len=SEQ_LEN, eval_fraction=0.0)
    return bundle, dataset, data


def test_registry_prefers_first_order_and_honours_the_override(monkeypatch):
    from device_runtime.backends import ENV_BACKEND, available_backends, select_backend

    monkeypatch.delenv(ENV_BACKEND, raising=False)
    assert available_backends() == ("ort-training", "zo", "split")
    assert select_backend().name == "ort-training"
    assert select_backend("zo").order == "zeroth-order"
    assert select_backend("split").order == "hybrid-order"
    monkeypatch.setenv(ENV_BACKEND, "zo")
    assert select_backend().name == "zo"
    with pytest.raises(ConfigError, match="unknown training backend 'sgd'"):
        select_backend("sgd")


def test_profile_reports_available_and_chosen_backend_and_reads_old_profiles():
    from device_runtime.profile import DeviceProfile, collect_profile

    profile = collect_profile(benchmark_seconds=0.01, backend="zo")
    assert profile.backends == ("ort-training", "zo", "split") and profile.backend == "zo"
    assert DeviceProfile.from_dict(profile.to_dict()) == profile
    old = {k: v for k, v in profile.to_dict().items() if k != "backend"}
    assert DeviceProfile.from_dict(old).backend == ""


def test_zo_forward_equals_ort_training_forward(tiny):
    """Plain-inference forward with frozen weights read from the ORT checkpoint == ORT training's eval."""
    from device_runtime.ort_trainer import OrtTrainer
    from device_runtime.zo_trainer import ZoTrainer

    bundle, dataset, _ = tiny
    batches = list(dataset.train_batches(2, epochs=1))
    ort = OrtTrainer(bundle, threads=1, progress=False).evaluate(batches).loss
    zo = ZoTrainer(bundle, threads=1, progress=False).evaluate(batches).loss
    assert zo == pytest.approx(ort, rel=1e-5)


def test_zo_step_moves_theta_along_the_seeded_direction_only(tiny):
    """One MeZO step: theta_1 - theta_0 = -lr * g * z(s) (restore exact), frozen tensors untouched."""
    from device_runtime.zo_trainer import ZoTrainer

    bundle, dataset, _ = tiny
    trainer = ZoTrainer(bundle, threads=1, progress=False, seed=7)
    before = trainer.get_parameters()
    trainer.fit(dataset.train_batches(2), steps=1, learning_rate=1e-2)
    after = trainer.get_parameters()
    names = list(bundle.manifest.trainable_names)
    seed = int(np.random.default_rng(7).integers(2**63))
    z = direction([before[n].shape for n in names], seed)
    deltas = [after[n] - before[n] for n in names]
    coef = float(np.dot(deltas[0].ravel(), z[0].ravel()) / np.dot(z[0].ravel(), z[0].ravel()))
    assert coef != 0.0
    for delta, zi in zip(deltas, z):
        np.testing.assert_allclose(delta, coef * zi, atol=2e-6)
    frozen = [n for n in before if n not in names]
    assert all(np.array_equal(before[n], after[n]) for n in frozen)


def test_zo_fit_lowers_the_loss_with_forwards_only(tiny):
    from device_runtime.zo_trainer import ZoTrainer

    bundle, dataset, _ = tiny
    trainer = ZoTrainer(bundle, threads=1, progress=False)
    batches = list(dataset.train_batches(2, epochs=1))
    before = trainer.evaluate(batches).loss
    result = trainer.fit(dataset.train_batches(2), steps=150, learning_rate=1e-2)
    assert trainer.evaluate(batches).loss < before - 0.1
    assert result.num_examples == 300 and len(result.losses) == 150
    assert result.trained_experts == ((0, 1), (0, 1))


def test_fit_assignment_with_the_zo_backend_reports_a_zeroth_order_update(tiny):
    from device_runtime.fit_round import fit_assignment
    from device_runtime.wire import Assignment, FitConfig
    from device_runtime.zo_trainer import ZoTrainer

    bundle, _, data = tiny
    weights = ZoTrainer(bundle, progress=False).get_parameters()
    assignment = Assignment(
        update_id="u-zo",
        round_id=1,
        model_version=0,
        shape_key=bundle.manifest.shape_key,
        expert_ids=bundle.manifest.expert_ids,
        config=FitConfig(batch_size=2, seq_len=SEQ_LEN, local_steps=3, learning_rate=1e-2),
        tensors=dict(weights),
    )
    update = fit_assignment(bundle, assignment, data, threads=1, backend="zo")
    assert update.metrics["zeroth_order"] == 1.0 and update.metrics["steps"] == 3.0
    assert set(update.tensors) == set(bundle.manifest.trainable_names)
    assert all(not np.array_equal(update.tensors[n], weights[n]) for n in update.tensors)


def test_directions_are_seeded_chunk_invariant_and_unit_variance(monkeypatch):
    import device_runtime.zo_directions as zd

    shapes = [(3, 5), (70_000,)]
    a = direction(shapes, 11)
    monkeypatch.setattr(zd, "CHUNK", 1024)
    b = direction(shapes, 11)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], direction(shapes, 12)[1])
    assert set(np.unique(a[1])) == {-1.0, 1.0} and abs(a[1].mean()) < 0.02
    g = direction(shapes, 11, distribution="gaussian")[1]
    assert abs(g.std() - 1.0) < 0.02
    theta = [np.ones(shape, np.float32) for shape in shapes]
    perturb(theta, 11, 0.5)
    perturb(theta, 11, -0.5)
    assert all(np.array_equal(t, np.ones_like(t)) for t in theta)
    with pytest.raises(ConfigError, match="writable C-contiguous float32"):
        perturb([np.ones(4)], 1, 1.0)


@pytest.mark.parametrize("backend", ["ort-training", "zo"])
def test_fit_assignment_scores_the_received_model_on_a_held_out_split_before_training(tiny, tmp_path, backend):
    """Federated evaluation (issue 20 item 4): ``eval_fraction`` of the records are held out by a fixed seed (the
    same ones whatever the round's seed), never trained on, and the Update carries the loss of the ASSIGNED
    weights on them (the value a fresh trainer computes on those weights), for first- and zeroth-order devices."""
    import itertools
    import json

    from device_runtime.data import EVAL_SPLIT_SEED, format_example, split_train_eval
    from device_runtime.fit_round import fit_assignment, round_dataset
    from device_runtime.ort_trainer import OrtTrainer
    from device_runtime.wire import Assignment, FitConfig

    bundle, _, _ = tiny
    records = [
        {"text": " ".join(words), "label": "sport" if i % 2 else "tech"}
        for i, words in enumerate(itertools.permutations(["match", "team", "won", "film"]))
    ]  # 24 records, each a distinct token sequence
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = FitConfig(batch_size=2, seq_len=SEQ_LEN, local_steps=0, learning_rate=1e-2, eval_fraction=0.25, seed=5)
    tokenizer = bundle.path(TOKENIZER_FILE)
    dataset = round_dataset(data, tokenizer, config)
    held = {tuple(ids) for ids, _ in dataset.eval}
    assert len(dataset.eval) == 6 and len(held) == 6 and len(dataset.train) == 18
    assert held.isdisjoint(tuple(ids) for ids, _ in dataset.train)
    other_round = round_dataset(data, tokenizer, FitConfig(seq_len=SEQ_LEN, eval_fraction=0.25, seed=6))
    assert {tuple(ids) for ids, _ in other_round.eval} == held  # the same held-out records every round
    _, expected = split_train_eval(list(range(24)), eval_fraction=0.25, seed=EVAL_SPLIT_SEED)
    assert held == {tuple(dataset.encoder.encode(*format_example(records[i]))[0]) for i in expected}

    weights = OrtTrainer(bundle, threads=1, progress=False).get_parameters()
    before = OrtTrainer(bundle, threads=1, progress=False).evaluate(dataset.eval_batches(2))
    assignment = Assignment(
        update_id=f"u-eval-{backend}",
        round_id=1,
        model_version=0,
        shape_key=bundle.manifest.shape_key,
        expert_ids=bundle.manifest.expert_ids,
        config=config,
        tensors=dict(weights),
    )
    update = fit_assignment(bundle, assignment, data, threads=1, backend=backend)
    assert update.evaluation is not None
    assert update.evaluation.num_examples == 6 and update.evaluation.num_tokens == before.num_tokens
    assert update.evaluation.loss == pytest.approx(before.loss, rel=1e-4)
    assert update.evaluation.accuracy is None  # the device graphs output losses only
    assert update.num_examples == 18 and update.metrics["steps"] == 9.0  # one epoch of the train split only
    assert update.metrics["eval_seconds"] >= 0

    no_eval = dataclasses.replace(
        assignment, update_id="u-no-eval", config=dataclasses.replace(config, eval_fraction=0)
    )
    no_eval = dataclasses.replace(no_eval, tensors=dict(weights))
    update = fit_assignment(bundle, no_eval, data, threads=1, backend=backend)
    assert update.evaluation is None and update.num_examples == 24 and "eval_seconds" not in update.metrics
