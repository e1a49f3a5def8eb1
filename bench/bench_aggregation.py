"""Aggregation throughput (GB/s) and the coordinator's peak memory while aggregating a round.

A synthetic global state with the shapes of the default simulation (SmolLM2-135M upcycled to ``--experts``
experts: per MoE layer a router ``(E, 576)``, experts ``gate_up_proj (E, 3072, 576)`` and ``down_proj
(E, 576, 1536)``, float32) is written to a real :class:`coordinator.tensor_store.TensorStore`, with
``--files`` distinct client updates: each holds a random 1..E experts per layer (a pruned update, as a
round's devices send), routing statistics from random softmax routers and the registry metadata
(``coordinator.planning.update_meta`` format). ``--clients`` update rows point at those files cyclically
(different device ids and ``num_examples``), so the disk holds ``--files`` updates while the strategies
read ``--clients`` of them; the files are in the page cache, as a just-received round's would be.

Each measurement runs in a fresh child process (this script with ``--child``) that loads the global state
the way ``GlobalModel`` does, resets its peak RSS (``/proc/self/clear_refs``), then times:

- ``read``: iterating ``coordinator.federation.stored_updates`` only (read, sha256 check, parse, metadata):
  the floor of the streaming path;
- ``numpy``: the baseline, a plain weighted sum ``acc[ids] += n_c * update_c`` (float64, global layout) over
  the same updates loaded the same way (``TensorStore.load``), then a division by the per-row totals;
- ``hfedmoe``, ``fedavg``, ``fedalign`` (opt-in):
  ``strategy.aggregate_fit(round, stored_updates(...), [], global)``, what
  ``coordinator.federation.aggregate_round`` runs (the commit of the new version is not timed).

GB/s = bytes of the round's update tensors / wall seconds (FedAlign-MoE reads them twice, in two passes, and
is still charged once); GB/CPU-s divides by the child's CPU seconds instead (``time.process_time``), which
moves far less than wall time when other jobs share the CPU. The sha256 throughput of this CPU is printed
too: ``TensorStore.get`` verifies the hash of every file it reads, in every kind.

Peak RSS is the aggregation's own high-water mark (``VmHWM`` after the reset) next to the RSS before it;
``hfedmoe`` also runs with ``--memory-clients`` clients to show the peak does not grow with the number of
clients. The ``fedavg`` and ``numpy`` results are compared (sum of every output tensor):
they compute the same per-row example-weighted average.

Run (about 1.5-2.5 minutes on 2 busy cores; ``--quick`` about 20-40 s; ``--kinds ... fedalign`` adds about as
much again; ``--layers 8``, the default simulation's 8 layers, reads ~20 GB per kind: ~2.5-4 minutes each)::

    python bench/bench_aggregation.py
    python bench/bench_aggregation.py --kinds read numpy hfedmoe fedavg fedalign
    python bench/bench_aggregation.py --layers 8
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import _measure
import numpy as np

from coordinator.federation import stored_updates
from coordinator.strategy import from_name
from coordinator.tensor_store import TensorStore
from device_runtime.memory import status_kib
from device_runtime.stats import RoutingStats
from device_runtime.units import MIB

GB = 1e9
HIDDEN, INTERMEDIATE = 576, 1536  # SmolLM2-135M
TOKENS = 256  # tokens per client behind the routing statistics
KINDS = ("read", "numpy", "hfedmoe", "fedavg", "fedalign")
DEFAULT_KINDS = ["read", "numpy", "hfedmoe", "fedavg"]  # fedalign reads every update twice: opt-in


@dataclass(frozen=True)
class StoredUpdate:
    """The fields of a registry ``updates`` row that ``stored_updates`` reads."""

    device_id: str
    num_examples: int
    tensor_sha256: str
    meta: dict


def layer_names(layer: int) -> tuple[str, str, str]:
    """Router, gate_up and down tensor names of MoE layer ``layer`` (torch ``state_dict`` names)."""
    prefix = f"model.layers.{layer}.mlp"
    return f"{prefix}.gate.weight", f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"


def global_state(layers: int, experts: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Routers ``(E, H)``, ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)`` per layer, float32."""
    params = {}
    for layer in range(layers):
        router, gate_up, down = layer_names(layer)
        params[router] = _normal(rng, (experts, HIDDEN))
        params[gate_up] = _normal(rng, (experts, 2 * INTERMEDIATE, HIDDEN))
        params[down] = _normal(rng, (experts, HIDDEN, INTERMEDIATE))
    return params


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)


