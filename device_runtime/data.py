"""A device's local data: JSONL records -> (prompt, completion) -> padded numpy batches.

Records are one JSON object per line, either ``{"text": ..., "label": ...}`` (classification, cast as
generation: the model learns to continue ``template.format(text=...)`` with ``" " + label``) or
``{"prompt": ..., "completion": ...}``. The loss is taken on completion tokens only (labels are -100 on
prompt and padding tokens), the convention of Hugging Face causal LMs, whose graphs shift labels inside.

The coordinator evaluates with the same :func:`format_example`, so the device and the server agree on the
prompt format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from device_runtime.errors import DataError

_T = TypeVar("_T")

DEFAULT_TEMPLATE = "Article: {text}\nTopic:"
IGNORE_INDEX = -100
PAD_TOKENS = ("<pad>", "[PAD]", "<|endoftext|>", "</s>", "<|im_end|>")


def format_example(record: dict[str, Any], template: str = DEFAULT_TEMPLATE) -> tuple[str, str]:
    """Turn one record into ``(prompt, completion)``; a pure function shared with the coordinator.

    ``{"text", "label"}`` -> ``(template.format(text=text), " " + label)``;
    ``{"prompt", "completion"}`` -> as given.

    Raises:
        DataError: the record is not a dict with string fields of one of the two forms, or the
            completion is empty.
    """
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
    elif "text" in record and "label" in record:
        if not isinstance(record["text"], str) or not isinstance(record["label"], (str, int)):
            raise DataError("'text' must be a string and 'label' a string or integer")
        prompt, completion = template.format(text=record["text"]), f" {record['label']}"
    else:
        raise DataError(f"record needs 'text' and 'label' or 'prompt' and 'completion', has {sorted(record)}")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
        raise DataError("prompt and completion must be strings and the completion non-empty")
    return prompt, completion


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file (blank lines are skipped).

    Raises:
        DataError: the file is missing or holds no record, or a line is not a JSON object (names the line).
    """
    return [record for _, record in _numbered_records(Path(path))]


def load_records(path: str | Path, *, text_field: str = "text", label_field: str = "label") -> list[dict[str, Any]]:
    """Read a JSONL file of labelled texts as ``{"text", "label"}`` records (other fields are dropped).

    Raises:
        DataError: unreadable or empty file, a malformed line or a missing field (named by line number).
    """
    records = []
    for number, row in _numbered_records(Path(path)):
        if text_field not in row or label_field not in row:
            raise DataError(f"{path}:{number}: needs the fields {text_field!r} and {label_field!r}")
        records.append({"text": str(row[text_field]), "label": str(row[label_field])})
    return records


def _numbered_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every non-blank line; raises as :func:`read_jsonl`."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise DataError(f"data file {path} is empty; give it one JSON record per line")
    return records


EVAL_SPLIT_SEED = 0
"""Seed of a device's train / held-out split in rounds (``FitConfig.eval_fraction``): fixed, unlike the round's
``FitConfig.seed`` (which shuffles the batches), so the held-out records are the same every round and are never
trained on."""


def split_train_eval(records: Sequence[_T], *, eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[_T], list[_T]]:
    """Deterministic shuffled split: the same ``(records, eval_fraction, seed)`` gives the same split.

    At least one record stays in train; eval gets ``floor(n * eval_fraction)`` records.

    Raises:
        DataError: ``eval_fraction`` is outside ``[0, 1)`` or there is no record.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if not records:
        raise DataError("no records to split")
    order = np.random.default_rng(seed).permutation(len(records))
    num_eval = min(int(len(records) * eval_fraction), len(records) - 1)
    return [records[i] for i in order[num_eval:]], [records[i] for i in order[:num_eval]]


@dataclass(frozen=True)
class Batch:
    """One padded batch (right padding).

    Attributes:
        input_ids: ``(batch, seq_len)`` int64 token ids.
        attention_mask: ``(batch, seq_len)`` int64, 1 on real tokens, 0 on padding.
        labels: ``(batch, seq_len)`` int64, the token id on completion tokens, -100 elsewhere.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())


