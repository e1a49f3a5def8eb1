"""Local training in torch, as a device does it in ONNX Runtime: for references that run beside the federation
(the simulation's centralized bound, the Flower peer of ``bench/bench_vs_flower.py``).

AdamW with the devices' settings (eps 1e-8, weight decay 0.01, ``docs/stack.md``), causal-LM loss on the completion
tokens (labels -100 elsewhere, shifted inside the model), plus ``aux_loss_coef`` times the MoE load-balancing
loss when the model has routers (Shazeer et al. 2017 / Switch Transformer, as transformers computes it).
"""

from __future__ import annotations

from typing import Iterable, Sequence


def trainable_only(model, names: Sequence[str]) -> list:
    """Freeze every parameter of ``model`` but ``names``; returns those parameters in ``names`` order."""
    wanted = set(names)
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in wanted)
    return [params[n] for n in names]


def fit_steps(model, params: list, batches: Iterable, *, steps: int, learning_rate: float,
              aux_loss_coef: float = 0.01, optimizer=None) -> tuple[list[float], object]:
    """``steps`` AdamW steps of ``params``, one per ``device_runtime.data.Batch`` from ``batches``.

    Args:
        optimizer: an optimizer to continue (its moments carry over), or None for a fresh AdamW.
    Returns:
        (the loss of each step (nats per completion token), the optimizer).
    """
    import torch

    if getattr(model.config, "num_local_experts", None):
        model.config.output_router_logits, model.config.router_aux_loss_coef = aux_loss_coef > 0, aux_loss_coef
    optimizer = optimizer or torch.optim.AdamW(params, lr=learning_rate, eps=1e-8, weight_decay=0.01)
    model.train()
    losses = []
    for _, batch in zip(range(steps), batches):
        out = model(input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask),
                    labels=torch.from_numpy(batch.labels))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses, optimizer