def routing(kept: int, rng: np.random.Generator) -> np.ndarray:
    """``(4, kept)`` raw routing sums (sum G, max G, sum G log G, tokens routed) of a random top-2 router."""
    logits = rng.standard_normal((TOKENS, kept))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.argsort(-probs, 1)[:, : min(2, kept)]
    routed = np.bincount(top.ravel(), minlength=kept)
    return np.stack([probs.sum(0), probs.max(0), (probs * np.log(probs)).sum(0), routed])


def write_update(store: TensorStore, params: dict, experts: int, rng: np.random.Generator) -> tuple[str, dict]:
    """Store one pruned update (random 1..E experts per layer); returns its sha256 and registry metadata."""
    layers = len(params) // 3
    tensors, meta_layers, expert_ids, per_layer = {}, {}, [], []
    for layer in range(layers):
        ids = tuple(sorted(int(g) for g in rng.choice(experts, rng.integers(1, experts + 1), replace=False)))
        expert_ids.append(ids)
        for name in layer_names(layer):
            tensors[name] = params[name][list(ids)] + _normal(rng, (len(ids),) + params[name].shape[1:])
            meta_layers[name] = layer
        per_layer.append(routing(len(ids), rng))
    stats = RoutingStats([len(ids) for ids in expert_ids], expert_ids)
    stats.update(per_layer, TOKENS)
    trained = [[ids[i] for i in local] for ids, local in zip(expert_ids, stats.trained_experts())]
    meta = {
        "expert_ids": [list(ids) for ids in expert_ids],
        "trained_experts": trained,
        "routing": stats.to_dict(),
        "metrics": {"loss": 2.5},
        "layers": meta_layers,
        "shape_key": "experts-" + ".".join(str(len(ids)) for ids in expert_ids),
    }
    return store.put(tensors), {"meta": meta, "bytes": sum(t.nbytes for t in tensors.values())}


def prepare(workdir: Path, opts) -> dict:
    """Write the global state and ``opts.files`` updates; returns the manifest the children read."""
    rng = np.random.default_rng(opts.seed)
    store = TensorStore(workdir / "tensors")
    params = global_state(opts.layers, opts.experts, rng)
    files = [write_update(store, params, opts.experts, rng) for _ in range(opts.files)]
    rows = [
        StoredUpdate(
            f"device-{c:04d}", int(rng.integers(8, 65)), files[c % len(files)][0], files[c % len(files)][1]["meta"]
        )
        for c in range(opts.clients)
    ]
    return {
        "store": str(store.root),
        "global_sha256": store.put(params),
        "model_bytes": sum(t.nbytes for t in params.values()),
        "file_bytes": [info["bytes"] for _, info in files],
        "rows": [asdict(r) for r in rows],
    }


# ---------------------------------------------------------------- the child


def numpy_weighted_sum(store: TensorStore, rows: list[StoredUpdate], global_params: dict) -> dict:
    """Baseline: ``acc[ids] += n_c * update_c`` per tensor (float64), then divide by the per-row totals."""
    acc = {name: np.zeros(t.shape, np.float64) for name, t in global_params.items()}
    totals = {name: np.zeros(t.shape[0]) for name, t in global_params.items()}
    for row in rows:
        tensors = store.load(row.tensor_sha256)
        for name, tensor in tensors.items():
            ids = row.meta["expert_ids"][row.meta["layers"][name]]
            acc[name][ids] += row.num_examples * tensor
            totals[name][ids] += row.num_examples
    out = {}
    for name, total in totals.items():
        held = total > 0
        merged = global_params[name].astype(np.float64)
        merged[held] = acc.pop(name)[held] / total[held].reshape((-1,) + (1,) * (merged.ndim - 1))
        out[name] = merged.astype(np.float32)
    return out


