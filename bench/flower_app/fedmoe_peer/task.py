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

import torch

FFN = ("gate_proj", "up_proj", "down_proj")


def load_model(kind: str, moe_checkpoint: Path, num_layers: int, aux_loss_coef: float):
    """``(model, trainable names)`` of the ``dense`` or ``moe`` peer model (float32, train mode)."""
    from export.global_state import global_tensor_names, load_trainable_model
    from export.loading import load_causal_lm, smollm2_checkpoint

    if kind == "moe":
        model = load_trainable_model(moe_checkpoint)
        model.config.output_router_logits = True  # the load-balancing loss joins the LM loss, as on devices
        model.config.router_aux_loss_coef = aux_loss_coef
        names = global_tensor_names(model)
    else:
        model = load_causal_lm(smollm2_checkpoint())
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        names = [n for n, _ in model.named_parameters() if n.split(".")[-2] in FFN]
    trainable = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return model.train(), names


def trainable_state(model, names) -> OrderedDict:
    params = dict(model.named_parameters())
    return OrderedDict((n, params[n].detach().clone()) for n in names)


def set_trainable(model, state: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def fit(model, names, data_file: Path, tokenizer: Path, *, steps: int, batch_size: int, seq_len: int,
        learning_rate: float, seed: int) -> tuple[int, float]:
    """``steps`` AdamW steps on ``data_file``; returns (number of training records, mean loss)."""
    from device_runtime.data import LocalDataset

    dataset = LocalDataset.from_jsonl(data_file, tokenizer, seq_len=seq_len, eval_fraction=0.0, seed=seed)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=learning_rate, eps=1e-8, weight_decay=0.01)
    losses = []
    for _, batch in zip(range(steps), dataset.train_batches(batch_size)):
        out = model(input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask),
                    labels=torch.from_numpy(batch.labels))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss))
    return len(dataset.train), sum(losses) / max(1, len(losses))


def as_global_state(kind: str, state: dict, num_experts: int) -> dict:
    """fedmoe global-state tensors (name -> float32 array) of a peer model's trainable ``state``: the MoE's as
    they are; a dense FFN copied into every expert of its layer (an upcycled MoE with identical experts computes
    the dense FFN whatever its router says, so fedmoe's ``Evaluator`` scores the dense model exactly)."""
    from export.upcycle import experts_from_dense

    if kind == "moe":
        return {n: v.numpy() for n, v in state.items()}
    out = {}
    for name in state:
        if name.endswith("mlp.gate_proj.weight"):
            prefix = name[: -len("gate_proj.weight")]
            gate_up, down = experts_from_dense(*(state[prefix + f"{p}.weight"] for p in FFN), num_experts)
            out[prefix + "experts.gate_up_proj"], out[prefix + "experts.down_proj"] = gate_up.numpy(), down.numpy()
    return out
