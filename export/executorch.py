"""ExecuTorch export of a Hugging Face MoE checkpoint (the merged global model): an XNNPACK-delegated ``.pte``
program mapping token ids to logits, with the tokenizer beside it, for inference on a phone or a Pi.

The program is ``forward(input_ids (1, T) int64) -> logits (1, T, vocab) float32`` for 1 <= T <= max_seq_len
(no KV cache: a whole sequence per call). Experts run dense-masked (``export.experts_impl``): the fused
experts' default implementation does not export, and the masked form gives the same logits. Lowering:
``torch.export.export`` -> ``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])`` ->
``to_executorch()`` (ExecuTorch 1.5.1 with torch 2.13.0, the ``executorch`` extra).

Output directory::

    model.pte       the ExecuTorch program
    tokenizer.json  the checkpoint's tokenizer (``tokenizers``)
    pte.json        {"max_seq_len", "vocab_size", "expert_ids" (per MoE layer, or null: all), "format": 1}

:class:`PteModel` runs it with ExecuTorch's Python runtime (``executorch.runtime``) and scores labels the way
``export.evaluate.label_accuracy`` does.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_runtime.errors import ExportError, ModelError

PTE_FILE, META_FILE, TOKENIZER_FILE = "model.pte", "pte.json", "tokenizer.json"
FORMAT = 1


@dataclass(frozen=True)
class PteExport:
    """What :func:`export_pte` wrote: the program's path and size (bytes), its sequence bound, kept experts."""

    path: Path
    size_bytes: int
    max_seq_len: int
    expert_ids: tuple[tuple[int, ...], ...] | None


def _logits_module(model):
    import torch

    class Logits(torch.nn.Module):
        """``input_ids (1, T) -> logits (1, T, vocab)``, every position attended (no padding, no cache)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits

    return Logits().eval()


def export_pte(
    checkpoint: str | Path, out_dir: str | Path, *, keep: Sequence[Sequence[int]] | None = None, max_seq_len: int = 128
) -> PteExport:
    """Write ``checkpoint`` (optionally pruned to the experts ``keep[l]`` of each MoE layer) as ``out_dir``.

    Raises:
        ModelError: the checkpoint cannot be loaded or holds no MoE layer.
        ExportError: ExecuTorch is not installed (``pip install -e ".[executorch]"``) or lowering failed.
    """
    try:
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise ExportError(f'ExecuTorch is not installed ({exc}); pip install -e ".[executorch]"') from exc
    from export.loading import load_causal_lm
    from export.moe_block import use_dense_masked
    from export.prune import prune

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / TOKENIZER_FILE).is_file():
        raise ModelError(f"{checkpoint} has no {TOKENIZER_FILE}; the .pte needs the tokenizer beside it")
    model = load_causal_lm(checkpoint)
    expert_ids = None
    if keep is not None:
        model, expert_ids = prune(model, keep)
    use_dense_masked(model)
    example = torch.zeros((1, min(8, max_seq_len)), dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))  # torch.export / exir internals
            program = torch.export.export(
                _logits_module(model), (example,), dynamic_shapes={"input_ids": {1: seq}}, strict=False
            )
            buffer = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    except Exception as exc:  # torch.export / ExecuTorch raise many types; all mean the same here
        raise ExportError(f"ExecuTorch lowering of {checkpoint} failed: {type(exc).__name__}: {exc}") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PTE_FILE).write_bytes(buffer)
    shutil.copyfile(checkpoint / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    meta = {
        "format": FORMAT,
        "max_seq_len": max_seq_len,
        "vocab_size": int(model.config.vocab_size),
        "expert_ids": None if expert_ids is None else [list(ids) for ids in expert_ids],
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return PteExport(out_dir / PTE_FILE, len(buffer), max_seq_len, expert_ids)


class PteModel:
    """An exported directory loaded with ExecuTorch's Python runtime.

    Raises:
        ModelError: not an export of this format (no ``pte.json`` / ``model.pte``).
    """

    def __init__(self, out_dir: str | Path):
        from executorch.runtime import Runtime

        out_dir = Path(out_dir)
        try:
            self.meta = json.loads((out_dir / META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"{out_dir} is not an ExecuTorch export ({exc}); write one with `fedmoe-coord model "
                "export --format pte`"
            ) from exc
        if self.meta.get("format") != FORMAT:
            raise ModelError(f"{out_dir}: unsupported export format {self.meta.get('format')!r}")
        self.tokenizer_file = out_dir / TOKENIZER_FILE
        self._method = Runtime.get().load_program(out_dir / PTE_FILE).load_method("forward")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """``(T, vocab)`` float32 logits of the token ids (1 <= T <= max_seq_len)."""
        import torch

        if not 1 <= len(ids) <= self.meta["max_seq_len"]:
            raise ModelError(f"{len(ids)} tokens; the program takes 1 to {self.meta['max_seq_len']}")
        return self._method.execute([torch.tensor([list(ids)], dtype=torch.long)])[0][0].numpy()

    def label_scores(
        self, prompts: Sequence[list[int]], label_ids: list[list[int]]
    ) -> tuple[list[list[float]], list[int]]:
        """Per prompt, the summed log p of each label's tokens after it, and each label's token count (one program
        run per prompt and label over prompt + label; ``export.evaluate`` gets the same numbers with a KV cache)."""
        rows = [[self._label_log_p(prompt, ids) for ids in label_ids] for prompt in prompts]
        return rows, [len(ids) for ids in label_ids]

    def _label_log_p(self, prompt: list[int], label: list[int]) -> float:
        logits = self.logits(prompt + label).astype(np.float64)
        rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(label)]  # row j predicts label token j
        log_probs = rows - np.logaddexp.reduce(rows, axis=-1, keepdims=True)
        return float(log_probs[np.arange(len(label)), label].sum())
