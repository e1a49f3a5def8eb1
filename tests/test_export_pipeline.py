"""Export pipeline pieces on tiny random models: upcycling, family description, pruning, planner."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

from device_runtime.errors import BudgetError, ConfigError, ModelError, UnsupportedArchitectureError  # noqa: E402
from export.families import describe  # noqa: E402
from export.hf_moe import to_fedmoe  # noqa: E402
from export.planner import Budget, TrainingShape, estimate, model_shape, plan, select_experts  # noqa: E402
from export.prune import prune  # noqa: E402
from export.upcycle import upcycle  # noqa: E402

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**COMMON)).eval()


def tiny_mixtral(num_experts=4, top_k=2):
    torch.manual_seed(0)
    config = MixtralConfig(num_local_experts=num_experts, num_experts_per_tok=top_k, **COMMON)
    return to_fedmoe(MixtralForCausalLM(config)).eval()


def test_upcycled_model_reproduces_dense_logits():
    dense = tiny_llama()
    moe = upcycle(dense, num_experts=4, experts_per_token=2, seed=3)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (dense(ids).logits - moe(ids).logits).abs().max().item()
    assert diff < 1e-3
    router = moe.model.layers[0].mlp.gate.weight
    assert router.shape == (4, 32) and router.abs().sum() > 0  # a fresh router, not zeros
    description = describe(moe)
    assert description.family == "llama" and len(description.layers) == 3
    assert (description.num_experts, description.experts_per_token) == (4, 2)


def test_upcycle_keeps_first_layers_and_validates_arguments():
    dense = tiny_llama()
    moe = upcycle(dense, num_experts=2, experts_per_token=1, num_layers=2)
    assert len(moe.model.layers) == 2
    torch.testing.assert_close(
        moe.model.layers[1].self_attn.q_proj.weight, dense.model.layers[1].self_attn.q_proj.weight
    )
    with pytest.raises(ConfigError, match="experts_per_token"):
        upcycle(dense, num_experts=2, experts_per_token=3)
    with pytest.raises(ConfigError, match="num-layers"):
        upcycle(dense, num_experts=2, experts_per_token=1, num_layers=9)
    with pytest.raises(ModelError, match="dense families"):
        upcycle(tiny_mixtral(), num_experts=2, experts_per_token=1)


def test_describe_names_an_unsupported_architecture():
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM.*upcycle|llama"):
        describe(tiny_llama())


def test_prune_keeps_rows_of_the_kept_experts_in_order():
    model = tiny_mixtral()
    keep = ((2, 0), (3,), (0, 1, 3))
    pruned, expert_ids = prune(model, keep)
    assert expert_ids == keep
    for layer, ids in enumerate(keep):
        original, cut = model.model.layers[layer].mlp, pruned.model.layers[layer].mlp
        torch.testing.assert_close(cut.gate.weight, original.gate.weight[list(ids)])
        torch.testing.assert_close(cut.experts.down_proj, original.experts.down_proj[list(ids)])
        assert cut.gate.top_k == min(2, len(ids))
    assert model.model.layers[1].mlp.gate.weight.shape[0] == 4  # the original is untouched
    with torch.no_grad():
        assert torch.isfinite(pruned(torch.tensor([[1, 2, 3]])).logits).all()
    for bad in (((0, 0), (1,), (2,)), ((4,), (1,), (2,)), ((0,), (1,))):
        with pytest.raises(ConfigError):
            prune(model, bad)


def test_model_shape_counts_parameters_from_the_checkpoint_files(tmp_path):
    model = tiny_mixtral()
    model.save_pretrained(tmp_path)
    shape = model_shape(tmp_path)
    total = sum(p.numel() for p in model.parameters())
    expert_and_router = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    assert (shape.moe_layers, shape.num_experts, shape.experts_per_token) == (3, 4, 2)
    assert shape.expert_params == 3 * 32 * 48
    assert shape.shared_params == total - expert_and_router
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelError, match="not a MoE"):
        model_shape(tmp_path)


def test_planner_picks_the_largest_count_that_fits(tmp_path):
    tiny_mixtral().save_pretrained(tmp_path)
    shape = model_shape(tmp_path)
    train = TrainingShape(batch_size=2, seq_len=16)
    peaks = [estimate(shape, train, kept).peak_mib for kept in range(1, 5)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4  # more experts, more memory
    between = (peaks[1] + peaks[2]) / 2
    assert plan(shape, train, Budget(memory_mib=between)).experts_per_layer == 2
    assert plan(shape, train, Budget(memory_mib=10 * peaks[3])).experts_per_layer == 4
    lora = TrainingShape(batch_size=2, seq_len=16, trainable_mode="lora", lora_rank=2)
    assert estimate(shape, lora, 4).parts["grad_and_adamw"] < estimate(shape, train, 4).parts["grad_and_adamw"]
    with pytest.raises(BudgetError, match="lora"):
        plan(shape, train, Budget(memory_mib=peaks[0] / 2))


def test_select_experts_takes_the_most_important_per_layer():
    importance = [np.array([0.1, 0.5, 0.3, 0.2]), np.array([0.9, 0.1, 0.8, 0.0])]
    assert select_experts(importance, 2) == ((1, 2), (0, 2))
    assert select_experts(importance, 9) == ((0, 1, 2, 3), (0, 1, 2, 3))


def test_granitemoe_maps_into_the_block_and_exports_in_its_own_layout(tmp_path):
    """GraniteMoE keeps its MoE at ``block_sparse_moe`` (router ``.router``): converted, its tensors take fedmoe's
    ``mlp.gate`` / ``mlp.experts`` names with the logits unchanged; pruning works on it; ``to_hf`` writes Granite's
    own checkpoint layout, which loads back (through transformers' own renaming) to the same logits."""
    from safetensors import safe_open
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    from export.hf_moe import to_hf
    from export.loading import load_causal_lm

    torch.manual_seed(0)
    config = GraniteMoeConfig(
        num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0, logits_scaling=3.0, **COMMON
    )
    model = GraniteMoeForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        before = model(ids).logits
        to_fedmoe(model)
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)
    assert "model.layers.0.mlp.gate.weight" in model.state_dict()
    assert not any("block_sparse_moe" in n for n in model.state_dict())
    assert describe(model).family == "granitemoe" and describe(model).experts_per_token == 2
    pruned, _ = prune(model, ((1, 3), (0,), (2,)))
    assert pruned.model.layers[0].block_sparse_moe is pruned.model.layers[0].mlp  # the alias follows the copy
    to_hf(model).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as handle:
        assert "model.layers.0.block_sparse_moe.router.layer.weight" in handle.keys()
    assert (model_shape(tmp_path).moe_layers, model_shape(tmp_path).num_experts) == (3, 4)  # the planner reads it
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(tmp_path)(ids).logits, before, rtol=1e-5, atol=1e-6)
