"""What framing an update costs: ``wire.encode`` and ``wire.decode`` of an Update the size of a phone's (2 experts
per layer, 8 layers, float32: 162 MiB), best of 3 in this process: wall seconds, user and kernel CPU seconds and
minor page faults (``getrusage``). Run it with ``PYTHONPATH`` set to each checkout to compare two versions:

    PYTHONPATH=/work/main python bench/bench_wire_copies.py
    PYTHONPATH=. python bench/bench_wire_copies.py
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from device_runtime.wire import Update, decode, encode


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=2, help="experts per layer in the update")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(8):
        prefix = f"model.layers.{layer}.mlp.experts"
        tensors[f"{prefix}.gate_up_proj"] = rng.standard_normal((args.experts, 3072, 576), dtype=np.float32)
        tensors[f"{prefix}.down_proj"] = rng.standard_normal((args.experts, 576, 1536), dtype=np.float32)
    update = Update(
        update_id="r1-d-x",
        round_id=1,
        num_examples=40,
        num_tokens=100,
        metrics={"loss": 1.0},
        routing={},
        trained_experts=((0,),),
        tensors=tensors,
    )
    frame = encode(update)
    for what in ("encode", "decode"):
        best = None
        for _ in range(args.repeat):
            before, start = _usage(), time.perf_counter()
            if what == "encode":
                frame = encode(update)
            else:
                decode(frame, max_size=1 << 31)
            wall, after = time.perf_counter() - start, _usage()
            row = (wall, after[0] - before[0], after[1] - before[1], after[2] - before[2])
            best = row if best is None or row[0] < best[0] else best
        assert best is not None
        print(
            f"{what}: {len(frame) / 2**20:.0f} MiB, wall {best[0]:.2f} s, user {best[1]:.2f} s, "
            f"kernel {best[2]:.2f} s, minor faults {best[3]}"
        )


if __name__ == "__main__":
    main()
