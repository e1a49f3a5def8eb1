"""Helpers shared by several test files: tiny Mixtral checkpoints, a coordinator in a thread, fake updates.

Import them as ``from helpers import ...`` (pytest's default import mode puts ``tests/`` on ``sys.path``).
Nothing here imports torch at module level: files that need torch skip without it before calling these.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from coordinator.strategy import ClientUpdate, FitContext, LayerRouting, TensorRole, TensorSpec
from device_runtime.stats import RoutingStats
from device_runtime.wire import Assignment, Update

REPO = Path(__file__).resolve().parents[1]


def lite_requirements() -> list[str]:
    """The base dependencies plus the ``device-lite`` extra (what a Pi or phone installs), from pyproject.toml."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["device-lite"]]


@contextlib.contextmanager
def build_lock(directory: Path):
    """An exclusive ``flock`` on ``directory / ".lock"``: concurrent test runs sharing a cache build it once."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- tiny Mixtral checkpoints


@dataclass(frozen=True)
class TinyMixtral:
    """Sizes and WordLevel vocabulary of a seeded tiny Mixtral (2 layers, 4 experts, top-2).

    Token ids: ``<pad>`` 0, ``<unk>`` 1, ``words[i]`` i + 3 (so ``vocab_size`` must exceed ``len(words) + 2``).
    """

    words: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


# Device-side tests (ORT trainer, device client): the vocabulary covers RECORDS.
TRAINER_MIXTRAL = TinyMixtral(
    words=tuple(
        (
            "Article : Topic the match team won lost game market shares profit bank film star award phone "
            "software chip sport business tech entertainment"
        ).split()
    ),
    vocab_size=48,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# Coordinator-side tests (server, CLI, device end to end).
COORD_MIXTRAL = TinyMixtral(
    words=tuple("the match team won lost market shares profit bank film star award phone chip".split()),
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_attention_heads=2,
    num_key_value_heads=1,
)

RECORDS = [
    {"text": "the match team won", "label": "sport"},
    {"text": "market shares profit bank", "label": "business"},
    {"text": "film star award", "label": "entertainment"},
    {"text": "phone software chip", "label": "tech"},
]
SEQ_LEN = 16
CALIBRATION_TEXTS = ["the match team won", "market shares profit bank", "film star award phone"]


def tiny_checkpoint(root: Path, model: TinyMixtral) -> Path:
    """Write a seeded (torch seed 0) tiny Mixtral checkpoint and a WordLevel tokenizer.json to ``root``."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    MixtralForCausalLM(config).save_pretrained(root)
    write_tokenizer(root, model.words)
    return root


