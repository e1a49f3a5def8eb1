"""Sparse upcycling of a dense Llama-family model into a Mixtral-style MoE.

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints" (ICLR 2023):
every FFN is copied into ``num_experts`` experts and a fresh router is added. Mixtral renormalises the top-k
router weights to sum to 1, and the experts start identical, so the upcycled model reproduces the dense
model's logits exactly (up to float error) whatever the router says; federated training then lets the
experts diverge.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from device_runtime.bundle import ROUTER_WEIGHT
from device_runtime.errors import ConfigError, ModelError

_COPIED_CONFIG = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rope_parameters",
    "attention_dropout",
)


def mixtral_config(dense_config, *, num_experts: int, experts_per_token: int, num_layers: int | None = None):
    """A MixtralConfig with the dense Llama config's sizes, ``num_experts`` experts and top-``experts_per_token``.

    Raises:
        ConfigError: experts_per_token not in [1, num_experts], or num_layers out of range.
        ModelError: the dense model is not Llama-family (attention or MLP biases, another model_type).
    """
    from transformers import MixtralConfig

    if dense_config.model_type not in ("llama", "mistral"):
        raise ModelError(f"upcycling supports Llama-family dense models, not {dense_config.model_type!r}")
    if getattr(dense_config, "attention_bias", False) or getattr(dense_config, "mlp_bias", False):
        raise ModelError("upcycling needs a Llama model without attention/MLP biases (Mixtral has none)")
    if not 1 <= experts_per_token <= num_experts:
        raise ConfigError(f"experts_per_token must be in [1, num_experts={num_experts}], got {experts_per_token}")
    total = dense_config.num_hidden_layers
    if num_layers is not None and not 1 <= num_layers <= total:
        raise ConfigError(f"--num-layers must be in [1, {total}], got {num_layers}")
    kwargs = {k: getattr(dense_config, k) for k in _COPIED_CONFIG if getattr(dense_config, k, None) is not None}
    return MixtralConfig(
        **kwargs,
        num_hidden_layers=num_layers or total,
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        sliding_window=None,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )


def experts_from_dense(gate_proj, up_proj, down_proj, num_experts: int):
    """A dense FFN copied into ``num_experts`` fused experts: ``(gate_up (E, 2I, H), down (E, H, I))``.

    Args: the dense ``gate_proj (I, H)``, ``up_proj (I, H)``, ``down_proj (H, I)`` weights (torch tensors).
    The fused layout is ``[gate; up]`` along dim 1, as transformers' MoE experts keep it.
    """
    import torch

    gate_up = torch.cat([gate_proj, up_proj]).unsqueeze(0).repeat(num_experts, 1, 1)  # (E, 2I, H)
    return gate_up, down_proj.unsqueeze(0).repeat(num_experts, 1, 1)  # (E, H, I)


def upcycle(
    dense,
    *,
    num_experts: int = 4,
    experts_per_token: int = 2,
    num_layers: int | None = None,
    router_std: float = 0.02,
    seed: int = 0,
):
    """Upcycle a dense Llama-family CausalLM into a MixtralForCausalLM.

    Args:
        dense: a loaded ``LlamaForCausalLM`` (float32).
        num_experts: experts per layer (E). experts_per_token: top-k.
        num_layers: keep only the first N decoder layers (small devices, fast demos); None keeps all.
        router_std: std of the fresh router weights ``(E, hidden)``.
        seed: seed of the router initialisation.

    Returns:
        A MixtralForCausalLM in eval mode whose logits match the dense model's (same layers kept).
    """
    import torch
    from transformers import MixtralForCausalLM

    config = mixtral_config(
        dense.config, num_experts=num_experts, experts_per_token=experts_per_token, num_layers=num_layers
    )
    moe = MixtralForCausalLM(config).eval()
    dense_state = dense.state_dict()
    generator = torch.Generator().manual_seed(seed)
    new_state = {}
    for name, tensor in moe.state_dict().items():
        if name.endswith(ROUTER_WEIGHT):
            new_state[name] = torch.randn(tensor.shape, generator=generator) * router_std
        elif name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("experts.gate_up_proj")]
            new_state[name], new_state[prefix + "experts.down_proj"] = experts_from_dense(
                *(dense_state[prefix + f"{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")), num_experts
            )
        elif name.endswith("mlp.experts.down_proj"):
            continue  # set with its layer's gate_up_proj
        else:
            new_state[name] = dense_state[name]
    moe.load_state_dict(new_state, strict=True)
    return moe


def upcycle_checkpoint(dense_dir: Path, out_dir: Path, **kwargs) -> Path:
    """Upcycle the checkpoint in ``dense_dir`` and save it (model + tokenizer) to ``out_dir``.

    Keyword arguments are those of :func:`upcycle`. Returns ``out_dir``.
    """
    from export.loading import load_causal_lm

    dense = load_causal_lm(dense_dir)
    moe = upcycle(dense, **kwargs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(dense_dir) / name).is_file():
            shutil.copy(Path(dense_dir) / name, out_dir / name)
    return out_dir
