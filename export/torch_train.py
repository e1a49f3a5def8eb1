"""Local training in torch, as a device does it in ONNX Runtime: for references that run beside the federation
(the simulation's centralized bound, the Flower peer of ``bench/bench_vs_flower.py``).

AdamW with the devices' settings (eps 1e-8, weight decay 0.01, ``docs/stack.md``), causal-LM loss on the completion
tokens (labels -100 elsewhere, shifted as the device's graph shifts them), with the device's logit adjustment of
the first answer token (``export/training_graph.py``: the same :func:`select_targets` and
:func:`adjust_first_target`), plus ``aux_loss_coef`` times the MoE load-balancing loss when the model holds fedmoe
MoE blocks (Switch Transformer, Fedus et al. 2021 eq. 4, averaged over the MoE layers: the device graph's own
``load_balancing_loss``; a dense model, e.g. Flower's peer, has none).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def trainable_only(model, names: Sequence[str]) -> list:
    """Freeze every parameter of ``model`` but ``names``; returns those parameters in ``names`` order."""
    wanted = set(names)
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in wanted)
    return [params[n] for n in names]


def fit_steps(
    model,
    params: list,
    batches: Iterable,
    *,
    steps: int,
    learning_rate: float,
    aux_loss_coef: float = 0.01,
    optimizer=None,
    answer_shift=None,
) -> tuple[list[float], object]:
    """``steps`` AdamW steps of ``params``, one per ``device_runtime.data.Batch`` from ``batches``.

    Args:
        optimizer: an optimizer to continue (its moments carry over), or None for a fresh AdamW.
        answer_shift: ``(answer_ids (A,), answer_bias (A,))`` of ``device_runtime.answer_prior``, or None.
    Returns:
        (the loss of each step (nats per completion token), the optimizer).
    """
    import torch

    from export.artifacts import ADAMW_EPS, ADAMW_WEIGHT_DECAY

    optimizer = optimizer or torch.optim.AdamW(params, lr=learning_rate, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY)
    model.train()
    losses = []
    for _, batch in zip(range(steps), batches):
        loss = batch_loss(model, batch, aux_loss_coef=aux_loss_coef, answer_shift=answer_shift)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses, optimizer


def batch_loss(model, batch, *, aux_loss_coef: float, answer_shift=None):
    """The device graph's training loss of one ``Batch`` (``()`` tensor): mean completion-token cross-entropy with
    the answer shift at each row's first target, plus ``aux_loss_coef`` times the load-balancing loss."""
    import torch

    from device_runtime.graph_io import NO_ANSWER_SHIFT
    from export.moe_block import routing_outputs
    from export.training_graph import (
        IGNORE_INDEX,
        adjust_first_target,
        causal_lm_loss,
        load_balancing_loss,
        routing_sums,
        select_targets,
    )

    mask = torch.from_numpy(batch.attention_mask)
    with routing_outputs(model) as routed:
        out = model(input_ids=torch.from_numpy(batch.input_ids), attention_mask=mask)
    labels = torch.from_numpy(batch.labels).masked_fill(mask == 0, IGNORE_INDEX)
    logits, targets = select_targets(out.logits, labels)  # (batch, K, vocab), (batch, K)
    ids, bias = (torch.as_tensor(a) for a in (answer_shift or NO_ANSWER_SHIFT))
    loss = causal_lm_loss(adjust_first_target(logits, ids, bias), targets)
    if not routed or not aux_loss_coef:
        return loss
    valid = mask.reshape(-1, 1).to(torch.float32)  # (N, 1)
    num_valid = valid.sum().clamp_min(1.0)
    sums = [routing_sums(router_logits, index, valid) for router_logits, _, index in routed]
    return loss + aux_loss_coef * torch.stack([load_balancing_loss(s[2], s[3], num_valid) for s in sums]).mean()
