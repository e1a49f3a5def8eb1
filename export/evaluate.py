"""Classification by label log-likelihood, the way language models are evaluated (e.g. lm-evaluation-harness).

For each record, every candidate label word is scored as the continuation of the prompt
(``device_runtime.data.format_example``, the same prompt the devices train on): score(label) =
sum over the label's tokens of log p(token | prompt, previous label tokens). The prediction is the label
with the highest score; accuracy is the fraction predicted right, and ``loss`` is the mean cross-entropy
(nats per token) of the true label's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from device_runtime.data import DEFAULT_TEMPLATE, TextEncoder, collate, format_example


@dataclass(frozen=True)
class LabelScore:
    """Result of :func:`label_accuracy`: accuracy in [0, 1], loss in nats per label token."""

    accuracy: float
    loss: float
    num_examples: int


def _label_log_probs(model, batch) -> tuple[list[float], list[int]]:
    """Per row of a padded Batch: the summed log p of its label tokens, and how many there are.

    Only the positions that predict a label token go through the lm_head (not the whole sequence).
    """
    import torch

    labels = torch.from_numpy(batch.labels[:, 1:])  # (batch, seq_len - 1): position t predicts t + 1
    rows, cols = torch.nonzero(labels != -100, as_tuple=True)
    with torch.no_grad():
        hidden = model.model(input_ids=torch.from_numpy(batch.input_ids),
                             attention_mask=torch.from_numpy(batch.attention_mask)).last_hidden_state
        log_probs = torch.log_softmax(model.lm_head(hidden[rows, cols]).float(), dim=-1)  # (targets, vocab)
    picked = log_probs.gather(-1, labels[rows, cols].unsqueeze(-1)).squeeze(-1)  # (targets,)
    sums = torch.zeros(labels.shape[0], dtype=torch.float64).index_add_(0, rows, picked.double())
    counts = torch.bincount(rows, minlength=labels.shape[0])
    return sums.tolist(), counts.tolist()


def label_accuracy(model, tokenizer_file: str | Path, records: Sequence[dict], labels: Sequence[str], *,
                   template: str = DEFAULT_TEMPLATE, seq_len: int = 128) -> LabelScore:
    """Score ``records`` (``{"text", "label"}``) against the candidate ``labels`` with ``model`` (torch).

    Args:
        model: a transformers CausalLM in eval mode.
        tokenizer_file: its ``tokenizer.json``.
        labels: the candidate label words (each record's label must be one of them).
        seq_len: tokens per scored sequence (the prompt is truncated in the middle to fit).
    """
    encoder = TextEncoder(tokenizer_file, seq_len=seq_len)
    correct, nll, tokens = 0, 0.0, 0
    for record in records:
        prompt = format_example({**record, "label": labels[0]}, template)[0]
        examples = [encoder.encode(prompt, format_example({**record, "label": lab}, template)[1]) for lab in labels]
        scores, counts = _label_log_probs(model, collate(examples, pad_id=encoder.pad_id))
        truth = labels.index(record["label"])
        correct += int(max(range(len(labels)), key=scores.__getitem__) == truth)
        nll -= scores[truth]
        tokens += counts[truth]
    return LabelScore(accuracy=correct / max(1, len(records)), loss=nll / max(1, tokens), num_examples=len(records))
