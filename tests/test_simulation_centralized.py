"""The centralized reference: the federation's step count on the union of the device files, scored each round."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from helpers import RECORDS, SEQ_LEN, TRAINER_MIXTRAL, tiny_checkpoint  # noqa: E402

from coordinator.evaluation import Evaluator  # noqa: E402
from coordinator.simulation.centralized import run_centralized  # noqa: E402
from coordinator.simulation.data import write_jsonl  # noqa: E402
from device_runtime.wire import FitConfig  # noqa: E402


@pytest.mark.parametrize("mode,rank", [("experts", 0), ("lora", 2)])
def test_centralized_learns_the_union_and_reports_each_round(tmp_path, mode, rank):
    checkpoint = tiny_checkpoint(tmp_path / "tiny", TRAINER_MIXTRAL)
    files = [write_jsonl(RECORDS[:2], tmp_path / "a.jsonl"), write_jsonl(RECORDS[2:], tmp_path / "b.jsonl")]
    before = Evaluator(checkpoint, RECORDS, trainable_mode=mode, lora_rank=rank, seq_len=SEQ_LEN).score(None)
    seen = []
    records = run_centralized(
        checkpoint,
        files,
        RECORDS,
        rounds=3,
        on_round=seen.append,
        trainable_mode=mode,
        lora_rank=rank,
        seed=0,
        threads=1,
        fit=FitConfig(batch_size=2, seq_len=SEQ_LEN, learning_rate=0.05, local_steps=5),
    )
    assert seen == records and [r.round for r in records] == [1, 2, 3]
    assert {r.strategy for r in records} == {"centralized"} and all(r.bytes_up == 0 for r in records)
    # 3 x 10 steps over the four records of both files: the label loss on them falls round after round
    losses = [before.loss] + [r.loss for r in records]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < before.loss - 0.3
