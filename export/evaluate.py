"""Classification by label log-likelihood, the way language models are evaluated (e.g. lm-evaluation-harness).

For each record, every candidate label word is scored as the continuation of the prompt
(``device_runtime.data.format_example``, the same prompt the devices train on): score(label) =
sum over the label's tokens of log p(token | prompt, previous label tokens). The prediction is the label
with the highest score; accuracy is the fraction predicted right, and ``loss`` is the mean cross-entropy
(nats per token) of the true label's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from device_runtime.data import DEFAULT_TEMPLATE, TextEncoder, format_example, truncate_middle


@dataclass(frozen=True)
class LabelScore:
    """Result of :func:`label_accuracy`: accuracy in [0, 1], loss in nats per label token."""

    accuracy: float
    loss: float
    num_examples: int


def _label_scores(
    model, prompts: Sequence[list[int]], label_ids: list[list[int]]
) -> tuple[list[list[float]], list[int]]:
    """Summed log p of each label's tokens after each prompt (``(prompts, labels)``), and each label's token count.

    The prompts run as one left-padded batch with explicit position ids (a padded prompt sees the positions its
    unpadded self would); the KV cache is repeated once per label and the labels run as one padded batch of
    ``prompts * labels`` rows (skipped when every label is one token: the prompt's last position predicts it).
    Only positions that predict a label token go through the lm_head.
    """
    import torch

    count, width = len(label_ids), max(len(ids) for ids in label_ids)
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)  # (prompts, length), left-padded
    prompt_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :], prompt_mask[row, length - len(prompt) :] = torch.tensor(prompt), 1
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    labels = torch.tensor([ids_ + [0] * (width - len(ids_)) for ids_ in label_ids]).repeat(len(prompts), 1)
    mask = torch.tensor([[1] * len(ids_) + [0] * (width - len(ids_)) for ids_ in label_ids]).repeat(len(prompts), 1)
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=prompt_mask, position_ids=positions, use_cache=width > 1)
        last = out.last_hidden_state[:, -1:].repeat_interleave(count, 0)  # (rows, 1, hidden): first label token
        before = last
        if width > 1:
            cache = out.past_key_values
            cache.batch_repeat_interleave(count)
            full_mask = torch.cat([prompt_mask.repeat_interleave(count, 0), mask], dim=1)
            label_positions = positions[:, -1:].repeat_interleave(count, 0) + 1 + torch.arange(width)
            hidden = model.model(
                input_ids=labels, attention_mask=full_mask, position_ids=label_positions, cache=cache
            ).last_hidden_state
            before = torch.cat([last, hidden[:, :-1]], dim=1)  # (rows, width, hidden): predicts token j
        rows, cols = torch.nonzero(mask, as_tuple=True)
        log_probs = torch.log_softmax(model.lm_head(before[rows, cols]).float(), dim=-1)
    picked = log_probs.gather(-1, labels[rows, cols].unsqueeze(-1)).squeeze(-1).double()
    sums = torch.zeros(len(prompts) * count, dtype=torch.float64).index_add_(0, rows, picked)
    return sums.view(len(prompts), count).tolist(), mask[:count].sum(1).tolist()


def label_accuracy(
    model,
    tokenizer_file: str | Path,
    records: Sequence[dict],
    labels: Sequence[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    seq_len: int = 128,
    batch_size: int = 16,
    scorer=None,
) -> LabelScore:
    """Score ``records`` (``{"text", "label"}``) against the candidate ``labels`` with ``model`` (torch).

    Args:
        model: a transformers CausalLM in eval mode.
        tokenizer_file: its ``tokenizer.json``.
        labels: the candidate label words (each record's label must be one of them).
        seq_len: tokens of prompt + label (the prompt is truncated in the middle to fit, as on devices).
        batch_size: prompts scored per forward (sorted by length first, so a batch pads little).
        scorer: ``(prompts, label_ids) -> (per prompt the summed log p of each label, tokens per label)`` of
            another runtime (e.g. ``export.executorch.PteModel.label_scores``) [default: ``model``, batched].
    """
    encoder = TextEncoder(tokenizer_file, seq_len=seq_len)
    label_ids = [
        encoder.tokenizer.encode(format_example({"text": "", "label": lab}, template)[1], add_special_tokens=False).ids
        for lab in labels
    ]
    budget = seq_len - max(len(ids) for ids in label_ids)
    prompts = [
        truncate_middle(encoder.tokenizer.encode(format_example(r, template)[0]).ids, budget, encoder.keep_tail)
        for r in records
    ]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))  # similar lengths batch with little padding
    correct, nll, tokens = 0, 0.0, 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        scores, counts = (scorer or partial(_label_scores, model))([prompts[i] for i in chunk], label_ids)
        for i, row in zip(chunk, scores):
            truth = labels.index(records[i]["label"])
            correct += int(max(range(len(labels)), key=row.__getitem__) == truth)
            nll -= row[truth]
            tokens += counts[truth]
    return LabelScore(accuracy=correct / max(1, len(records)), loss=nll / max(1, tokens), num_examples=len(records))
