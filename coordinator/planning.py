"""What the coordinator does with a strategy's FitIns and a device's Update: the bundle store (a graph per
ShapeKey), slicing the global state for an assignment, validating an update against the bundle manifest, and
turning a stored update back into a strategy ``ClientUpdate``. Which experts a device trains is the
strategy's choice (``coordinator.strategy.selection``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from coordinator.strategy.types import ClientUpdate, Params
from coordinator.strategy.validate import validate_update
from device_runtime.bundle import (
    FORMAT_VERSION,
    FROZEN,
    MANIFEST,
    Manifest,
    ShapeKey,
    TensorRole,
    TensorSpec,
    load_bundle,
    tensor_role,
)
from device_runtime.errors import BundleError, ExportError, ProtocolError, UpdateRejected
from device_runtime.files import atomic_write
from device_runtime.shape_key import standin_expert
from device_runtime.signing import MANIFEST_SIG, Signer
from device_runtime.stats import RoutingStats
from device_runtime.wire import BundleFile, EvalResult, FitConfig
from device_runtime.wire.fields import MAX_EVAL_LOSS

# ---------------------------------------------------------------- bundle store


class BundleStore:
    """Bundle directories by shape key id under ``root`` (graph + tokenizer + placeholder weights); their
    manifests carry ``training`` (the federation's ``[fit]``) as the defaults of ``fedmoe-device train-local``.

    Any expert selection of a shape gives the same graph; the weights a device trains arrive with each
    assignment. Writing a bundle runs torch and the ONNX export (seconds) in a child process of its own
    (:func:`export_bundles`), so that a serving coordinator never holds torch and the export's memory (measured,
    ``bench/bench_connections.py``: +370 MiB RSS for the tiny test model when it ran in process): call
    :meth:`ensure` off the event loop. With a ``signer`` every bundle gets ``manifest.sig`` as it is written (a
    bundle written before the coordinator had one is signed when first loaded, after its files verified):
    ``device_runtime.signing``.
    """

    def __init__(self, root: str | Path, checkpoint: str | Path, training: FitConfig, signer: Signer | None = None):
        self.root, self.checkpoint, self.training, self.signer = Path(root), Path(checkpoint), training, signer
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._manifests: dict[str, Manifest] = {}

    def ensure(self, key: ShapeKey) -> Manifest:
        """The manifest of ``key``'s bundle, writing the bundle first if it is not cached (or was written by a
        fedmoe of another bundle format)."""
        return self.ensure_all([key])[key.id]

    def ensure_all(self, keys: Iterable[ShapeKey]) -> dict[str, Manifest]:
        """The manifests of ``keys``' bundles by shape key id, writing those not cached first, all in one child
        process: a round's new bundles pay its start and torch import (~6 s on 2 cores) once, not each."""
        with self._lock:
            wanted = {key.id: key for key in keys}
            missing = [k for i, k in wanted.items() if i not in self._manifests and not _current_format(self.root / i)]
            if missing:
                self._write(missing)
            for shape_key_id in wanted:
                if shape_key_id not in self._manifests:
                    self._manifests[shape_key_id] = self._load(self.root / shape_key_id)
            return {shape_key_id: self._manifests[shape_key_id] for shape_key_id in wanted}

    def _write(self, keys: list[ShapeKey]) -> None:
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".tmp-") as tmp:
            jobs = [(Path(tmp) / key.id, key) for key in keys]
            _in_child_process(export_bundles, self.checkpoint, jobs, self.training)
            for out, key in jobs:
                self._sign(out)
                shutil.rmtree(self.root / key.id, ignore_errors=True)  # one of an older bundle format
                os.replace(out, self.root / key.id)

    def _load(self, root: Path) -> Manifest:
        manifest = load_bundle(root).manifest
        if not (root / MANIFEST_SIG).is_file():
            self._sign(root)
        return manifest

    def _sign(self, root: Path) -> None:
        if self.signer is not None:
            atomic_write(root / MANIFEST_SIG, self.signer.manifest((root / MANIFEST).read_bytes()))

    def manifest(self, shape_key_id: str) -> Manifest:
        """The cached manifest of a bundle already written.

        Raises:
            BundleError: no bundle of that id (a device asked for a shape it was never assigned).
        """
        if shape_key_id not in self._manifests:
            if not (self.root / shape_key_id / MANIFEST).is_file():
                raise BundleError(f"no bundle {shape_key_id!r} in the coordinator's cache")
            self._manifests[shape_key_id] = self._load(self.root / shape_key_id)
        return self._manifests[shape_key_id]

    def files(self, shape_key_id: str) -> dict[str, bytes | BundleFile]:
        """Every file of a cached bundle, relative path -> the file with its manifest sha256 (sent from disk in
        chunks, ``wire.bundle_chunks``), ``manifest.sig`` (if signed) and the manifest last, as bytes."""
        manifest, root = self.manifest(shape_key_id), self.root / shape_key_id
        files: dict[str, bytes | BundleFile] = {
            name: BundleFile.of(root / name, manifest.files[name]) for name in sorted(manifest.files)
        }
        if (root / MANIFEST_SIG).is_file():
            files[MANIFEST_SIG] = (root / MANIFEST_SIG).read_bytes()
        files[MANIFEST] = (root / MANIFEST).read_bytes()
        return files


