"""Server-side evaluation: each new global model version scored on a held-out labelled set.

The score is label log-likelihood accuracy (``export/evaluate.py``, the lm-evaluation-harness way): the
checkpoint with the global state applied ranks every candidate label as the continuation of the prompt the
devices train on. Needs torch, like every workstation role that touches the full model.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.strategy.types import Params
from device_runtime.data import load_records
from device_runtime.errors import ConfigError
from export.evaluate import LabelScore

BACKGROUND_NICE = 10


def background_executor() -> ThreadPoolExecutor:
    """A one-thread pool whose thread runs at nice >= ``BACKGROUND_NICE``: evaluation then takes the CPU that
    training and aggregation leave idle instead of slowing them (Linux schedules threads, so nice is per thread;
    where it cannot be set, the thread runs at normal priority)."""
    return ThreadPoolExecutor(1, thread_name_prefix="evaluate", initializer=_lower_priority)


def _lower_priority() -> None:
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(BACKGROUND_NICE, os.getpriority(os.PRIO_PROCESS, tid)))
    except (AttributeError, OSError):  # not Linux / not permitted: stay at normal priority
        pass


class Evaluator:
    """Scores global states of one checkpoint on ``records`` against the candidate ``labels``.

    Args:
        checkpoint: the MoE checkpoint directory (with ``tokenizer.json``).
        records: ``{"text", "label"}`` held-out records. labels: candidate label words (default: those seen).
        trainable_mode, lora_rank, seed: the global state's layout (as ``export.global_state.init_global_state``).
        seq_len: tokens of prompt + label. threads: torch intra-op threads.
    Raises:
        ConfigError: no records, or a record's label is not a candidate.
        ModelError: the checkpoint cannot be loaded (on first use).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        records: Sequence[dict],
        labels: Sequence[str] | None = None,
        *,
        trainable_mode: str = "experts",
        lora_rank: int = 0,
        seed: int = 0,
        seq_len: int = 128,
        threads: int | None = None,
    ):
        self.labels = sorted({r["label"] for r in records}) if labels is None else list(labels)
        if not records or len(self.labels) < 2:
            raise ConfigError("evaluation needs held-out records with at least two labels")
        unknown = {r["label"] for r in records} - set(self.labels)
        if unknown:
            raise ConfigError(f"evaluation records have labels outside the candidates: {sorted(unknown)}")
        self.checkpoint, self.records, self.seq_len = Path(checkpoint), list(records), seq_len
        self._layout = dict(trainable_mode=trainable_mode, lora_rank=lora_rank, seed=seed)
        self._threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self._model = None

    @classmethod
    def from_config(cls, cfg: CoordinatorConfig) -> Evaluator | None:
        """The evaluator ``cfg.eval_data`` asks for, or None when it is not set.

        Raises:
            DataError: ``eval_data`` is unreadable or a record lacks the text / label field.
        """
        if not cfg.eval_data:
            return None
        records = load_records(cfg.eval_data, text_field=cfg.eval_text_field, label_field=cfg.eval_label_field)
        return cls(
            cfg.checkpoint,
            records,
            trainable_mode=cfg.trainable_mode,
            lora_rank=cfg.lora_rank,
            seed=cfg.seed,
            seq_len=cfg.fit.seq_len,
        )

    def score(self, params: Params | None) -> LabelScore:
        """Accuracy and label loss (nats per token) of the global state ``params`` (name -> array of its
        manifest shape), or of the model as initialised (the zero-shot score) when None."""
        import torch

        from export.evaluate import label_accuracy
        from export.experts_impl import ROUTED
        from export.global_state import apply_state, load_trainable_model
        from export.moe_block import set_experts_forward

        torch.set_num_threads(self._threads)
        if self._model is None:
            self._model = load_trainable_model(self.checkpoint, **self._layout)
            set_experts_forward(self._model, ROUTED)  # scoring needs no export: each expert on its tokens
        if params is not None:
            apply_state(self._model, params)
        return label_accuracy(
            self._model, self.checkpoint / "tokenizer.json", self.records, self.labels, seq_len=self.seq_len
        )
