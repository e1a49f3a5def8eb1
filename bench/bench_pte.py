"""ExecuTorch ``.pte`` (XNNPACK, ``export.executorch``) vs the Hugging Face model in torch eager, same checkpoint:
program size, export time, largest logit difference, and inference time per token.

Per token = one full forward of ``--seq-len`` tokens (no KV cache, both sides), median of ``--repeats`` timed
runs after one warm-up, divided by the token count. Both run in this process with 2 threads
(``torch.set_num_threads``; ExecuTorch's XNNPACK threadpool uses the cores it finds).

Run (the 8-layer upcycled SmolLM2 of the default simulation; lowering takes minutes)::

    FEDMOE_CACHE=/tmp/fedmoe-bench python bench/bench_pte.py --workdir /tmp/fedmoe-bench/work
    python bench/bench_pte.py --checkpoint moe/ --experts-per-layer 1   # a Pi's subset
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402


def _median_s(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="HF MoE checkpoint [default: upcycled SmolLM2, --layers]")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedmoe-bench/work"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts-per-layer", type=int, help="keep experts 0..C-1 of each layer [default: all]")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()

    import torch

    from export.executorch import PteModel, export_pte
    from export.families import describe
    from export.loading import load_causal_lm
    from export.prune import prune

    torch.set_num_threads(2)
    checkpoint = opts.checkpoint or _measure.upcycled_checkpoint(opts.workdir, opts.layers)
    model = load_causal_lm(checkpoint)
    keep = None
    if opts.experts_per_layer:
        keep = [tuple(range(opts.experts_per_layer))] * len(describe(model).layers)
        model, _ = prune(model, keep)
    start = time.perf_counter()
    info = export_pte(checkpoint, opts.workdir / "pte", keep=keep, max_seq_len=opts.seq_len)
    export_s = time.perf_counter() - start
    pte = PteModel(opts.workdir / "pte")
    ids = list(np.random.default_rng(0).integers(3, model.config.vocab_size, opts.seq_len))
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(pte.logits(ids) - reference).max())
    tensor = torch.tensor([ids])
    with torch.no_grad():
        torch_s = _median_s(lambda: model(input_ids=tensor, use_cache=False), opts.repeats)
    pte_s = _median_s(lambda: pte.logits(ids), opts.repeats)
    print(f"checkpoint {checkpoint} experts/layer {opts.experts_per_layer or 'all'} seq_len {opts.seq_len}")
    print(f".pte {info.size_bytes / 2**20:.1f} MiB, export {export_s:.0f} s, max |logit diff| {diff:.2e}")
    print(
        f"per token: pte {1000 * pte_s / opts.seq_len:.2f} ms, torch eager {1000 * torch_s / opts.seq_len:.2f} ms "
        f"(ratio {pte_s / torch_s:.2f})"
    )


if __name__ == "__main__":
    main()
