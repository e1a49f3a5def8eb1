"""Non-IID federated splits of a labelled data set (Dirichlet over labels) and the held-out test set.

Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification"
(2019): for each label, the share of its examples each client receives is drawn from Dirichlet(alpha);
small alpha gives clients few dominant labels, large alpha approaches IID.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from device_runtime.errors import ConfigError


def train_test_split(records: Sequence[dict], test_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with ``seed`` and hold out ``test_size`` records: ``(train, test)``."""
    if not 0 < test_size < len(records):
        raise ConfigError(f"test size must be in (0, {len(records)}), got {test_size}")
    order = np.random.default_rng(seed).permutation(len(records))
    shuffled = [records[i] for i in order]
    return shuffled[test_size:], shuffled[:test_size]


def dirichlet_split(
    records: Sequence[dict], num_clients: int, *, alpha: float, seed: int, min_size: int = 8, max_tries: int = 100
) -> list[list[dict]]:
    """Split ``records`` across ``num_clients`` by Dirichlet(``alpha``) over labels (seeded, deterministic).

    Draws again until every client holds at least ``min_size`` records.

    Raises:
        ConfigError: alpha <= 0, fewer than one client, or no draw gives every client ``min_size`` records.
    """
    if alpha <= 0 or num_clients < 1:
        raise ConfigError(f"need alpha > 0 and at least one client, got alpha={alpha}, clients={num_clients}")
    rng = np.random.default_rng(seed)
    labels = sorted({r["label"] for r in records})
    by_label = {lab: [i for i, r in enumerate(records) if r["label"] == lab] for lab in labels}
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for lab in labels:
            indices = rng.permutation(by_label[lab])
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(indices)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(indices, cuts)):
                parts[client].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [[records[i] for i in sorted(p)] for p in parts]
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split gave {num_clients} clients >= {min_size} records each; "
        "raise alpha or use fewer devices"
    )


def write_jsonl(records: Sequence[dict], path: Path) -> Path:
    """Write records one JSON object per line; returns ``path``."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def label_histogram(parts: Sequence[Sequence[dict]], labels: Sequence[str]) -> list[list[int]]:
    """Per client, how many records of each label (in ``labels`` order)."""
    return [[sum(r["label"] == lab for r in part) for lab in labels] for part in parts]
