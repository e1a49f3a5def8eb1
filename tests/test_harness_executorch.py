"""ExecuTorch export of the global model (``export.executorch``, ``fedmoe-coord model export --format pte``): the
``.pte`` runs in ExecuTorch's own Python runtime with the logits of the torch model and the same label-scoring
accuracy as the Hugging Face checkpoint (both pruned to a device class's experts); ``fedmoe-android push-model``
copies it to a (stand-in adb) device. Needs the ``executorch`` extra (CI installs it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import adb_standin
import numpy as np
import pytest
from harness_cli import harness, ok
from helpers import RECORDS, initialised_coordinator

pytest.importorskip("torch")
pytest.importorskip("executorch.runtime")
pytestmark = pytest.mark.slow

LABELS = sorted({r["label"] for r in RECORDS})
SEQ_LEN = 32
MAX_LOGIT_DIFF = 1e-4  # measured 4.5e-8 on this model (float32 XNNPACK vs torch eager)


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def token_ids(checkpoint) -> list[list[int]]:
    """The records' token ids and a 32-token sequence."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    return [tokenizer.encode(r["text"]).ids for r in RECORDS] + [[3, 5, 7, 9, 11, 13, 2, 4] * 4]


def test_pruned_pte_matches_the_checkpoint_and_push_model_copies_it(tmp_path, monkeypatch):
    """``fedmoe-coord model export --format pte --experts-per-layer 2`` (one lowering: minutes on a busy machine):
    the two most important experts per layer (calibration importance); logits within MAX_LOGIT_DIFF of the Hugging
    Face checkpoint pruned the same way, at every sequence length tried, and the same label-scoring accuracy;
    then ``fedmoe-android push-model`` to a stand-in adb device."""
    from coordinator.config import save_config
    from coordinator.federation import export_latest, load_calibration
    from export.evaluate import label_accuracy
    from export.executorch import PteModel
    from export.loading import load_causal_lm
    from export.planner import select_experts
    from export.prune import prune

    cfg = initialised_coordinator(tmp_path, tmp_path / "state")
    config = tmp_path / "fedmoe-coord.toml"
    save_config(cfg, config)
    out = tmp_path / "phone-model"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "--config",
            str(config),
            "model",
            "export",
            "--format",
            "pte",
            "--experts-per-layer",
            "2",
            "--max-seq-len",
            str(SEQ_LEN),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr
    keep = select_experts([layer.information_score() for layer in load_calibration(cfg).layers], 2)
    pte = PteModel(out)
    assert pte.meta["expert_ids"] == [list(ids) for ids in keep]
    export_latest(cfg, tmp_path / "hf")
    pruned, _ = prune(load_causal_lm(tmp_path / "hf"), keep)
    for ids in token_ids(tmp_path / "hf"):  # lengths 3 to 32: the dynamic sequence axis
        diff = np.abs(pte.logits(ids) - torch_logits(pruned, ids)).max()
        assert diff < MAX_LOGIT_DIFF, (len(ids), diff)
    reference = label_accuracy(pruned, tmp_path / "hf" / "tokenizer.json", RECORDS, LABELS, seq_len=SEQ_LEN)
    exported = label_accuracy(None, out / "tokenizer.json", RECORDS, LABELS, seq_len=SEQ_LEN, scorer=pte.label_scores)
    assert exported.accuracy == reference.accuracy and exported.num_examples == len(RECORDS)
    assert exported.loss == pytest.approx(reference.loss, abs=1e-4)

    device, adb = adb_standin.make_device(tmp_path, "R5CTPTE", sys.executable)
    monkeypatch.setenv("FEDMOE_ADB", str(adb))
    ok(harness(tmp_path / "cache", "push-model", "adb:R5CTPTE", str(out)))
    models = device / "data/data/com.termux/files/home/.fedmoe/models/phone-model"
    for name in ("model.pte", "tokenizer.json", "pte.json"):
        assert (models / name).read_bytes() == (out / name).read_bytes()
    assert os.listdir(device / "data/local/tmp") == []