def write_tokenizer(root: Path, words: tuple[str, ...]) -> None:
    """A WordLevel ``root / "tokenizer.json"``: ``<pad>`` 0, ``<unk>`` 1, ``words[i]`` i + 3."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(root / "tokenizer.json"))


# dense families fedmoe upcycles, each with the feature that sets it apart switched on
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")


def tiny_dense(family: str, *, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int = 2):
    """A seeded (torch seed 0) tiny random dense CausalLM of ``family`` (:data:`DENSE_FAMILIES`), every weight
    drawn N(0, 0.2^2) so no part is left at its zero or one initialisation: Mistral with a sliding window of 4,
    Qwen2 with its q/k/v biases, Qwen3
    with QK-norm, Gemma 3 with a sliding-window layer (window 4) then a global one, GELU-tanh, (1 + w) RMSNorms,
    sandwich norms and scaled embeddings, Phi-3 with fused qkv and gate_up projections. 4 heads of 8, 2 KV heads.
    """
    import torch
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    layer_types = ["sliding_attention", "full_attention"] * num_layers
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=4),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(
            **common, sliding_window=4, layer_types=layer_types[:num_layers], query_pre_attn_scalar=8
        ),
        "phi3": lambda: transformers.Phi3Config(**common),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[family]())
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def init_by_cli(root: Path, *init_args: str) -> Path:
    """``fedmoe-coord init`` of the tiny Mixtral (two calibration texts, port 0) under ``root`` with
    ``init_args`` added; returns the written config file."""
    import json

    from click.testing import CliRunner

    from coordinator.cli import main

    checkpoint = tiny_checkpoint(root / "checkpoint", COORD_MIXTRAL)
    texts = root / "calib.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the match team won", "film star award")))
    config = root / "coord.toml"
    if "--frozen-experts" not in init_args:  # these coordinators test protocol and rounds: pruned budgets are exact
        init_args = (*init_args, "--frozen-experts", "pruned")
    result = CliRunner().invoke(
        main,
        [
            "--config",
            str(config),
            "init",
            str(checkpoint),
            "--state-dir",
            str(root / "state"),
            "--calibration-texts",
            str(texts),
            "--port",
            "0",
            *init_args,
        ],
    )
    assert result.exit_code == 0, result.output
    return config


def tiny_bundle(root: Path, *, keep=((0, 2), (1, 3)), copies: int = 2):
    """``(Bundle, data_file)``: a verified ``TRAINER_MIXTRAL`` bundle at ``root / "bundle"`` (experts ``keep``
    per layer, batch 2 x ``SEQ_LEN``) and ``RECORDS`` repeated ``copies`` times as JSONL (``root / "data.jsonl"``)."""
    import json

    import pytest

    from device_runtime.bundle import load_bundle
    from device_runtime.wire import FitConfig
    from export.bundle_writer import BundleRequest, write_bundle

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDMOE_CACHE", str(root / "cache"))
        write_bundle(
            tiny_checkpoint(root / "checkpoint", TRAINER_MIXTRAL),
            root / "bundle",
            BundleRequest(keep=keep, training=FitConfig(batch_size=2, seq_len=SEQ_LEN)),
        )
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * copies))
    return load_bundle(root / "bundle"), data


def two_expert_memory(checkpoint) -> float:
    """A memory budget (MiB) under which the planner keeps exactly 2 of the 4 experts per layer (pruned:
    ``init_by_cli`` and ``initialised_coordinator`` set ``frozen_experts = "pruned"`` unless told otherwise)."""
    from export.planner import TrainingShape, estimate, model_shape

    shape, train = model_shape(checkpoint), TrainingShape(batch_size=2, seq_len=8)
    two, three = estimate(shape, train, 2).peak_mib, estimate(shape, train, 3).peak_mib
    assert two < three
    return (two + three) / 2


# ---------------------------------------------------------------- a real coordinator


def config_with(cfg, **changes):
    """``dataclasses.replace`` of a ``CoordinatorConfig``, where ``coordinator.rounds.RoundPolicy`` field names
    (``min_fit_clients``, ``deadline_s``, ``max_attempts`` ...) change its ``[rounds]`` table."""
    import dataclasses

    from coordinator.rounds import RoundPolicy

    names = {f.name for f in dataclasses.fields(RoundPolicy)}
    rounds = {k: changes.pop(k) for k in list(changes) if k in names}
    return dataclasses.replace(cfg, rounds=dataclasses.replace(cfg.rounds, **rounds), **changes)


def initialised_coordinator(root: Path, state_dir: Path, checkpoint: Path | None = None, **overrides):
    """A ``CoordinatorConfig`` (HFedMoE, one client per round, port 0) over a fresh ``COORD_MIXTRAL`` checkpoint
    at ``root / "checkpoint"``, with the global state initialised (model version 0), devices pruned to the experts
    they train (``frozen_experts``: these coordinators test protocol and rounds, ``tests/test_frozen_experts.py``
    and ``tests/test_reference_parity.py`` the frozen rungs). ``overrides`` replace config fields (and
    ``[rounds]`` fields, :func:`config_with`). It serves plain
    ws:// (``insecure``: its clients speak the protocol by hand); pass it
    through ``coordinator.tls.with_new_authority`` for wss:// with mutual TLS. ``checkpoint``: another model
    directory (with a tokenizer covering ``CALIBRATION_TEXTS``) instead of ``COORD_MIXTRAL``'s."""
    from coordinator.config import CoordinatorConfig
    from coordinator.federation import initialize

    checkpoint = checkpoint or tiny_checkpoint(root / "checkpoint", COORD_MIXTRAL)
    fields = dict(
        checkpoint=str(checkpoint),
        state_dir=str(state_dir),
        port=0,
        rounds={"min_fit_clients": 1, "max_fit_clients": 1, "deadline_s": 120},
        strategy="hfedmoe",
        insecure=True,
        frozen_experts="pruned",
        fit={"batch_size": 2, "seq_len": 8, "local_steps": 2},
    )
    cfg = config_with(CoordinatorConfig(**fields), **overrides)
    assert initialize(cfg, CALIBRATION_TEXTS).version == 0
    return cfg


