"""Every dense family fedmoe upcycles, end to end on a tiny random config (``helpers.tiny_dense``): Llama, Mistral
(sliding window), Qwen2
(attention biases), Qwen3 (QK-norm), Gemma 3 (sliding-window and global layers, GELU-tanh, (1 + w) RMSNorm, sandwich
norms, scaled embeddings) and Phi-3 (fused qkv and gate_up).

Per family: ``fedmoe-export upcycle`` of the dense checkpoint reproduces the dense logits (max |diff| measured, float32:
llama 1.8e-7, qwen2 1.2e-7, qwen3 8.9e-8, gemma3_text 1.2e-6, phi3 8.9e-8; asserted below :data:`MAX_UPCYCLE_DIFF`) and
loads back bit-exactly; one real federated round (a coordinator in a thread, one in-process ``DeviceClient`` over
websockets training a bundle pruned to 2 of the 4 experts per layer with ONNX Runtime) moves the global experts; the
Hugging Face export of the new global version scores the records exactly as the torch model with that global state
does. ORT-vs-torch gradient parity of each family is in ``tests/test_gradient_parity.py``; the ``.pte`` export is the
slow :func:`test_pte_export_scores_like_torch`.

Random weights only: no real checkpoint of these families is available offline, so what is checked is that the
computation is the same one, not that a trained model learns.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.training.api")
from click.testing import CliRunner  # noqa: E402
from helpers import (  # noqa: E402
    COORD_MIXTRAL,
    DENSE_FAMILIES,
    RECORDS,
    ServerThread,
    initialised_coordinator,
    memory_for,
    tiny_dense,
    write_tokenizer,
)

MAX_UPCYCLE_DIFF = 1e-5
WORDS = (*COORD_MIXTRAL.words, *sorted({r["label"] for r in RECORDS}), "software", "Topic", ":", "Article")
LABELS = sorted({r["label"] for r in RECORDS})
FIT = {"batch_size": 2, "seq_len": 16, "local_steps": 2, "learning_rate": 1e-2}


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, len(WORDS) + 3, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=DENSE_FAMILIES)
def upcycled(request, tmp_path_factory):
    """``(family, dense model, upcycled checkpoint directory)``: the dense checkpoint upcycled by the CLI."""
    from export.cli import main

    family = request.param
    root = tmp_path_factory.mktemp(family)
    dense = tiny_dense(family, vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=48)
    dense.save_pretrained(root / "dense")
    write_tokenizer(root / "dense", WORDS)
    out = root / "moe"
    result = CliRunner().invoke(
        main, ["upcycle", str(root / "dense"), "--experts", "4", "--top-k", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return family, dense, out


def test_upcycled_checkpoint_reproduces_the_dense_logits(upcycled):
    from export.families import describe
    from export.loading import load_causal_lm
    from export.planner import model_shape

    family, dense, checkpoint = upcycled
    moe = load_causal_lm(checkpoint)
    description = describe(moe)
    assert (description.num_experts, description.experts_per_token, len(description.layers)) == (4, 2, 2)
    as_mixtral = family in ("llama", "mistral")  # saved as a Mixtral checkpoint
    assert description.family == ("mixtral" if as_mixtral else family)
    config = json.loads((checkpoint / "config.json").read_text())
    assert ("fedmoe" in config) != as_mixtral
    with torch.no_grad():
        diff = (dense(_ids()).logits - moe(_ids()).logits).abs().max().item()
        assert diff < MAX_UPCYCLE_DIFF, (family, diff)
        again = load_causal_lm(checkpoint)(_ids()).logits
        torch.testing.assert_close(again, moe(_ids()).logits, rtol=0, atol=0)
    shape = model_shape(checkpoint)
    assert (shape.moe_layers, shape.num_experts, shape.experts_per_token, shape.intermediate) == (2, 4, 2, 48)


def _one_round(cfg, budget_mib: float, home) -> None:
    """One in-process ``DeviceClient`` with ``budget_mib`` against a coordinator thread until round 1 finished."""
    from coordinator.registry import Registry
    from device_runtime.client import Backoff, DeviceClient, enroll

    profile = {"memory_mib": budget_mib, "gflops": 5.0}
    server, registry = ServerThread(cfg), Registry(cfg.registry_url)

    async def run():
        creds = await enroll(
            server.url, registry.create_enroll_token("pi", 600), "pi", credentials_path=home / "c.json", profile=profile
        )
        client = DeviceClient(
            server.url,
            creds,
            home / "data.jsonl",
            cache_dir=home / "state",
            max_message_mib=cfg.max_message_mib,
            threads=1,
            profile=profile,
            heartbeat_s=1.0,
            backoff=Backoff(base_s=0.05, max_s=0.2),
        )
        task = asyncio.create_task(client.run())
        try:
            async with asyncio.timeout(120):
                while not any(r.status != "running" for r in registry.list_rounds()):
                    if task.done():
                        task.result()
                    await asyncio.sleep(0.1)
        finally:
            client.stop()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 15)

    home.mkdir(parents=True)
    (home / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 2))
    try:
        asyncio.run(run())
        (round_,) = registry.list_rounds()
        assert round_.status == "finished", round_.metrics
        (assignment,) = registry.assignments(round_.id)
        assert [len(ids) for ids in assignment.expert_ids] == [2, 2]  # pruned to the device's subset
    finally:
        registry.close()
        server.stop()


@pytest.mark.slow
def test_a_federated_round_then_the_hf_export_scores_like_torch(upcycled, tmp_path, monkeypatch):
    from coordinator.federation import export_latest, fit_context, tensor_store
    from coordinator.strategy import from_name
    from export.evaluate import label_accuracy
    from export.global_state import load_with_state
    from export.loading import load_causal_lm

    family, _, checkpoint = upcycled
    monkeypatch.setenv("FEDMOE_CACHE", str(tmp_path / "cache"))
    cfg = initialised_coordinator(tmp_path, tmp_path / "coord", checkpoint=checkpoint, num_rounds=1, fit=FIT)
    context = from_name(cfg.strategy, **cfg.strategy_params).bind(fit_context(cfg)).context
    _one_round(cfg, memory_for(context, 2), tmp_path / "device")

    store = tensor_store(cfg)
    v0, v1 = (store.load(_sha(cfg, v)) for v in (0, 1))
    moved = [n for n in v0 if not np.array_equal(np.asarray(v0[n]), np.asarray(v1[n]))]
    assert any(".mlp.experts." in n for n in moved), (family, moved)

    assert export_latest(cfg, tmp_path / "hf") == 1
    (tmp_path / "state.safetensors").write_bytes(store.get(_sha(cfg, 1)))
    torch_model = load_with_state(checkpoint, tmp_path / "state.safetensors").eval()
    exported = load_causal_lm(tmp_path / "hf")
    tokenizer = checkpoint / "tokenizer.json"
    want = label_accuracy(torch_model, tokenizer, RECORDS, LABELS, seq_len=16)
    got = label_accuracy(exported, tokenizer, RECORDS, LABELS, seq_len=16)
    assert got.accuracy == want.accuracy and got.loss == pytest.approx(want.loss, abs=1e-5), (family, got, want)


def _sha(cfg, version: int) -> str:
    from coordinator.registry import Registry

    registry = Registry(cfg.registry_url)
    try:
        return registry.get_model_version(version).tensor_sha256
    finally:
        registry.close()


# The decoders furthest from the Mixtral one ``tests/test_harness_executorch.py`` lowers; each lowering takes 25-60 s
# here (measured once for all five families: llama 32 s, qwen2 25 s, qwen3 55 s, gemma3_text 58 s, phi3 43 s, all
# within these tolerances).
PTE_FAMILIES = ("gemma3_text", "phi3")
# max |logit diff| of the .pte against torch: within 1e-4 for every family but Gemma 3 in that run (Phi-3 within the
# 1e-5 asserted here), whose logits (|z| up to 5 here) differ by 6e-4..7.3e-4 at every length 3-16, below its window
# of 4 too (XNNPACK's kernels; the op was not isolated)
MAX_PTE_DIFF = {"gemma3_text": 1e-3}


@pytest.mark.slow
def test_pte_export_scores_like_torch(upcycled, tmp_path):
    """The ExecuTorch ``.pte`` of the upcycled checkpoint (every expert) gives the torch model's logits and label
    scores (needs the ``executorch`` extra)."""
    pytest.importorskip("executorch.runtime")
    from export.evaluate import label_accuracy
    from export.executorch import PteModel, export_pte
    from export.loading import load_causal_lm

    family, _, checkpoint = upcycled
    if family not in PTE_FAMILIES:
        pytest.skip(f"{family}: lowered once by hand (see PTE_FAMILIES), not in CI")
    export_pte(checkpoint, tmp_path / "pte", max_seq_len=16)
    pte, model = PteModel(tmp_path / "pte"), load_causal_lm(checkpoint)
    tolerance = MAX_PTE_DIFF.get(family, 1e-5)
    for ids in (_ids()[0, :3].tolist(), _ids()[0].tolist()):
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        assert np.abs(pte.logits(ids) - want).max() < tolerance, (family, len(ids))
    tokenizer = checkpoint / "tokenizer.json"
    reference = label_accuracy(model, tokenizer, RECORDS, LABELS, seq_len=16)
    exported = label_accuracy(None, tokenizer, RECORDS, LABELS, seq_len=16, scorer=pte.label_scores)
    assert exported.accuracy == reference.accuracy
    assert exported.loss == pytest.approx(reference.loss, abs=tolerance)
