"""The coordinator's half of split mode (HO-SFL, Chen et al., arXiv 2603.14773): the top of the model in torch,
trained with backprop, and the coordinator's copy of the bottom, updated from the devices' scalars.

One :meth:`SplitTop.step` serves every split device of a step with ONE forward and backward: their smashed data
are padded to one length and stacked, the loss is the mean over devices of each device's mean completion-token
cross-entropy (plus ``aux_loss_coef`` times the top's load-balancing loss, as a device graph adds it), AdamW steps
the top's trainable tensors (routers and every expert of layers K..L-1), and each device gets
``lambda_i = dL_i/dz_i`` (its own loss's gradient, so ``vbar`` is a plain mean, ``device_runtime.hosfl``).

The bottom copy holds every global row of the trainable tensors below the cut; a step's update is applied to the
rows some device of that step held (the others got no gradient), with the same seeds as the devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from device_runtime.graph_io import NO_ANSWER_SHIFT
from device_runtime.hosfl import apply_step
from device_runtime.stats import RoutingStats
from export.artifacts import ADAMW_EPS, ADAMW_WEIGHT_DECAY
from export.families import describe
from export.global_state import apply_state, load_trainable_model
from export.moe_block import moe_blocks
from export.split_graph import split_model
from export.training_graph import (
    IGNORE_INDEX,
    adjust_first_target,
    causal_lm_loss,
    load_balancing_loss,
    routing_stats,
    routing_sums,
    select_targets,
)


@dataclass(frozen=True)
class Smashed:
    """One device's smashed data of one step: ``smashed (batch, seq_len, hidden)`` float32, ``attention_mask`` and
    ``labels`` ``(batch, seq_len)`` int64 (labels -100 where no target)."""

    smashed: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class TopResult:
    """What one step gives each device (in input order): its loss (nats per target token), ``lambda``
    ``(batch, seq_len, hidden)`` float32, and the top's routing sums ``(4, E)`` per top MoE layer and token count."""

    losses: list[float]
    gradients: list[np.ndarray]
    routing: list[tuple[list[np.ndarray], int]]