def child(manifest_path: Path, kind: str, clients: int) -> dict:
    """Load the global state, reset the peak RSS, run ``kind`` over the first ``clients`` rows."""
    manifest = json.loads(manifest_path.read_text())
    store = TensorStore(manifest["store"])
    rows = [StoredUpdate(**r) for r in manifest["rows"][:clients]]
    global_params = {n: np.asarray(t, dtype=np.float32) for n, t in store.load(manifest["global_sha256"]).items()}
    gc.collect()
    reset = _measure.reset_peak_rss()
    base = status_kib("VmRSS") / 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics: dict = {}
    if kind == "read":
        out = {}
        for update in stored_updates(store, rows)():
            del update
    elif kind == "numpy":
        out = numpy_weighted_sum(store, rows, global_params)
    else:
        out, metrics, _ = from_name(kind).aggregate_fit(1, stored_updates(store, rows), [], global_params)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "kind": kind,
        "clients": clients,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "base_rss_mib": base,
        "peak_rss_mib": _measure._peak_rss_mib(),
        "peak_reset": reset,
        "accepted": metrics.get("num_clients", len(rows)),
        "rejected": metrics.get("rejected", {}),
        "sums": {name: float(t.sum(dtype=np.float64)) for name, t in out.items()},
    }


def run_child(manifest: Path, kind: str, clients: int) -> dict:
    """Run ``kind`` in a fresh child; its JSON result (the child reads its own peak RSS, see ``_measure``).

    Raises:
        RuntimeError: the child failed (the tail of its stderr is in the message).
    """
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--manifest", str(manifest), "--clients", str(clients)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the parent


def round_bytes(manifest: dict, clients: int) -> int:
    """Bytes of update tensors the first ``clients`` rows hold (files are reused cyclically)."""
    sizes = manifest["file_bytes"]
    return sum(sizes[c % len(sizes)] for c in range(clients))


def measure(manifest_path: Path, manifest: dict, kinds: list[str], clients: int, memory_clients: int) -> list[dict]:
    """One child per kind with every client, then ``hfedmoe`` with ``memory_clients`` clients."""
    plan = [(kind, clients) for kind in kinds]
    if "hfedmoe" in kinds and memory_clients != clients:
        plan.append(("hfedmoe", memory_clients))
    rows = []
    for kind, count in plan:
        result = run_child(manifest_path, kind, count)
        if result["accepted"] != count or result["rejected"]:
            raise AssertionError(f"{kind}: accepted {result['accepted']} of {count}: {result['rejected']}")
        result["bytes"] = round_bytes(manifest, count)
        rows.append(result)
        print(f"  {kind} x {count}: {result['seconds']:.1f} s", flush=True)
    return rows


def sums_agree(rows: list[dict]) -> float | None:
    """Largest relative difference of the per-tensor output sums of ``fedavg`` and ``numpy`` (None if absent)."""
    full = {r["kind"]: r["sums"] for r in rows if r["clients"] == max(x["clients"] for x in rows)}
    if "fedavg" not in full or "numpy" not in full:
        return None
    return max(abs(full["fedavg"][n] - full["numpy"][n]) / max(abs(full["numpy"][n]), 1e-30) for n in full["numpy"])


def sha256_gbps(manifest: dict) -> float:
    """GB/s of ``hashlib.sha256`` over the largest update file (``TensorStore.get`` hashes every read)."""
    store = TensorStore(manifest["store"])
    largest = max({r["tensor_sha256"] for r in manifest["rows"]}, key=lambda sha: store.path(sha).stat().st_size)
    data = store.path(largest).read_bytes()
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / GB / (time.perf_counter() - start)


