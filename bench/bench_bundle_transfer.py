"""Peak memory of a device receiving a bundle: it must not grow with the bundle (issue 11).

For each size, a fresh child process streams a file of random bytes as ``BundleData`` frames (each frame
encoded and decoded as on the wire, ``--chunk-mib`` per frame) into a ``BundleAssembler`` writing to disk,
and reports its own peak RSS (``VmHWM``) before and after, and the throughput. The sender side of the child
reads the file chunk by chunk too, so the numbers are the receiver's.

    python bench/bench_bundle_transfer.py [--sizes-mib 64 256 1024] [--chunk-mib 4] [--workdir /tmp/fedmoe-bt]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from device_runtime.memory import status_kib
from device_runtime.units import MIB
from device_runtime.wire import BundleAssembler, BundleData, decode, encode


def child(source: Path, out_dir: Path, chunk: int) -> dict:
    """Receive ``source`` as one bundle file; returns peak RSS before / after (MiB) and MiB/s."""
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    size, sha = source.stat().st_size, digest.hexdigest()
    before = status_kib("VmHWM") / 1024
    assembler = BundleAssembler("k", out_dir, max_total_bytes=size)
    start, received = time.perf_counter(), None
    with open(source, "rb") as handle:
        for offset in range(0, size, chunk):
            msg = BundleData(
                shape_key_id="k",
                name="weights.safetensors",
                offset=offset,
                total_size=size,
                sha256=sha,
                more=offset + chunk < size,
                data=handle.read(chunk),
            )
            received = assembler.add(decode(encode(msg), max_size=chunk + MIB))
    seconds = time.perf_counter() - start
    assert received["weights.safetensors"].stat().st_size == size
    return {
        "size_mib": size / MIB,
        "peak_before_mib": before,
        "peak_after_mib": status_kib("VmHWM") / 1024,
        "mib_per_s": size / MIB / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--chunk-mib", type=float, default=4.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedmoe-bt"))
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "OUT_DIR"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    chunk = int(opts.chunk_mib * MIB)
    if opts.child:
        print(json.dumps(child(Path(opts.child[0]), Path(opts.child[1]), chunk)))
        return
    opts.workdir.mkdir(parents=True, exist_ok=True)
    print(
        "| bundle MiB | peak RSS before MiB | peak RSS after MiB | growth MiB | MiB/s |"
        f"  (chunks of {opts.chunk_mib} MiB)"
    )
    print("|---|---|---|---|---|")
    for size in opts.sizes_mib:
        source, out_dir = opts.workdir / f"src-{size}", opts.workdir / f"rx-{size}"
        with open(source, "wb") as handle:
            for _ in range(size):
                handle.write(os.urandom(MIB))
        out = subprocess.run(
            [sys.executable, __file__, "--chunk-mib", str(opts.chunk_mib), "--child", str(source), str(out_dir)],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout)
        print(
            f"| {r['size_mib']:.0f} | {r['peak_before_mib']:.0f} | {r['peak_after_mib']:.0f} | "
            f"{r['peak_after_mib'] - r['peak_before_mib']:.0f} | {r['mib_per_s']:.0f} |"
        )
        source.unlink()
        for path in out_dir.iterdir():
            path.unlink()
        out_dir.rmdir()


if __name__ == "__main__":
    main()
