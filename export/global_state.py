"""The global trainable state: every tensor federation changes, kept apart from the frozen checkpoint.

A MoE checkpoint directory (Hugging Face format) holds the frozen part. The *global state* is one
safetensors file of the routers ``...mlp.gate.weight (E, H)``, the experts ``...mlp.experts.gate_up_proj
(E, 2I, H)`` / ``...down_proj (E, H, I)`` and, in LoRA mode, the adapters ``...experts.*_lora_* (E, ...)``,
expert axis 0, named as in bundles (torch ``state_dict`` names). The coordinator reads and writes it with
numpy only; :func:`export_checkpoint` merges it back into a checkpoint directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from device_runtime.errors import ModelError
from device_runtime.modes import TrainableMode


def load_trainable_model(
    checkpoint: str | Path,
    *,
    trainable_mode: str = "experts",
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    seed: int = 0,
):
    """The checkpoint's model (fedmoe MoE blocks, ``export.loading.load_causal_lm``) with dense-masked experts and,
    in LoRA mode, adapters seeded with ``seed``
    (the same seed gives the same adapters: bundles and the global state agree)."""
    import torch

    from export.experts_impl import add_lora
    from export.loading import load_causal_lm
    from export.moe_block import use_dense_masked

    model = use_dense_masked(load_causal_lm(checkpoint))
    if trainable_mode == TrainableMode.LORA:
        torch.manual_seed(seed)
        add_lora(model, lora_rank, lora_alpha)
    return model


def global_tensor_names(model) -> list[str]:
    """Names of the federated tensors of a loaded MoE model: routers plus experts, or plus LoRA adapters when
    the model has them (``MoeDescription.trainable_tensors``)."""
    from export.families import describe

    names = list(model.state_dict())
    mode = "lora" if any("_lora_" in n for n in names) else "experts"
    return [name for name, _ in describe(model).trainable_tensors(names, mode)]


def init_global_state(
    checkpoint: str | Path,
    out_file: str | Path,
    *,
    trainable_mode: str = "experts",
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    seed: int = 0,
) -> list[str]:
    """Write the initial global state of ``checkpoint`` to ``out_file`` (safetensors). Returns the tensor names.

    In LoRA mode the adapters are initialised with ``seed`` (B = 0, so the model is unchanged).
    """
    from safetensors.torch import save_file

    model = load_trainable_model(
        Path(checkpoint), trainable_mode=trainable_mode, lora_rank=lora_rank, lora_alpha=lora_alpha, seed=seed
    )
    state = model.state_dict()
    names = global_tensor_names(model)
    save_file({n: state[n].contiguous() for n in names}, str(out_file))
    return names


def load_with_state(checkpoint: str | Path, state_file: str | Path, *, lora_alpha: float = 16.0):
    """The checkpoint's model with the global state file loaded into it (see :func:`apply_state`)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(state_file))
    lora = [n for n in tensors if n.endswith("gate_up_lora_A")]
    model = load_trainable_model(
        Path(checkpoint),
        trainable_mode="lora" if lora else "experts",
        lora_rank=int(tensors[lora[0]].shape[1]) if lora else 0,
        lora_alpha=lora_alpha,
        seed=0,
    )
    return apply_state(model, tensors)


def apply_state(model, tensors: dict):
    """Copy global-state tensors (name -> numpy array) into ``model`` in place; returns ``model``.

    Raises:
        ModelError: a name is not a parameter of the model, or its shape differs.
    """
    import torch

    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name not in params or tuple(params[name].shape) != tuple(value.shape):
            raise ModelError(f"global state tensor {name} {tuple(value.shape)} does not fit the checkpoint")
        with torch.no_grad():
            params[name].copy_(torch.from_numpy(value))
    return model


def export_checkpoint(checkpoint: str | Path, state_file: str | Path, out_dir: str | Path) -> Path:
    """Write ``checkpoint`` with the global state applied as a Hugging Face checkpoint directory.

    LoRA adapters are merged into the expert weights (``W + (alpha / r) B A``). The result is in the checkpoint's
    own format: a pretrained MoE family's or an upcycled Llama's loads with plain transformers (``save_pretrained``
    writes the family's own tensor layout, ``export.hf_moe.to_hf``), an upcycled model of another family is in the
    fedmoe format (``export.upcycle``). Returns ``out_dir``.
    """
    import torch

    from export.experts_impl import experts_modules
    from export.hf_moe import to_hf

    model = load_with_state(checkpoint, state_file)
    with torch.no_grad():
        for _, module in experts_modules(model):
            if getattr(module, "gate_up_lora_A", None) is None:
                continue
            scale = module.lora_scaling
            module.gate_up_proj += scale * module.gate_up_lora_B @ module.gate_up_lora_A
            module.down_proj += scale * module.down_lora_B @ module.down_lora_A
            for name in ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B"):
                delattr(module, name)
    out_dir = Path(out_dir)
    to_hf(model).save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(checkpoint) / name).is_file():
            shutil.copy(Path(checkpoint) / name, out_dir / name)
    return out_dir