def print_report(opts, manifest: dict, rows: list[dict], sha_gbps: float) -> None:
    model_mib = manifest["model_bytes"] / MIB
    sizes = manifest["file_bytes"]
    print(
        f"model: {opts.layers} MoE layer(s) x {opts.experts} experts, hidden {HIDDEN}, expert FFN {INTERMEDIATE} "
        f"(SmolLM2-135M upcycled), float32: global state {model_mib:.1f} MiB"
    )
    print(
        f"updates: {opts.files} distinct files of {min(sizes) / MIB:.1f}-{max(sizes) / MIB:.1f} MiB "
        f"(mean {np.mean(sizes) / MIB:.1f} MiB, 1..{opts.experts} experts per layer), read by {opts.clients} "
        f"clients cyclically: {round_bytes(manifest, opts.clients) / GB:.2f} GB of update tensors per round"
    )
    numpy_row = next((r for r in rows if r["kind"] == "numpy" and r["clients"] == opts.clients), None)
    print(
        "kind | clients | update GB | wall s | GB/s | x numpy | CPU s | GB/CPU-s | x numpy (CPU) | "
        "RSS before MiB | aggregation peak MiB | peak - before MiB | (peak - before) / model | updates / model"
    )
    for r in rows:
        gbps, cpu_gbps = r["bytes"] / GB / r["seconds"], r["bytes"] / GB / r["cpu_seconds"]
        ratio = ratio_cpu = float("nan")
        if numpy_row:
            ratio = gbps / (numpy_row["bytes"] / GB / numpy_row["seconds"])
            ratio_cpu = cpu_gbps / (numpy_row["bytes"] / GB / numpy_row["cpu_seconds"])
        grown = r["peak_rss_mib"] - r["base_rss_mib"]
        print(
            " | ".join(
                [
                    r["kind"],
                    str(r["clients"]),
                    f"{r['bytes'] / GB:.2f}",
                    f"{r['seconds']:.1f}",
                    f"{gbps:.3f}",
                    f"{ratio:.2f}",
                    f"{r['cpu_seconds']:.1f}",
                    f"{cpu_gbps:.3f}",
                    f"{ratio_cpu:.2f}",
                    f"{r['base_rss_mib']:.0f}",
                    f"{r['peak_rss_mib']:.0f}",
                    f"{grown:.0f}",
                    f"{grown / model_mib:.2f}",
                    f"{r['bytes'] / MIB / model_mib:.0f}",
                ]
            )
        )
    print(f"sha256 on this CPU: {sha_gbps:.3f} GB/s (TensorStore.get verifies the hash of every file it reads)")
    agree = sums_agree(rows)
    if agree is not None:
        print(f"fedavg vs numpy: largest relative difference of the output tensor sums {agree:.1e}")
    if not all(r["peak_reset"] for r in rows):
        print("note: /proc/self/clear_refs unsupported: the peak includes loading the global state")


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100, help="update rows per round")
    parser.add_argument(
        "--layers",
        type=int,
        default=1,
        help="MoE layers (8 = the default simulation: ~21 GB of updates per round at 100 clients)",
    )
    parser.add_argument("--experts", type=int, default=4, help="global experts per MoE layer")
    parser.add_argument("--files", type=int, default=10, help="distinct update files the rows cycle through")
    parser.add_argument("--memory-clients", type=int, default=10, help="hfedmoe is also run with this many clients")
    parser.add_argument(
        "--kinds",
        nargs="*",
        default=DEFAULT_KINDS,
        choices=KINDS,
        help="what to measure (default: all but fedalign, which doubles the run time)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where to write the tensor store (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="20 clients, 5 files: a sanity run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.clients, opts.files, opts.memory_clients = 20, 5, 5
    return opts


def main(argv: list[str]) -> int:
    opts = _parse(argv)
    if opts.child:
        print(json.dumps(child(opts.manifest, opts.child, opts.clients)))
        return 0
    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-agg-", dir=opts.workdir) as tmp:
        start = time.perf_counter()
        manifest = prepare(Path(tmp), opts)
        manifest_path = Path(tmp) / "manifest.json"
        manifest_path.write_text(json.dumps(manifest))
        print(f"wrote the global state and {opts.files} updates in {time.perf_counter() - start:.0f} s", flush=True)
        rows = measure(manifest_path, manifest, opts.kinds, opts.clients, opts.memory_clients)
        sha_gbps = sha256_gbps(manifest)
    print_report(opts, manifest, rows, sha_gbps)
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
