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

from device_runtime.data import DEFAULT_TEMPLATE, TextEncoder, format_example, truncate_middle


@dataclass(frozen=True)
class LabelScore:
    """Result of :func:`label_accuracy`: accuracy in [0, 1], loss in nats per label token."""

    accuracy: float
    loss: float
    num_examples: int


def _label_scores(model, prompt_ids: list[int], label_ids: list[list[int]]) -> tuple[list[float], list[int]]:
    """Summed log p of each label's tokens after the prompt, and each label's token count.

    The prompt runs once; its KV cache is repeated for the labels, which run as one padded batch, and only
    positions that predict a label token go through the lm_head.
    """
    import torch

    count = len(label_ids)
    width = max(len(ids) for ids in label_ids)
    labels = torch.tensor([ids + [0] * (width - len(ids)) for ids in label_ids])  # (labels, width)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in label_ids])
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(count)
        full_mask = torch.cat([torch.ones(count, len(prompt_ids), dtype=mask.dtype), mask], dim=1)
        hidden = model.model(input_ids=labels, attention_mask=full_mask, past_key_values=cache).last_hidden_state
        last = out.last_hidden_state[:, -1:].expand(count, 1, -1)  # predicts each label's first token
        before = torch.cat([last, hidden[:, :-1]], dim=1)  # (labels, width, hidden): predicts token j
        rows, cols = torch.nonzero(mask, as_tuple=True)
        log_probs = torch.log_softmax(model.lm_head(before[rows, cols]).float(), dim=-1)
    picked = log_probs.gather(-1, labels[rows, cols].unsqueeze(-1)).squeeze(-1).double()
    sums = torch.zeros(count, dtype=torch.float64).index_add_(0, rows, picked)
    return sums.tolist(), mask.sum(1).tolist()


def label_accuracy(model, tokenizer_file: str | Path, records: Sequence[dict], labels: Sequence[str], *,
                   template: str = DEFAULT_TEMPLATE, seq_len: int = 128) -> LabelScore:
    """Score ``records`` (``{"text", "label"}``) against the candidate ``labels`` with ``model`` (torch).

    Args:
        model: a transformers CausalLM in eval mode.
        tokenizer_file: its ``tokenizer.json``.
        labels: the candidate label words (each record's label must be one of them).
        seq_len: tokens of prompt + label (the prompt is truncated in the middle to fit, as on devices).
    """
    encoder = TextEncoder(tokenizer_file, seq_len=seq_len)
    label_ids = [encoder.tokenizer.encode(format_example({"text": "", "label": lab}, template)[1],
                                          add_special_tokens=False).ids for lab in labels]
    budget = seq_len - max(len(ids) for ids in label_ids)
    correct, nll, tokens = 0, 0.0, 0
    for record in records:
        prompt = format_example(record, template)[0]
        prompt_ids = truncate_middle(encoder.tokenizer.encode(prompt).ids, budget, encoder.keep_tail)
        scores, counts = _label_scores(model, prompt_ids, label_ids)
        truth = labels.index(record["label"])
        correct += int(max(range(len(labels)), key=scores.__getitem__) == truth)
        nll -= scores[truth]
        tokens += counts[truth]
    return LabelScore(accuracy=correct / max(1, len(records)), loss=nll / max(1, tokens), num_examples=len(records))