class ServerThread:
    """``serve_coordinator`` on its own event loop in a daemon thread."""

    def __init__(self, cfg):
        from coordinator.server import serve_coordinator

        self.cfg, self.port, self._ready, self._loop, self._stop = cfg, None, threading.Event(), None, None
        self.error = None

        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await serve_coordinator(cfg, self._stop, ready=self._on_ready)

        def target():
            try:
                asyncio.run(main())
            except BaseException as exc:  # surfaced by the test through .error
                self.error = exc
                self._ready.set()

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()
        assert self._ready.wait(60), "server did not start"
        assert self.error is None, self.error

    def _on_ready(self, port):
        self.port = port
        self._ready.set()

    @property
    def url(self):
        from coordinator.tls import local_url

        return local_url(self.cfg, self.port)

    def stop(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive()


class InboxDevice:
    """An enrolled device for an in-process ``Coordinator``: ``session`` (profile ``profile``) collects what the
    coordinator sends in ``inbox``."""

    def __init__(self, registry, name, profile):
        from coordinator.service import Session
        from device_runtime.auth import generate_keypair

        token = registry.create_enroll_token(name, 60)
        self.device = registry.redeem_token(token, name, profile, generate_keypair()[1])
        self.inbox = []
        self.revocations = 0  # times the coordinator ended the session as revoked
        self.session = Session(self.device.id, profile, self.send, self.revoked)

    async def send(self, msg):
        self.inbox.append(msg)

    def revoked(self):
        self.revocations += 1


@contextlib.contextmanager
def one_round_federation(tmp_path: Path, *, max_message_mib: float, **overrides):
    """A real coordinator for one round (``initialised_coordinator(**overrides)`` in a ``ServerThread``) and
    what a CLI device needs: yields ``(server, registry, data, memory_mib)`` with a 4-record JSONL file and a
    budget (whole MiB, a string for ``--memory-mib``) under which the planner keeps 2 experts per layer."""
    import json
    import math

    import pytest

    from coordinator.registry import Registry

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDMOE_CACHE", str(tmp_path / "cache"))
        cfg = initialised_coordinator(
            tmp_path, tmp_path / "coord", max_message_mib=max_message_mib, num_rounds=1, **overrides
        )
        server = ServerThread(cfg)
    registry = Registry(cfg.registry_url)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "sport"}) + "\n" for t in ("the match team won",) * 4))
    try:
        yield server, registry, data, str(math.ceil(two_expert_memory(tmp_path / "checkpoint")))
    finally:
        registry.close()
        server.stop()


