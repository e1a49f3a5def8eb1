"""GET a coordinator's ``/healthz`` with ``--period-s`` seconds between probes until SIGTERM, in a process of its own.

``bench_connections.py`` starts it so that the latency measures the coordinator, not the load generator, whose
thousands of clients share one GIL (and its garbage collections) with anything it runs. Each probe appends a
line ``<time.monotonic() at its start> <latency seconds>`` to ``--out`` (latency ``inf``: failed or no answer
within 10 s); ``CLOCK_MONOTONIC`` is machine-wide, so the starting process can place the probes in its phases.

    python bench/healthz_probe.py --url https://127.0.0.1:PORT/healthz --cafile ca.pem --out probes.txt
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
import threading
import time
import urllib.request
from pathlib import Path

TIMEOUT_S = 10.0  # a probe without an answer in this many seconds counts as failed


def probe_once(url: str, context: ssl.SSLContext | None) -> float:
    """Seconds one ``GET url`` took to answer in full; inf if it failed."""
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
            response.read()
    except OSError:
        return float("inf")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--cafile", default="", help="the CA to verify an https:// coordinator against")
    parser.add_argument("--period-s", type=float, default=0.5, help="seconds of pause after each probe")
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args()
    context = ssl.create_default_context(cafile=opts.cafile) if opts.cafile else None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with opts.out.open("a", buffering=1) as out:  # line-buffered: the starter reads it after SIGTERM
        while not stop.wait(opts.period_s):
            started = time.monotonic()
            out.write(f"{started:.6f} {probe_once(opts.url, context)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