class SplitTop:
    """The global model cut at ``cut_layer``: its top trained here, its bottom's trainable rows kept as numpy.

    Args:
        checkpoint: the MoE checkpoint. params: the global state the round starts from (not modified).
        cut_layer: K. learning_rate: the top's AdamW step size. aux_loss_coef: the load-balancing coefficient.
        trainable_mode, lora_rank: the global state's layout (``export.global_state``).
        threads: torch intra-op threads (None: torch's default).

    Raises:
        ModelError: the checkpoint cannot be loaded, the state does not fit it, or a bad cut.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        params: Mapping[str, np.ndarray],
        *,
        cut_layer: int,
        learning_rate: float,
        aux_loss_coef: float = 0.0,
        trainable_mode: str = "experts",
        lora_rank: int = 0,
        threads: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        model = load_trainable_model(checkpoint, trainable_mode=trainable_mode, lora_rank=lora_rank, seed=0)
        description = describe(model)
        self.cut_layer, self.model = cut_layer, model  # the whole model: its parameter names are the global ones
        _, self.top = split_model(model, cut_layer)
        self.top.train()
        below = [layer for layer in description.layers if layer.index < cut_layer]
        names = {n for n, _ in description.trainable_tensors(list(params), trainable_mode)}
        layer_of = dict(description.trainable_tensors(list(params), trainable_mode))
        self.bottom = {n: np.array(params[n], dtype=np.float32) for n in sorted(names) if layer_of[n] < len(below)}
        self.layer_of = {n: layer_of[n] for n in names}  # MoE layer of every trainable tensor
        top_names = sorted(names - set(self.bottom))
        named = dict(model.named_parameters())
        for param in model.parameters():
            param.requires_grad_(False)
        self.top_params = {n: named[n] for n in top_names}
        for param in self.top_params.values():
            param.requires_grad_(True)
        self.routers = [block.gate for i, block in moe_blocks(model) if i >= cut_layer]
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        for router in self.routers:
            router.register_forward_hook(lambda _m, _a, out: self._captured.append((out[0], out[2])))
        self.num_experts = tuple(int(r.weight.shape[0]) for r in self.routers)
        self.reset(params, learning_rate=learning_rate, aux_loss_coef=aux_loss_coef)

    def reset(self, params: Mapping[str, np.ndarray], *, learning_rate: float, aux_loss_coef: float = 0.0) -> None:
        """Start a round from the global state ``params``: the top's trainable tensors and the bottom copy take its
        values and AdamW starts afresh (a coordinator keeps one top across rounds: the checkpoint loads once).

        Raises:
            ModelError: a tensor of ``params`` does not fit the model.
        """
        apply_state(self.model, {n: np.asarray(params[n], dtype=np.float32) for n in self.top_params})
        self.bottom = {n: np.array(params[n], dtype=np.float32) for n in self.bottom}
        self.aux_loss_coef = aux_loss_coef
        self.optimizer = torch.optim.AdamW(
            list(self.top_params.values()), lr=learning_rate, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY
        )

    def step(self, batches: Sequence[Smashed]) -> TopResult:
        """One batched forward + backward + AdamW step of the top over every device's smashed data (module
        docstring). Each ``Smashed`` has the top's hidden size; lengths may differ (padded here)."""
        width = max(b.smashed.shape[1] for b in batches)
        z = torch.cat([_pad(torch.from_numpy(b.smashed), width, 0.0) for b in batches]).requires_grad_(True)
        mask = torch.cat([_pad(torch.from_numpy(b.attention_mask), width, 0) for b in batches])
        labels = torch.cat([_pad(torch.from_numpy(b.labels), width, IGNORE_INDEX) for b in batches])
        self._captured = []
        hidden = self.top.model(inputs_embeds=z, attention_mask=mask, use_cache=False).last_hidden_state
        bounds = np.cumsum([0] + [b.smashed.shape[0] for b in batches])
        ids, bias = (torch.as_tensor(a) for a in NO_ANSWER_SHIFT)
        losses = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            sel, targets = select_targets(hidden[start:stop], labels[start:stop])
            losses.append(causal_lm_loss(adjust_first_target(self.top.lm_head(sel), ids, bias), targets))
        valid = mask.reshape(-1, 1).to(torch.float32)
        sums = [routing_sums(logits, index, valid) for logits, index in self._captured]
        total = torch.stack(losses).mean()
        if self.aux_loss_coef and sums:
            balance = torch.stack([load_balancing_loss(s[2], s[3], valid.sum().clamp_min(1)) for s in sums]).mean()
            total = total + self.aux_loss_coef * balance
        self.optimizer.zero_grad()
        total.backward()
        self.optimizer.step()
        assert z.grad is not None
        grads = (z.grad * len(batches)).detach()
        routing = []
        for start, stop, b in zip(bounds[:-1], bounds[1:], batches):
            span = slice(int(start) * width, int(stop) * width)  # this device's tokens in the flattened batch
            per = [routing_stats(*routing_sums(lg[span], ix[span], valid[span])).numpy() for lg, ix in self._captured]
            routing.append((per, int(b.attention_mask.sum())))
        self._captured = []
        return TopResult(
            losses=[float(l.detach()) for l in losses],
            gradients=[grads[s:e, : b.smashed.shape[1]].numpy() for s, e, b in zip(bounds[:-1], bounds[1:], batches)],
            routing=routing,
        )

    def apply_bottom(
        self, rows: Mapping[int, set[int]], seeds: Sequence[int], scalars: Sequence[float], lr: float
    ) -> None:
        """Apply one step's ``vbar`` to the bottom copy's rows ``rows[moe_layer]`` (global expert ids)."""
        views = [
            (name, array[r : r + 1], [r])
            for name, array in self.bottom.items()
            for r in sorted(rows.get(self.layer_of[name], ()))
        ]
        apply_step(views, seeds, scalars, lr)

    def tensors(self, *, bottom: bool = True) -> dict[str, np.ndarray]:
        """Copies of the split group's model now, by global name: the top's trainable tensors and, with
        ``bottom``, the bottom copy's."""
        top = {n: p.detach().numpy().copy() for n, p in self.top_params.items()}
        return {**({n: a.copy() for n, a in self.bottom.items()} if bottom else {}), **top}

    def top_routing(self) -> RoutingStats:
        """An empty accumulator of the top's routing statistics (every global expert of each top MoE layer)."""
        return RoutingStats(self.num_experts)


def _pad(tensor: torch.Tensor, width: int, value: float) -> torch.Tensor:
    """``tensor`` ``(batch, seq_len, ...)`` right-padded with ``value`` to ``width`` along seq_len."""
    missing = width - tensor.shape[1]
    if missing == 0:
        return tensor
    pad = torch.full((tensor.shape[0], missing, *tensor.shape[2:]), value, dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=1)
