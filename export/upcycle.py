"""Sparse upcycling of a dense decoder into a MoE with fedmoe's block, and its checkpoint format.

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints" (ICLR 2023): every
gated MLP is copied into ``num_experts`` experts and a fresh router is added (``export.moe_block.MoeBlock`` at
``layer.mlp``; everything else of the decoder, attention, norms and embeddings, stays the family's own). The top-k
router weights are renormalised to sum to 1 and the experts start identical, so the upcycled model reproduces the
dense model's logits (up to float error) whatever the router says; federated training then lets the experts diverge.

Families: :data:`export.families.DENSE_FAMILIES`, any whose MLP is ``down(act(gate x) * up x)`` without bias, with
separate ``gate_proj`` / ``up_proj`` (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3) or Phi-3's fused ``gate_up_proj``
(``[gate; up]``: the experts' own layout).

Checkpoint format (:func:`save_upcycled`, read back by ``export.loading.load_causal_lm``):

- Llama / Mistral without biases: a plain **Mixtral** checkpoint (``MixtralForCausalLM.save_pretrained``). Mixtral
  is exactly a Llama decoder with this MoE block, so any transformers loads it without fedmoe, and the default
  SmolLM2 job keeps its checkpoint byte for byte.
- Every other family (transformers has no MoE class with its decoder): the **fedmoe format**
  (``export.checkpoint_format``): the dense model's own ``config.json`` (its ``model_type``, so transformers builds
  its decoder) plus a ``"fedmoe"`` object ``{"format", "num_experts", "num_experts_per_tok", "norm_topk_prob"}``, and
  ``model.safetensors`` with the state dict, the MoE tensors under the names of ``export.moe_block``. Plain
  ``from_pretrained`` would build the dense model and leave its MLPs freshly initialised (with a missing-keys
  warning): load it with fedmoe (``export.loading.load_fedmoe_format``), which builds the dense decoder from the
  config, installs the blocks and loads every tensor strictly. A custom transformers model class per family would
  cost a registration and a config class each, for the same tensors.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from device_runtime.errors import ConfigError, ModelError
from export.checkpoint_format import FORMAT
from export.dense_moe import install_moe
from export.families import DENSE_FAMILIES

_MIXTRAL_FAMILIES = ("llama", "mistral")
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


def _truncate(model, num_layers: int) -> None:
    """Keep the first ``num_layers`` decoder layers (and the config's per-layer lists) of ``model`` in place."""
    model.model.layers = model.model.layers[:num_layers]
    config = model.config
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:  # sliding / full attention per layer (Gemma 3, Qwen)
        config.layer_types = list(config.layer_types[:num_layers])


def upcycle(
    dense,
    *,
    num_experts: int = 4,
    experts_per_token: int = 2,
    num_layers: int | None = None,
    router_std: float = 0.02,
    seed: int = 0,
):
    """Upcycle a dense CausalLM of :data:`DENSE_FAMILIES` (``dense`` is left unchanged).

    Args:
        dense: a loaded dense ``*ForCausalLM`` (float32).
        num_experts: experts per layer (E). experts_per_token: top-k.
        num_layers: keep only the first N decoder layers (small devices, fast demos); None keeps all.
        router_std: std of the fresh router weights ``(E, hidden)``.
        seed: seed of the router initialisation.

    Returns:
        The dense model's class, in eval mode, with a :class:`~export.moe_block.MoeBlock` per layer; its logits
        match the dense model's (same layers kept). ``config.fedmoe`` records the MoE sizes.

    Raises:
        ConfigError: experts_per_token not in [1, num_experts], or num_layers out of range.
        ModelError: the family is not one of :data:`DENSE_FAMILIES`, or an MLP is not gated without bias.
    """
    family = getattr(dense.config, "model_type", None)
    if family not in DENSE_FAMILIES:
        raise ModelError(
            f"upcycling supports the dense families {', '.join(DENSE_FAMILIES)}, not {family!r} "
            "(a MoE checkpoint needs no upcycling: bundle it directly)"
        )
    if not 1 <= experts_per_token <= num_experts:
        raise ConfigError(f"experts_per_token must be in [1, num_experts={num_experts}], got {experts_per_token}")
    total = dense.config.num_hidden_layers
    if num_layers is not None and not 1 <= num_layers <= total:
        raise ConfigError(f"--num-layers must be in [1, {total}], got {num_layers}")
    moe = copy.deepcopy(dense)
    _truncate(moe, num_layers or total)
    install_moe(moe, num_experts=num_experts, experts_per_token=experts_per_token, router_std=router_std, seed=seed)
    moe.config.fedmoe = {
        "format": FORMAT,
        "num_experts": num_experts,
        "num_experts_per_tok": experts_per_token,
        "norm_topk_prob": True,
    }
    return moe.eval()


def _as_mixtral(moe):
    """The upcycled Llama-family ``moe`` as a MixtralForCausalLM (same state dict), or None when its decoder is not
    Mixtral's (another family, attention or MLP biases)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = moe.config
    if config.model_type not in _MIXTRAL_FAMILIES or getattr(config, "attention_bias", False):
        return None
    kwargs = {k: getattr(config, k) for k in _COPIED_CONFIG if getattr(config, k, None) is not None}
    mixtral = MixtralForCausalLM(
        MixtralConfig(
            **kwargs,
            num_hidden_layers=config.num_hidden_layers,
            num_local_experts=config.fedmoe["num_experts"],
            num_experts_per_tok=config.fedmoe["num_experts_per_tok"],
            sliding_window=getattr(config, "sliding_window", None),
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    )
    mixtral.load_state_dict(moe.state_dict(), strict=True)
    return mixtral.eval()


def save_upcycled(moe, out_dir: Path) -> Path:
    """Save an :func:`upcycle` result to ``out_dir`` (Mixtral or the fedmoe format: the module docstring)."""
    out_dir = Path(out_dir)
    (_as_mixtral(moe) or moe).save_pretrained(out_dir)
    return out_dir


def upcycle_checkpoint(dense_dir: Path, out_dir: Path, **kwargs) -> Path:
    """Upcycle the checkpoint in ``dense_dir`` and save it (model + tokenizer) to ``out_dir``.

    Keyword arguments are those of :func:`upcycle`. Returns ``out_dir``.
    """
    from export.loading import load_causal_lm

    out_dir = save_upcycled(upcycle(load_causal_lm(dense_dir), **kwargs), Path(out_dir))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(dense_dir) / name).is_file():
            shutil.copy(Path(dense_dir) / name, out_dir / name)
    return out_dir
