"""The model and local training a Flower user would write for fedmoe's task, in torch.

``dense``: SmolLM2-135M-Instruct cut to its first ``num_layers`` layers, every FFN trainable (the model a Flower
user fine-tunes). ``moe``: fedmoe's upcycled MoE checkpoint, every expert and router trainable (what fedmoe
federates, without pruning). Local training matches a fedmoe device: the same batches
(``device_runtime.data.LocalDataset``, seed = run seed + round), AdamW (eps 1e-8, weight decay 0.01, fresh each
round), causal-LM loss on the label tokens (plus the load-balancing loss for ``moe``).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

FFN = ("gate_proj", "up_proj", "down_proj")


def load_model(kind: str, moe_checkpoint: Path, num_layers: int):
    """``(model, trainable parameters by name)`` of the ``dense`` or ``moe`` peer model (float32)."""
    from export.global_state import global_tensor_names, load_trainable_model
    from export.loading import load_causal_lm, smollm2_checkpoint
    from export.torch_train import trainable_only

    if kind == "moe":
        model = load_trainable_model(moe_checkpoint)
        names = global_tensor_names(model)
    else:
        model = load_causal_lm(smollm2_checkpoint())
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        names = [n for n, _ in model.named_parameters() if n.split(".")[-2] in FFN]
    return model, OrderedDict(zip(names, trainable_only(model, names)))


def fit(
    model,
    params: dict,
    data_file: Path,
    tokenizer: Path,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    learning_rate: float,
    aux_loss_coef: float,
    seed: int,
) -> tuple[int, float]:
    """``steps`` fresh-AdamW steps on ``data_file``'s batches; returns (training records, mean loss)."""
    from device_runtime.data import LocalDataset
    from export.torch_train import fit_steps

    dataset = LocalDataset.from_jsonl(data_file, tokenizer, seq_len=seq_len, eval_fraction=0.0, seed=seed)
    losses, _ = fit_steps(
        model,
        list(params.values()),
        dataset.train_batches(batch_size),
        steps=steps,
        learning_rate=learning_rate,
        aux_loss_coef=aux_loss_coef,
    )
    return len(dataset.train), sum(losses) / max(1, len(losses))


def as_global_state(kind: str, state: dict, num_experts: int) -> dict:
    """fedmoe global-state tensors (name -> float32 array) of a peer model's trainable ``state``: the MoE's as
    they are; a dense FFN copied into every expert of its layer (an upcycled MoE with identical experts computes
    the dense FFN whatever its router says, so fedmoe's ``Evaluator`` scores the dense model exactly)."""
    from export.dense_moe import experts_from_dense

    if kind == "moe":
        return {n: v.numpy() for n, v in state.items()}
    out = {}
    for name in state:
        if name.endswith("mlp.gate_proj.weight"):
            prefix = name[: -len("gate_proj.weight")]
            gate_up, down = experts_from_dense(*(state[prefix + f"{p}.weight"] for p in FFN), num_experts)
            out[prefix + "experts.gate_up_proj"], out[prefix + "experts.down_proj"] = gate_up.numpy(), down.numpy()
    return out