def export_bundles(checkpoint: Path, jobs: list[tuple[Path, ShapeKey]], training: FitConfig) -> None:
    """Write the bundle of each ``(out, key)`` (every expert selection of its shape: experts ``0..n-1`` per layer)
    to ``out`` with ``training`` as its manifest's defaults (``export.bundle_writer``, which imports torch)."""
    from export.bundle_writer import BundleRequest, write_bundle

    for out, key in jobs:
        request = BundleRequest(
            keep=tuple(tuple(range(c)) for c in key.experts_per_layer),
            trainable_mode=key.trainable_mode,
            lora_rank=key.lora_rank,
            prox=key.prox,
            training=training,
            frozen_dtype=key.frozen_dtype,
            merged=key.merged,
            cut_layer=key.cut_layer,
        )
        write_bundle(checkpoint, out, request)


def _in_child_process(function: Callable[..., None], *args) -> None:
    """``function(*args)`` in a fresh child process (spawned, ended once it returns): what it imports and
    allocates stays out of this process.

    Raises:
        What ``function`` raises; ExportError if the child died (killed for memory, say).
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            pool.submit(function, *args).result()
        except BrokenProcessPool as exc:
            raise ExportError(f"the bundle export process ended abruptly (out of memory?): {exc}") from exc


# ---------------------------------------------------------------- assignment tensors


def _current_format(root: Path) -> bool:
    """Whether ``root`` holds a bundle manifest of this fedmoe's ``FORMAT_VERSION``."""
    try:
        return json.loads((root / MANIFEST).read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def slice_assignment(
    global_state: Mapping[str, np.ndarray], manifest: Manifest, expert_ids: tuple[tuple[int, ...], ...]
) -> dict[str, np.ndarray]:
    """``global[source][rows]`` (expert axis 0) for every TensorSpec of the bundle, in the spec's dtype: the rows
    are ``Manifest.rows(spec, expert_ids)`` (the trained experts, the frozen ones or both), the source the spec's
    ``source`` or its own name, merged into their stand-in for a merged bundle's frozen experts
    (``shape_key.standin_expert``), axes 1 and 2 swapped for a ``transposed`` spec.

    Raises:
        BundleError: a spec names a tensor missing from the global state or of another shape.
    """
    out = {}
    for spec in manifest.tensors:
        source = spec.source or spec.name
        if source not in global_state:
            raise BundleError(f"bundle tensor {source} is not in the global state; re-run `fedmoe-coord init`")
        rows = _take_rows(global_state[source], list(manifest.rows(spec, expert_ids)))
        rows = standin_expert(rows) if spec.rows == FROZEN and manifest.shape_key.merged else rows
        rows = np.ascontiguousarray(np.swapaxes(rows, 1, 2) if spec.transposed else rows, dtype=spec.dtype)
        if rows.shape != tuple(spec.shape):
            raise BundleError(f"{spec.name}: global slice {rows.shape} != bundle spec {tuple(spec.shape)}")
        out[spec.name] = rows
    return out


def _take_rows(array: np.ndarray, rows: list[int]) -> np.ndarray:
    """``array[rows]`` along axis 0: a view (no copy; the assignment's encoder reads it once) when the rows are
    one ascending run, e.g. every expert of a layer or a single one; else numpy's copy."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return array[rows[0] : rows[0] + len(rows)]
    return array[rows]


# ---------------------------------------------------------------- update validation


def check_update(
    manifest: Manifest,
    expert_ids: tuple[tuple[int, ...], ...],
    *,
    device_id: str,
    num_examples: int,
    tensors: Mapping[str, np.ndarray],
    trained_experts,
    routing: dict,
    metrics: dict,
    norm_bound: float,
    global_params: Params,
) -> dict[str, np.ndarray]:
    """Validate an Update against its assignment's bundle manifest and the global model; returns the tensors as
    float32.

    The manifest fixes the exact trainable name set, and each tensor's L2 norm must be <= ``norm_bound``; the rest
    (shapes, finite values, num_examples > 0, trained experts among the assigned ones, routing statistics of the
    held experts) is the strategy layer's one validation, ``coordinator.strategy.validate.validate_update``, run
    on the update as the strategy will read it (:func:`to_client_update`).

    Raises:
        UpdateRejected: naming the first problem.
    """
    expected = {s.name for s in manifest.tensors if s.trainable}
    if set(tensors) != expected:
        raise UpdateRejected(
            f"tensor set differs from the bundle: missing {sorted(expected - set(tensors))[:3]}, "
            f"unexpected {sorted(set(tensors) - expected)[:3]}"
        )
    meta = update_meta(manifest, expert_ids, trained_experts, routing, metrics)
    update = to_client_update(device_id, num_examples, meta, tensors)
    validate_update(update, global_params)
    for name, array in update.tensors.items():
        if float(np.linalg.norm(array)) > norm_bound:
            raise UpdateRejected(f"tensor {name}: L2 norm above the bound {norm_bound:g}")
    return dict(update.tensors)


def check_evaluation(evaluation: EvalResult | None, config: FitConfig) -> dict | None:
    """Validate a device's federated evaluation (``Update.evaluation``) against its assignment's ``config``;
    returns it as JSON for the registry (``loss``, ``num_examples``, ``num_tokens`` and ``accuracy`` if sent), or
    None when there is none.

    The decoder already bounds each field (``wire.EvalResult``); this checks again (an Update built in process
    skips the decoder) and against the assignment: finite loss in ``[0, MAX_EVAL_LOSS]`` nats per token,
    ``num_examples >= 1``, at most ``seq_len`` tokens per example, accuracy in [0, 1], and an evaluation only when
    ``config.eval_fraction > 0`` asked for one.

    Raises:
        UpdateRejected: naming the first problem.
    """
    if evaluation is None:
        return None
    if config.eval_fraction <= 0:
        raise UpdateRejected("evaluation sent, but the assignment asked for none (eval_fraction 0)")
    loss, accuracy = evaluation.loss, evaluation.accuracy
    numbers = (loss, evaluation.num_examples, evaluation.num_tokens) + (() if accuracy is None else (accuracy,))
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in numbers):
        raise UpdateRejected("evaluation numbers must be finite numbers")
    if not 0.0 <= loss <= MAX_EVAL_LOSS:
        raise UpdateRejected(f"evaluation loss {loss:g} outside [0, {MAX_EVAL_LOSS:g}] nats per token")
    if int(evaluation.num_examples) != evaluation.num_examples or evaluation.num_examples < 1:
        raise UpdateRejected("evaluation num_examples must be an integer >= 1")
    if not 0 <= evaluation.num_tokens <= evaluation.num_examples * config.seq_len:
        raise UpdateRejected(
            f"evaluation num_tokens {evaluation.num_tokens} outside [0, num_examples x seq_len {config.seq_len}]"
        )
    if accuracy is not None and not 0.0 <= accuracy <= 1.0:
        raise UpdateRejected(f"evaluation accuracy {accuracy:g} outside [0, 1]")
    out = {"loss": float(loss), "num_examples": int(evaluation.num_examples), "num_tokens": int(evaluation.num_tokens)}
    return out if accuracy is None else {**out, "accuracy": float(accuracy)}


# ---------------------------------------------------------------- stored update -> strategy input


def update_meta(
    manifest: Manifest, expert_ids, trained_experts, routing: dict, metrics: dict, evaluation: dict | None = None
) -> dict:
    """The JSON a stored update needs to become a ClientUpdate again (registry ``updates.metadata``), and the
    device's federated evaluation (:func:`check_evaluation`) when it sent one."""
    trainable = [s for s in manifest.tensors if s.trainable]
    held = manifest.held_ids(expert_ids)
    frozen = [list(h[len(ids) :]) for h, ids in zip(held, expert_ids)]
    return {
        "expert_ids": [list(ids) for ids in expert_ids],
        "trained_experts": [list(t) for t in trained_experts],
        "routing": routing,
        "metrics": metrics,
        "layers": {s.name: s.layer for s in trainable},
        "roles": {s.name: s.role.value for s in trainable},
        "shape_key": manifest.shape_key.id,
        "frozen_ids": frozen,
        **({"evaluation": evaluation} if evaluation is not None else {}),
    }


def to_client_update(device_id: str, num_examples: int, meta: dict, tensors: Mapping[str, np.ndarray]) -> ClientUpdate:
    """Rebuild a strategy ``ClientUpdate`` from an update and its :func:`update_meta`.

    Raises:
        UpdateRejected: the routing statistics are malformed or describe other experts than the held ones.
    """
    expert_ids = tuple(tuple(ids) for ids in meta["expert_ids"])
    frozen_ids = tuple(tuple(ids) for ids in meta.get("frozen_ids") or [()] * len(expert_ids))
    try:
        stats = RoutingStats.from_dict(meta["routing"])
    except ProtocolError as exc:
        raise UpdateRejected(f"routing statistics: {exc}") from exc
    held = tuple(ids + frozen for ids, frozen in zip(expert_ids, frozen_ids))
    if stats.experts_per_layer != tuple(map(len, held)) or stats.expert_ids not in (None, held):
        raise UpdateRejected("routing statistics do not describe the assigned experts")
    roles = meta.get("roles") or {}  # absent in updates stored by fedmoe before bundle format 2
    tensor_meta = {
        name: TensorSpec(
            name,
            tuple(np.shape(tensor)),
            layer=int(meta["layers"][name]),
            expert_axis=0,
            role=TensorRole(roles.get(name) or tensor_role(name)),
        )
        for name, tensor in tensors.items()
    }
    return ClientUpdate(
        client_id=device_id,
        num_examples=int(num_examples),
        tensors={n: np.asarray(t, dtype=np.float32) for n, t in tensors.items()},
        tensor_meta=tensor_meta,
        expert_ids=expert_ids,
        frozen_ids=frozen_ids,
        trained_experts=tuple(frozenset(t) for t in meta["trained_experts"]),
        routing=tuple(stats.layers),
        metrics=dict(meta.get("metrics", {})),
    )
