"""The module exported as the device's ONNX training graph: causal-LM loss + MoE regularisers + routing stats.

Graph inputs, in feed order (names are the module constants below; ``L`` = number of MoE layers, ``l``
indexes them in decoder order, i.e. into ``Manifest.moe_layers``; ``E_l`` = experts kept in layer ``l``):

==========================  ======================  =======  ================================================
name                        shape                   dtype    meaning
==========================  ======================  =======  ================================================
``input_ids``               (batch, seq_len)        int64    token ids
``attention_mask``          (batch, seq_len)        int64    1 = real token, 0 = padding
``labels``                  (batch, seq_len)        int64    target ids, -100 = not a target; shifted inside
                                                             (logits at t predict labels at t + 1); padding
                                                             positions are ignored whatever their label
``aux_loss_coef``           ()                      float32  load-balancing loss coefficient
``routing_reg_coef``         ()                      float32  FedAlign-MoE lambda_r (0 disables)
``routing_prior_{l}``       (E_l,)                  float32  p_global for layer l (FedAlign-MoE)
``answer_ids``              (num_answers,)          int64    token ids whose logit is shifted at each row's
                                                             first target (the answer tokens of a label set)
``answer_bias``             (num_answers,)          float32  the shift of each: logit adjustment (below);
                                                             zeros leave the loss unchanged
``frozen_gate_up_{l}``      (F_l, H, 2I)            float16  the experts layer l holds frozen, transposed
``frozen_down_{l}``         (F_l, I, H)             float16  (resident bundles only: ``export.prune`` with a
                                                             ``frozen_dtype``), after its trained ones in local
                                                             order
``prox_mu``                 ()                      float32  FedProx mu (only with ``prox=True``)
``<param>.anchor``          shape of ``<param>``    float32  FedProx anchor w_global, one per trainable
                                                             tensor, in ``trainable`` order (``prox=True``)
==========================  ======================  =======  ================================================

Graph outputs: ``loss ()`` (first: the training objective), ``ce_loss ()``, ``routing_stats_{l} (4, E_l)``
for each MoE layer, ``num_tokens ()`` int64. ``routing_stats_{l}`` rows over the valid (unpadded) tokens
x_i, with router probabilities G = softmax(router logits):

0. ``sum_i G_e(x_i)``            1. ``max_i G_e(x_i)``
2. ``sum_i G_e(x_i) log G_e(x_i)``  3. number of tokens whose top-k contains e

so the device can accumulate HFedMoE importance exactly across batches (``docs/algorithms.md``: s_cum = row0 / B,
s_spec = max of row1, KL_e = row2 / B - s_cum * log s_cum).

``ce`` is the mean next-token cross-entropy over the target positions, and the lm_head runs on those positions
only (:func:`select_targets`: ``batch * K`` rows, K = most targets in a row, instead of ``batch * seq_len``); the
value equals the full-logits loss. Measured on the default bundle shapes (8-layer SmolLM2 e4k2, batch 4 x 64,
one-token BBC News labels, two runs on a shared machine): step time -33 to -44% (LoRA, 4 experts) and -35 to
-47% (full experts, 1 per layer), peak RSS -64 to -73 and -118 to -148 MiB (``bench/bench_train_local.py``).

Logit adjustment (balanced softmax: Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, eq. 10;
Ren et al., "Balanced Meta-Softmax", NeurIPS 2020): at each row's first target, ``z[answer_ids[a]] +=
answer_bias[a]`` before the cross-entropy, with ``answer_bias = tau * log(pi)`` of the device's own label prior
``pi`` (``device_runtime/answer_prior.py``). A device then learns ``p(y | x) / pi(y)`` instead of its skewed
``p(y | x)``, so the average of the devices' models does not inherit their label priors. The shift exists only
in the training loss: evaluation feeds zeros, and the exported global model has no such input.

Objective (averages over MoE layers)::

    loss = ce + aux_loss_coef * mean_l LB_l + routing_reg_coef * mean_l KL(p_l || prior_l)
              [+ prox_mu / 2 * sum_w ||w - anchor_w||^2]

with LB_l = E_l * sum_e f_e P_e (Switch Transformer, Fedus et al. 2021 eq. 4, top-k form as in Mixtral:
f_e = fraction of valid tokens routed to e, P_e = mean router probability), p_l = mean router distribution over
valid tokens (FedAlign-MoE distribution regularisation), and the FedProx proximal term (Li et al. 2020, eq. 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from device_runtime.data import IGNORE_INDEX
from device_runtime.errors import ModelError
from device_runtime.graph_io import (
    ANCHOR_SUFFIX,
    ANSWER_BIAS,
    ANSWER_IDS,
    ATTENTION_MASK,
    AUX_LOSS_COEF,
    CE_LOSS,
    FROZEN_INPUTS,
    INPUT_IDS,
    LABELS,
    LOSS,
    NO_ANSWER_SHIFT,
    NUM_TOKENS,
    PROX_MU,
    ROUTING_PRIOR,
    ROUTING_REG_COEF,
    ROUTING_STATS,
)
from export.moe_block import moe_blocks, use_dense_masked

DYNAMIC_INPUTS = (INPUT_IDS, ATTENTION_MASK, LABELS)
ANSWER_INPUTS = (ANSWER_IDS, ANSWER_BIAS)  # dynamic axis 0: num_answers
_EPS = 1e-12


def routing_sums(logits: torch.Tensor, top_k_index: torch.Tensor, valid: torch.Tensor):
    """Per-expert sums over the valid tokens of G (the router probabilities) and of top-k hits.

    Args:
        logits: ``(num_tokens, E)`` router logits.
        top_k_index: ``(num_tokens, top_k)`` int64 chosen experts.
        valid: ``(num_tokens, 1)`` float, 1 for real tokens, 0 for padding.

    Returns:
        ``(probs, log_probs, prob_sum, hit_count)``: ``(N, E)`` masked G, ``(N, E)`` log G,
        ``(E,)`` sum_i G_e(x_i), ``(E,)`` number of tokens whose top-k contains e.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1) * valid  # (N, E)
    log_probs = torch.log_softmax(logits, dim=-1)  # finite where probs underflow to 0
    experts = torch.arange(logits.shape[-1], device=logits.device)
    hits = (top_k_index.unsqueeze(-1) == experts).to(probs.dtype).sum(dim=1) * valid  # (N, E)
    return probs, log_probs, probs.sum(0), hits.sum(0)


