"""The device's ORT trainer on a real tiny bundle: trains without torch, loads weights by name, rejects
corrupted bundles before training.

The bundles are written by ``export.bundle_writer`` from a tiny random Mixtral (torch runs here, in the
test process); the training itself runs in subprocesses that must never load torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from device_runtime.bundle import WEIGHTS_FILE, load_bundle
from device_runtime.data import LocalDataset, TextEncoder
from device_runtime.errors import BundleError, BundleIntegrityError, ConfigError, DataError

pytest.importorskip("onnxruntime.training.api")
torch = pytest.importorskip("torch")
from helpers import RECORDS, SEQ_LEN, TRAINER_MIXTRAL, tiny_checkpoint  # noqa: E402

KEEP_A, KEEP_B = ((0, 2, 3), (1, 2)), ((3, 1, 0), (0, 3))  # same shape key: B reuses A's cached graph


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """``{"checkpoint", "a", "b", "data"}``: two bundles of one shape (different experts) and a JSONL file."""
    from device_runtime.wire import FitConfig
    from export.bundle_writer import BundleRequest, write_bundle

    root = tmp_path_factory.mktemp("ort_trainer")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDMOE_CACHE", str(root / "cache"))
        checkpoint = tiny_checkpoint(root / "checkpoint", TRAINER_MIXTRAL)
        defaults = FitConfig(batch_size=4, seq_len=SEQ_LEN, learning_rate=1e-2, aux_loss_coef=0.01)
        for name, keep in (("a", KEEP_A), ("b", KEEP_B)):
            write_bundle(checkpoint, root / name, BundleRequest(keep=keep, training=defaults))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 3))
    return {"checkpoint": checkpoint, "a": root / "a", "b": root / "b", "data": data}


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


TRAIN_SCRIPT = """
import itertools, json, sys
from device_runtime.data import LocalDataset, TextEncoder
from device_runtime.ort_trainer import OrtTrainer
bundle, data = sys.argv[1], sys.argv[2]
trainer = OrtTrainer(bundle, threads=1, progress=False)
dataset = LocalDataset.from_jsonl(data, bundle + "/tokenizer.json", seq_len=16, eval_fraction=0.0)
batch = next(dataset.train_batches(4))
before = trainer.get_parameters()
result = trainer.fit(itertools.repeat(batch), steps=6, learning_rate=1e-2)
after = trainer.get_parameters()
print(json.dumps({
    "losses": result.losses, "num_examples": result.num_examples, "num_tokens": result.num_tokens,
    "batch_tokens": batch.num_tokens, "step_time_s": result.step_time_s, "peak_rss_bytes": result.peak_rss_bytes,
    "trained_experts": result.trained_experts, "routing_tokens": result.routing.num_tokens,
    "changed": sorted(n for n in before if abs(after[n] - before[n]).max() > 0),
    "torch_loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")),
}))
"""


def test_training_runs_without_torch_and_loss_decreases_on_a_repeated_batch(bundles):
    out = run_python(TRAIN_SCRIPT, str(bundles["a"]), str(bundles["data"]))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["torch_loaded"] == []
    losses = result["losses"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses
    assert (result["num_examples"], result["num_tokens"]) == (24, 6 * result["batch_tokens"])
    assert result["routing_tokens"] == result["num_tokens"]  # stats count real tokens only
    assert 0 < result["step_time_s"] < 5 and result["peak_rss_bytes"] > 10 * 2**20
    manifest = load_bundle(bundles["a"]).manifest
    assert result["changed"] == sorted(manifest.trainable_names)
    for layer, trained in enumerate(result["trained_experts"]):  # every kept expert got a token here
        assert trained == list(range(len(KEEP_A[layer])))


def torch_ce_loss(checkpoint, keep, batch) -> float:
    """Reference: the pruned model's causal-LM loss in torch, through the same wrapper the export uses."""
    from export.loading import load_causal_lm
    from export.prune import prune
    from export.training_graph import TrainingWrapper

    pruned, _ = prune(load_causal_lm(checkpoint), keep)
    wrapper = TrainingWrapper(pruned)
    inputs = wrapper.make_inputs(*(torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.labels)))
    with torch.no_grad():
        return float(wrapper(*inputs.values())[1])


