"""The centralized reference of a simulation (``--compare centralized,...``): the bound federation aims for.

The same model and trainable set as the devices (``MoeDescription.trainable_tensors``: routers plus experts,
or LoRA adapters), the union of the devices' data files, the same batch size, sequence length and learning rate,
the federation's number of optimizer steps (per round ``local_steps`` times the number of devices) and its logit
adjustment (with the union's label prior), trained
in one process with torch (``export.torch_train``; one AdamW throughout). After each round's steps the model is
scored by the coordinator's :class:`~coordinator.evaluation.Evaluator` on the same held-out set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from coordinator.simulation.report import RoundRecord
from device_runtime.answer_prior import local_answer_shift
from device_runtime.data import LocalDataset, TextEncoder, read_jsonl
from device_runtime.wire import FitConfig

NAME = "centralized"


def run_centralized(
    checkpoint: Path,
    data_files: Sequence[Path],
    test: Sequence[dict],
    *,
    rounds: int,
    fit: FitConfig,
    trainable_mode: str,
    lora_rank: int,
    seed: int,
    on_round: Callable[[RoundRecord], None],
    threads: int = 2,
) -> list[RoundRecord]:
    """Train centrally for ``rounds`` x ``fit.local_steps * len(data_files)`` steps; one record per round.

    Raises:
        DataError: a data file is unreadable. ModelError: the checkpoint cannot be loaded.
    """
    import torch

    from coordinator.evaluation import Evaluator
    from export.families import describe
    from export.global_state import load_trainable_model
    from export.torch_train import fit_steps, trainable_only

    torch.manual_seed(seed)
    model = load_trainable_model(checkpoint, trainable_mode=trainable_mode, lora_rank=lora_rank, seed=seed)
    names = [n for n, _ in describe(model).trainable_tensors(list(model.state_dict()), trainable_mode)]
    params = trainable_only(model, names)
    records = [r for f in data_files for r in read_jsonl(f)]
    encoder = TextEncoder(checkpoint / "tokenizer.json", seq_len=fit.seq_len)
    dataset = LocalDataset(records, encoder, eval_fraction=0.0, seed=seed)
    batches, answer = (
        dataset.train_batches(fit.batch_size),
        local_answer_shift(dataset, fit.labels, fit.logit_adjustment),
    )
    evaluator = Evaluator(
        checkpoint, test, trainable_mode=trainable_mode, lora_rank=lora_rank, seed=seed, seq_len=fit.seq_len
    )
    out, optimizer = [], None
    for server_round in range(1, rounds + 1):
        torch.set_num_threads(threads)  # the evaluator sets its own count
        start = time.monotonic()
        _, optimizer = fit_steps(
            model,
            params,
            batches,
            steps=fit.local_steps * len(data_files),
            learning_rate=fit.learning_rate,
            aux_loss_coef=fit.aux_loss_coef,
            optimizer=optimizer,
            answer_shift=answer,
        )
        wall = time.monotonic() - start
        score = evaluator.score({n: p.detach().numpy() for n, p in zip(names, params)})
        out.append(RoundRecord(NAME, server_round, score.accuracy, score.loss, wall, 0, 0))
        on_round(out[-1])
    return out