def run_cli_device_round(
    cli: list[str],
    env: dict,
    url: str,
    registry,
    *,
    name: str,
    memory_mib: str,
    max_message_mib: float,
    data: Path,
    timeout_s: float = 60,
):
    """``<cli> enroll`` then ``<cli> run`` (``cli``: the command before the verb, e.g. ``[python, "-m",
    "device_runtime.cli"]``; ``env`` holds ``FEDMOE_ENROLL_TOKEN``) against the coordinator at ``url`` until a
    round finishes, then SIGTERM (the device must exit 0). Returns ``(round, update, stderr)``: the one
    round, its one accepted update and the device's log."""
    import signal
    import subprocess
    import time

    enrolled = subprocess.run(
        [*cli, "enroll", url, "--name", name, "--memory-mib", memory_mib],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    device = subprocess.Popen(
        [
            *cli,
            "run",
            url,
            "--data",
            str(data),
            "--threads",
            "1",
            "--memory-mib",
            memory_mib,
            "--max-message-mib",
            str(max_message_mib),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while all(r.status == "running" for r in registry.list_rounds()):
            assert time.monotonic() < deadline and device.poll() is None, "no round ended"
            time.sleep(0.2)
        (round_,) = registry.list_rounds()
        assert round_.status == "finished", round_.metrics
        (update,) = registry.accepted_updates(round_.id)
        device.send_signal(signal.SIGTERM)
        assert device.wait(timeout=timeout_s / 2) == 0
        return round_, update, device.stderr.read()
    finally:
        if device.poll() is None:
            device.kill()


def fake_update(assignment: Assignment, manifest, *, trained_local: int = 0) -> Update:
    """What a device would send: trainable tensors shifted by +1 on the trained experts, valid routing (over every
    expert the bundle holds)."""
    tensors = {}
    for spec in manifest.tensors:
        if spec.trainable:
            value = assignment.tensors[spec.name].copy()
            if not spec.name.endswith("mlp.gate.weight"):
                value[trained_local] += 1.0
            else:
                value += 0.5
            tensors[spec.name] = value
    held = manifest.held_ids(assignment.expert_ids)  # a resident bundle's statistics cover its frozen experts too
    counts = tuple(map(len, held))
    stats = RoutingStats(counts, held)
    per_layer = []
    for c in counts:
        probs = np.full(c, 1.0 / c)
        routed = np.zeros(c)
        routed[trained_local] = 8
        per_layer.append(np.stack([probs * 8, probs, 8 * probs * np.log(probs), routed]))
    stats.update(per_layer, 8)
    trained = tuple((ids[trained_local],) for ids in assignment.expert_ids)
    return Update(
        update_id=assignment.update_id,
        round_id=assignment.round_id,
        num_examples=4,
        num_tokens=8,
        metrics={"loss": 2.5},
        routing=stats.to_dict(),
        trained_experts=trained,
        tensors=tensors,
    )


# ---------------------------------------------------------------- strategy inputs (no model)

MOE_EXPERTS = "model.layers.0.mlp.experts.down_proj"
MOE_GATE = "model.layers.0.mlp.gate.weight"


def stored_update_row(store, device_id, n, values, usage=(1.0, 1.0)):
    """A registry-like update row (``device_id``, ``num_examples`` ``n``, ``meta``, ``tensor_sha256``) over a
    ``TensorStore``: both experts of one MoE layer of 2, every element of expert e's rows (experts and router)
    ``values[e]``; ``usage``: the experts' routed mass per token of 2 tokens (the default: both, every token)."""
    from types import SimpleNamespace

    tensors = {
        MOE_EXPERTS: np.array([[values[0]] * 3, [values[1]] * 3], np.float32),
        MOE_GATE: np.array([[values[0]] * 3, [values[1]] * 3], np.float32),
    }
    stats = RoutingStats([2])
    stats.update([np.array([usage, [0.6, 0.6], [0.0, 0.0], [1.0, 1.0]])], num_tokens=2)
    meta = {
        "expert_ids": [[0, 1]],
        "trained_experts": [[0, 1]],
        "routing": stats.to_dict(),
        "metrics": {},
        "layers": {MOE_EXPERTS: 0, MOE_GATE: 0},
    }
    return SimpleNamespace(device_id=device_id, num_examples=n, meta=meta, tensor_sha256=store.put(tensors))


EXPERT = TensorSpec("experts.w", (), layer=0, expert_axis=0, role=TensorRole.EXPERT)
ROUTER = TensorSpec("gate.weight", (), layer=0, expert_axis=0, role=TensorRole.ROUTER)
OTHER = TensorSpec("attn.w", ())  # SHARED


def tiny_global():
    """One MoE layer, 4 experts, hidden 2: experts.w (4, 2), gate.weight (4, 2), attn.w (2,)."""
    return {
        "experts.w": np.array([[0, 0], [10, 10], [20, 20], [30, 30]], np.float32),
        "gate.weight": np.array([[0, 0], [0, 0], [0, 0], [9, 9]], np.float32),
        "attn.w": np.array([0, 0], np.float32),
    }


def routing(k, usage=None, specific=None, *, num_tokens=8) -> LayerRouting:
    """One layer's routing statistics over ``k`` local experts (default: uniform usage), KL 0, every expert
    routed ``num_tokens`` tokens."""
    usage = np.full(k, 1.0 / k) if usage is None else np.asarray(usage, np.float64)
    specific = usage if specific is None else np.asarray(specific, np.float64)
    return LayerRouting(
        usage=usage, specific=specific, kl=np.zeros(k), tokens_routed=np.full(k, num_tokens), num_tokens=num_tokens
    )


def make_update(cid, n, ids, experts, gate, other, *, trained=None, usage=None, s_spec=None):
    """An update of ``tiny_global``'s layout holding experts ``ids`` (``s_spec``: the specific scores)."""
    return ClientUpdate(
        client_id=cid,
        num_examples=n,
        tensors={
            "experts.w": np.asarray(experts, np.float32),
            "gate.weight": np.asarray(gate, np.float32),
            "attn.w": np.asarray(other, np.float32),
        },
        tensor_meta={"experts.w": EXPERT, "gate.weight": ROUTER, "attn.w": OTHER},
        expert_ids=(tuple(ids),),
        trained_experts=(frozenset(ids if trained is None else trained),),
        routing=(routing(len(ids), usage, s_spec),),
    )


# One MoE layer of 4 experts with usage u and specific score s (KL 0): I(e) = lam u + (1 - lam) s ranks
# them (0, 1) at lam 0.5 (a tie of 0 and 2 goes to the lower id), (1, 2) at lam 0.3 and (0, 2) at lam 0.9.
CALIBRATION_USAGE, CALIBRATION_SPECIFIC = (0.4, 0.1, 0.3, 0.2), (0.5, 0.9, 0.6, 0.3)


def tiny_context(**fit):
    """A FitContext of a 1-MoE-layer, 4-expert model with the calibration above; ``fit``: FitConfig fields."""
    from device_runtime.wire import FitConfig
    from export.planner import ModelShape

    shape = ModelShape(
        hidden=16,
        intermediate=24,
        vocab=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        moe_layers=1,
        num_experts=4,
        experts_per_token=2,
        shared_params=2000,
        expert_params=3 * 16 * 24,
    )
    tokens = 10
    p = np.asarray(CALIBRATION_USAGE)
    calibration = RoutingStats([4])
    calibration.update([np.stack([p * tokens, CALIBRATION_SPECIFIC, tokens * p * np.log(p), np.full(4, 5.0)])], tokens)
    return FitContext(shape, calibration, FitConfig(**{"batch_size": 2, "seq_len": 8, **fit}), seed=7)


def memory_for(context, kept: int, frozen_dtype: str | None = None, merged: bool = False) -> float:
    """A memory budget (MiB) whose cheapest fitting plan is ``kept`` trained experts per layer of ``context``, the
    others as ``frozen_dtype`` / ``merged`` say (``export.planner``): halfway between that estimate and the next
    larger estimate of any rung of the ladder (``coordinator.strategy.selection.affordable_fit``)."""
    from export.planner import TrainingShape, estimate

    base = TrainingShape(context.fit.batch_size, context.fit.seq_len)
    rungs = [base, replace(base, frozen_dtype="float16"), replace(base, frozen_dtype="float16", merged=True)]
    low = estimate(context.model, replace(base, frozen_dtype=frozen_dtype, merged=merged), kept).peak_mib
    above = [
        e
        for train in rungs
        for k in range(1, context.model.num_experts + 1)
        if (e := estimate(context.model, train, k).peak_mib) > low
    ]
    return (low + min(above, default=low + 1000)) / 2