class TextEncoder:
    """Tokenises (prompt, completion) pairs into fixed-budget id / label sequences.

    Args:
        tokenizer_path: a ``tokenizer.json`` (Hugging Face ``tokenizers`` format).
        seq_len: maximum tokens per sequence (>= 2).
        keep_tail: when the prompt is too long, keep its first tokens and its last ``keep_tail`` tokens
            (the end of the template, e.g. ``"\\nTopic:"``, must stay next to the completion).
        eos_token: if given and in the vocabulary, appended to every completion.

    Raises:
        DataError: the tokenizer file is missing or unreadable, or ``seq_len < 2``.
    """

    def __init__(self, tokenizer_path: str | Path, *, seq_len: int, keep_tail: int = 8, eos_token: str | None = None):
        from tokenizers import Tokenizer

        if seq_len < 2:
            raise DataError(f"seq_len must be >= 2, got {seq_len}")
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on unreadable files
            raise DataError(f"cannot read tokenizer {tokenizer_path}: {exc}") from exc
        self.seq_len = seq_len
        self.keep_tail = keep_tail
        self.eos_id = self.tokenizer.token_to_id(eos_token) if eos_token else None
        self.pad_id = next((i for t in PAD_TOKENS if (i := self.tokenizer.token_to_id(t)) is not None), 0)

    def encode(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """Return ``(input_ids, labels)``, both of length <= ``seq_len``.

        The completion keeps at most ``seq_len - 1`` tokens (its start; one prompt token must precede it);
        the prompt fills the rest, truncated in the middle (head + last ``keep_tail`` tokens).
        """
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True).ids
        completion_ids = self.tokenizer.encode(completion, add_special_tokens=False).ids
        if self.eos_id is not None:
            completion_ids.append(self.eos_id)
        completion_ids = completion_ids[: self.seq_len - 1]
        prompt_ids = truncate_middle(prompt_ids, self.seq_len - len(completion_ids), self.keep_tail)
        return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def truncate_middle(ids: list[int], budget: int, keep_tail: int) -> list[int]:
    """Keep at most ``budget`` ids: the first ``budget - tail`` and the last ``tail = min(keep_tail, budget-1)``."""
    if len(ids) <= budget:
        return list(ids)
    tail = max(0, min(keep_tail, budget - 1))
    return list(ids[: budget - tail]) + (list(ids[-tail:]) if tail else [])


def collate(examples: Sequence[tuple[list[int], list[int]]], *, pad_id: int, pad_to: int | None = None) -> Batch:
    """Right-pad encoded examples to the longest one (or to ``pad_to``) into a :class:`Batch`.

    Raises:
        DataError: no example, or an example longer than ``pad_to``.
    """
    if not examples:
        raise DataError("cannot collate an empty batch")
    width = max(len(ids) for ids, _ in examples) if pad_to is None else pad_to
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for row, (ids, labs) in enumerate(examples):
        if len(ids) > width:
            raise DataError(f"example of {len(ids)} tokens does not fit pad_to={width}")
        input_ids[row, : len(ids)], labels[row, : len(ids)], mask[row, : len(ids)] = ids, labs, 1
    return Batch(input_ids=input_ids, attention_mask=mask, labels=labels)


class LocalDataset:
    """A device's encoded local data, split deterministically into train and eval.

    Args:
        records: raw records (see :func:`format_example`).
        encoder: the :class:`TextEncoder`.
        template: prompt template for classification records.
        eval_fraction, seed: the split (see :func:`split_train_eval`); ``seed`` also shuffles the train batches.
        split_seed: the split's seed instead of ``seed`` (rounds use :data:`EVAL_SPLIT_SEED`: the same held-out
            records every round, batches shuffled by the round's seed).
        pad_to_seq_len: pad every batch to ``encoder.seq_len`` instead of the batch's longest sequence.

    Raises:
        DataError: a record is malformed (names its 1-based index).
    """

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        encoder: TextEncoder,
        *,
        template: str = DEFAULT_TEMPLATE,
        eval_fraction: float = 0.1,
        seed: int = 0,
        split_seed: int | None = None,
        pad_to_seq_len: bool = False,
    ):
        encoded = []
        for number, record in enumerate(records, start=1):
            try:
                encoded.append(encoder.encode(*format_example(record, template)))
            except DataError as exc:
                raise DataError(f"record {number}: {exc}") from exc
        self.train, self.eval = split_train_eval(
            encoded, eval_fraction=eval_fraction, seed=seed if split_seed is None else split_seed
        )
        self.encoder = encoder
        self.pad_id = encoder.pad_id
        self.pad_to = encoder.seq_len if pad_to_seq_len else None
        self.seed = seed

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer_path: str | Path, *, seq_len: int, **kwargs: Any) -> LocalDataset:
        """Read ``path`` and tokenise it.

        Raises:
            DataError: as :func:`read_jsonl`, or a record of the wrong form (names its line).
        """
        numbered = _numbered_records(Path(path))
        for number, record in numbered:
            try:
                format_example(record, kwargs.get("template", DEFAULT_TEMPLATE))
            except DataError as exc:
                raise DataError(f"{path}:{number}: {exc}") from exc
        return cls([r for _, r in numbered], TextEncoder(tokenizer_path, seq_len=seq_len), **kwargs)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The eval split in order, in batches of ``batch_size`` (the last may be smaller)."""
        for start in range(0, len(self.eval), batch_size):
            yield collate(self.eval[start : start + batch_size], pad_id=self.pad_id, pad_to=self.pad_to)

    def train_batches(self, batch_size: int, *, epochs: int | None = None) -> Iterator[Batch]:
        """Shuffled train batches, reshuffled each epoch (seeded); endless when ``epochs`` is None.

        Batches never span two epochs; the last of an epoch may be smaller.
        """
        rng = np.random.default_rng(self.seed)
        epoch = 0
        while epochs is None or epoch < epochs:
            order = rng.permutation(len(self.train))
            for start in range(0, len(order), batch_size):
                chunk = [self.train[i] for i in order[start : start + batch_size]]
                yield collate(chunk, pad_id=self.pad_id, pad_to=self.pad_to)
            epoch += 1