def routing_stats(probs, log_probs, prob_sum, hit_count) -> torch.Tensor:
    """The ``(4, E)`` ``routing_stats_{l}`` output from :func:`routing_sums` (see the module docstring).

    Kept off the loss path: ORT has no gradient builder for ReduceMax, and needs none here.
    """
    return torch.stack([prob_sum, probs.amax(0), (probs * log_probs).sum(0), hit_count]).detach()


def load_balancing_loss(prob_sum: torch.Tensor, hit_count: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
    """Switch / Mixtral load-balancing loss ``E * sum_e f_e P_e``; inputs ``(E,)`` from :func:`routing_sums`."""
    fraction = hit_count / num_valid  # f_e: no gradient (a count)
    mean_prob = prob_sum / num_valid  # P_e
    return prob_sum.shape[-1] * (fraction * mean_prob).sum()


def routing_kl(prob_sum: torch.Tensor, num_valid: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``KL(p_local || prior)`` with ``p_local = prob_sum / num_valid`` (FedAlign-MoE regulariser)."""
    local = prob_sum / num_valid
    return (local * (torch.log(local.clamp_min(_EPS)) - torch.log(prior.clamp_min(_EPS)))).sum()


def select_targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a target, packed per row, and their labels.

    Position t predicts ``labels[:, t + 1]``. With ``m (batch, seq_len - 1)`` the target mask of the shifted
    labels, ``K = max(1, max_b sum_t m[b, t])`` and ``r = cumsum(m) - 1`` each target's rank in its row, the
    one-hot ``S[b, k, t] = m[b, t] * (r[b, t] == k)`` picks the k-th target of row b. Built from CumSum, Range,
    Equal and MatMul only: a Gather here would backpropagate through ScatterElements-add, which ORT training
    differentiates silently wrongly (``docs/stack.md``); the index arithmetic is off the gradient path.

    Args:
        hidden: ``(batch, seq_len, hidden)`` last hidden states. labels: ``(batch, seq_len)`` int64, -100 = not
            a target.

    Returns:
        ``(hidden_sel (batch, K, hidden), labels_sel (batch, K) int64)``; a row's slots past its last target
        hold zeros and label -100.
    """
    shift_labels = labels[:, 1:]  # (batch, T), T = seq_len - 1
    mask = (shift_labels != IGNORE_INDEX).to(torch.int64)  # (batch, T)
    rank = torch.where(mask == 1, torch.cumsum(mask, dim=1) - 1, torch.full_like(mask, -1))  # (batch, T)
    slots = torch.arange(mask.sum(dim=1).max().clamp_min(1), device=labels.device)  # (K,)
    hits = (rank.unsqueeze(1) == slots.view(1, -1, 1)).to(torch.int64)  # (batch, K, T): S
    offset = (shift_labels - IGNORE_INDEX).unsqueeze(1)  # label + 100 at targets: an empty slot sums to -100
    labels_sel = (hits * offset).sum(dim=2) + IGNORE_INDEX  # (batch, K)
    hidden_sel = torch.matmul(hits.to(hidden.dtype), hidden[:, :-1, :])  # (batch, K, hidden)
    return hidden_sel, labels_sel


def adjust_first_target(logits: torch.Tensor, answer_ids: torch.Tensor, answer_bias: torch.Tensor) -> torch.Tensor:
    """Add ``answer_bias[a]`` to the logit of token ``answer_ids[a]`` at slot 0 (each row's first target).

    Built from Equal, MatMul and Mul: the ``(num_answers, vocab)`` one-hot of the ids times the biases gives the
    ``(vocab,)`` shift, with no Scatter (``docs/stack.md``). Repeated ids add up.

    Args:
        logits: ``(batch, K, vocab)`` from :func:`select_targets`' hidden states. answer_ids: ``(num_answers,)``
            int64. answer_bias: ``(num_answers,)`` float32, finite.

    Returns:
        ``(batch, K, vocab)``: ``logits`` with the shift on slot 0.
    """
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    one_hot = (answer_ids.unsqueeze(1) == vocab).to(logits.dtype)  # (num_answers, vocab)
    shift = torch.matmul(answer_bias.to(logits.dtype).unsqueeze(0), one_hot)  # (1, vocab)
    first = (torch.arange(logits.shape[1], device=logits.device) == 0).to(logits.dtype)  # (K,)
    return logits + first.view(1, -1, 1) * shift.unsqueeze(0)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over target positions of already aligned logits and labels.

    Args:
        logits: ``(..., vocab)``. labels: ``logits.shape[:-1]`` int64, -100 = not a target (no shift here:
            :func:`select_targets` aligns them).

    Returns:
        ``()``: sum of target losses / max(1, number of targets) (0 when there is no target).
    """
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    targets = (flat_labels != IGNORE_INDEX).sum().clamp_min(1).to(total.dtype)
    return total / targets


class TrainingWrapper(nn.Module):
    """A CausalLM holding fedmoe MoE blocks (any supported family, upcycled or pretrained; pruned or not) as an
    ONNX training graph.

    The wrapper adopts the CausalLM's children (``model``, ``lm_head``) so its ``state_dict`` names equal
    the CausalLM's, and switches the experts to the dense-masked forward. Router logits are captured
    with forward hooks on each MoE layer's ``mlp.gate``.

    Args:
        causal_lm: a transformers ``*ForCausalLM`` holding ``export.moe_block.MoeBlock`` layers (LoRA via
            ``add_lora`` optional).
        prox: add the FedProx inputs (``prox_mu`` and one ``<name>.anchor`` per trainable tensor).
        trainable: trainable parameter names (``state_dict`` names); needed when ``prox`` is set.

    Raises:
        ModelError: no fedmoe MoE block, a ``trainable`` name that is not a parameter, or ``prox`` without
            ``trainable``.
    """

    def __init__(self, causal_lm: nn.Module, *, prox: bool = False, trainable: list[str] | tuple[str, ...] = ()):
        super().__init__()
        use_dense_masked(causal_lm)
        for name, child in causal_lm.named_children():
            self.add_module(name, child)
        self.config = causal_lm.config
        blocks = [block for _, block in moe_blocks(causal_lm)]  # plain lists: not registered twice
        self.routers = [block.gate for block in blocks]
        params = dict(self.named_parameters())
        unknown = [n for n in trainable if n not in params]
        if unknown:
            raise ModelError(f"trainable names that are not parameters: {unknown[:5]}")
        if prox and not trainable:
            raise ModelError("FedProx (prox=True) needs the trainable names: one anchor input per trainable tensor")
        self.prox = prox
        self.trainable = tuple(trainable)
        self.experts = [block.experts for block in blocks]
        self.frozen_layers = tuple(
            l for l, m in enumerate(self.experts) if getattr(m, "frozen_experts", None) is not None
        )
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        for router in self.routers:
            router.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        logits, _, top_k_index = output
        self._captured.append((logits, top_k_index))

    @property
    def num_experts(self) -> tuple[int, ...]:
        """Experts per MoE layer the router scores (trained and frozen)."""
        return tuple(int(r.weight.shape[0]) for r in self.routers)

    def frozen_inputs(self) -> dict[str, torch.Tensor]:
        """The frozen experts the model holds now, by graph input name (:attr:`frozen_names` order)."""
        return {
            name.format(l): value
            for l in self.frozen_layers
            for name, value in zip(FROZEN_INPUTS, self.experts[l].frozen_experts)
        }

    @property
    def frozen_names(self) -> tuple[str, ...]:
        """The frozen-expert graph inputs, ``frozen_gate_up_{l}``, ``frozen_down_{l}`` per resident layer."""
        return tuple(name.format(l) for l in self.frozen_layers for name in FROZEN_INPUTS)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Graph input names in feed order."""
        names = [INPUT_IDS, ATTENTION_MASK, LABELS, AUX_LOSS_COEF, ROUTING_REG_COEF]
        names += [ROUTING_PRIOR.format(l) for l in range(len(self.routers))]
        names += list(ANSWER_INPUTS)
        names += list(self.frozen_names)
        if self.prox:
            names += [PROX_MU] + [n + ANCHOR_SUFFIX for n in self.trainable]
        return tuple(names)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Graph output names (``loss`` first)."""
        stats = [ROUTING_STATS.format(l) for l in range(len(self.routers))]
        return (LOSS, CE_LOSS, *stats, NUM_TOKENS)

    def make_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *,
        aux_loss_coef: float = 0.0,
        routing_reg_coef: float = 0.0,
        routing_priors: list | None = None,
        answer_ids=NO_ANSWER_SHIFT[0],
        answer_bias=NO_ANSWER_SHIFT[1],
        prox_mu: float = 0.0,
        anchors: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """All graph inputs by name, in feed order. Priors default to uniform, anchors to the current weights,
        the answer shift to none (one id with bias 0), the frozen experts to those the model holds."""
        scalar = lambda v: torch.tensor(float(v), dtype=torch.float32)  # noqa: E731
        inputs = {
            INPUT_IDS: input_ids,
            ATTENTION_MASK: attention_mask,
            LABELS: labels,
            AUX_LOSS_COEF: scalar(aux_loss_coef),
            ROUTING_REG_COEF: scalar(routing_reg_coef),
        }
        for l, count in enumerate(self.num_experts):
            prior = torch.full((count,), 1.0 / count) if routing_priors is None else routing_priors[l]
            inputs[ROUTING_PRIOR.format(l)] = torch.as_tensor(prior, dtype=torch.float32)
        inputs[ANSWER_IDS] = torch.as_tensor(answer_ids, dtype=torch.int64)
        inputs[ANSWER_BIAS] = torch.as_tensor(answer_bias, dtype=torch.float32)
        inputs.update(self.frozen_inputs())
        if self.prox:
            inputs[PROX_MU] = scalar(prox_mu)
            params = dict(self.named_parameters())
            for name in self.trainable:
                anchor = params[name].detach() if anchors is None else anchors[name]
                inputs[name + ANCHOR_SUFFIX] = torch.as_tensor(anchor, dtype=torch.float32).clone()
        return inputs

    def forward(self, input_ids, attention_mask, labels, aux_loss_coef, routing_reg_coef, *rest):
        """Graph inputs positionally in :attr:`input_names` order; returns the :attr:`output_names` tuple."""
        num_layers, num_frozen = len(self.routers), len(self.frozen_names)
        priors, (answer_ids, answer_bias) = rest[:num_layers], rest[num_layers : num_layers + 2]
        frozen, prox_inputs = rest[num_layers + 2 : num_layers + 2 + num_frozen], rest[num_layers + 2 + num_frozen :]
        for i, l in enumerate(self.frozen_layers):
            self.experts[l].frozen_experts = (frozen[2 * i], frozen[2 * i + 1])
        self._captured = []
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        labels = torch.where(attention_mask == 0, torch.full_like(labels, IGNORE_INDEX), labels)
        hidden_sel, labels_sel = select_targets(hidden, labels)  # the lm_head runs on targets only
        logits = adjust_first_target(self.lm_head(hidden_sel), answer_ids, answer_bias)  # (batch, K, vocab)
        ce = causal_lm_loss(logits, labels_sel)
        valid = attention_mask.reshape(-1, 1).to(torch.float32)  # (N, 1)
        num_valid = valid.sum().clamp_min(1.0)
        captured, self._captured = self._captured, []
        if len(captured) != num_layers:
            raise ModelError(f"captured {len(captured)} router outputs, expected one per MoE layer ({num_layers})")
        sums = [routing_sums(logits, index, valid) for logits, index in captured]
        balance = torch.stack([load_balancing_loss(s[2], s[3], num_valid) for s in sums]).mean()
        kl = torch.stack([routing_kl(s[2], num_valid, p) for s, p in zip(sums, priors)]).mean()
        stats = [routing_stats(*s) for s in sums]
        loss = ce + aux_loss_coef * balance + routing_reg_coef * kl
        if self.prox:
            loss = loss + self._proximal(prox_inputs[0], prox_inputs[1:])
        return (loss, ce, *stats, attention_mask.sum())

    def _proximal(self, mu: torch.Tensor, anchors) -> torch.Tensor:
        """FedProx ``mu / 2 * sum_w ||w - anchor_w||^2`` over the trainable tensors."""
        params = dict(self.named_parameters())
        squares = [((params[n] - a) ** 2).sum() for n, a in zip(self.trainable, anchors)]
        return 0.5 * mu * torch.stack(squares).sum()