def test_weights_are_loaded_by_name_into_a_cached_graph(bundles):
    from device_runtime.ort_trainer import OrtTrainer

    dataset = LocalDataset(RECORDS, TextEncoder(bundles["a"] / "tokenizer.json", seq_len=SEQ_LEN), eval_fraction=0)
    batch = next(dataset.train_batches(4))
    trainer_b = OrtTrainer(bundles["b"], threads=1, progress=False)  # its checkpoint holds bundle a's experts
    weights_b = load_file(str(bundles["b"] / WEIGHTS_FILE))
    params = trainer_b.get_parameters()
    assert sorted(params) == sorted(weights_b)
    for name, value in weights_b.items():
        np.testing.assert_array_equal(params[name], value)
    loss_b = trainer_b.evaluate([batch]).loss
    loss_a = OrtTrainer(bundles["a"], threads=1, progress=False).evaluate([batch]).loss
    assert loss_b == pytest.approx(torch_ce_loss(bundles["checkpoint"], KEEP_B, batch), abs=1e-4)
    assert loss_a == pytest.approx(torch_ce_loss(bundles["checkpoint"], KEEP_A, batch), abs=1e-4)
    assert abs(loss_a - loss_b) > 1e-3


def test_trainer_rejects_bad_arguments(bundles):
    from device_runtime.ort_trainer import OrtTrainer

    trainer = OrtTrainer(bundles["a"], threads=1, progress=False)
    name = load_bundle(bundles["a"]).manifest.tensors[0].name
    with pytest.raises(BundleError, match="not in the bundle manifest"):
        trainer.set_parameters({"nope.weight": np.zeros(3, np.float32)})
    with pytest.raises(BundleError, match="shape"):
        trainer.set_parameters({name: np.zeros(3, np.float32)})
    dataset = LocalDataset(RECORDS, TextEncoder(bundles["a"] / "tokenizer.json", seq_len=SEQ_LEN), eval_fraction=0)
    with pytest.raises(DataError, match="only 1 batches"):
        trainer.fit(dataset.train_batches(4, epochs=1), steps=3, learning_rate=1e-3)
    with pytest.raises(ConfigError):
        trainer.fit(dataset.train_batches(4), steps=1, learning_rate=1e-3, prox_mu=0.1)
    with pytest.raises(ConfigError):
        trainer.fit(dataset.train_batches(4), steps=1, learning_rate=1e-3, routing_prior=[np.ones(2), np.ones(2)])


CLI = [sys.executable, "-m", "device_runtime.cli"]


def test_cli_train_local_writes_trained_weights(bundles, tmp_path):
    out = subprocess.run(
        [
            *CLI,
            "train-local",
            str(bundles["a"]),
            "--data",
            str(bundles["data"]),
            "--steps",
            "3",
            "--threads",
            "1",
            "--eval-fraction",
            "0.25",
            "--no-progress",
            "--json",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert len(summary["losses"]) == 3 and summary["eval_loss_after"] is not None
    trained, original = load_file(str(tmp_path / "out" / WEIGHTS_FILE)), load_file(str(bundles["a"] / WEIGHTS_FILE))
    assert sorted(trained) == sorted(original)
    assert all(trained[n].shape == original[n].shape and not np.array_equal(trained[n], original[n]) for n in trained)


def test_corrupted_bundle_is_rejected_before_training(bundles, tmp_path):
    from device_runtime.ort_trainer import OrtTrainer

    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundles["a"], corrupt)
    weights = corrupt / WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(BundleIntegrityError, match="weights.safetensors"):
        OrtTrainer(corrupt, progress=False)
    out = subprocess.run(
        [
            *CLI,
            "train-local",
            str(corrupt),
            "--data",
            str(bundles["data"]),
            "--steps",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "BundleIntegrityError" in out.stderr and "weights.safetensors" in out.stderr
    assert not (tmp_path / "out").exists()
