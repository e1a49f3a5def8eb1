"""ACP-SL on a split device's uplink: send only the hidden channels of the smashed data that matter to the loss.

ACP-SL (Tan, Lin, et al., "Adaptive Channel Pruning for Communication-Efficient Split Learning", arXiv 2603.09792)
ranks the channels of the smashed data with a label-aware channel importance score (LCIS) and an adaptive pruning
module drops the low-score ones before the uplink. Only the paper's abstract is public; this is our concrete
definition, a first-order estimate of the loss change from dropping a channel:

- The coordinator fills a dropped channel j with ``m_j``, the running mean of what it received for j. Replacing
  ``z_tj`` by ``m_j`` changes the loss by about ``sum_t lambda_tj (m_j - z_tj)`` (lambda = dL/dz, the label's
  gradient at the cut). The device does not know this step's lambda before sending, so it bounds the change with
  ``g_j``, its running mean of ``|lambda_tj|`` over the gradients it received (label-aware)::

      LCIS_j = g_j * sum_t |z_tj - m_j|          (t over the batch's real tokens)

- Adaptive keep: the channels ranked by LCIS, the fewest whose scores hold ``COVERAGE`` of the total, never more
  than the byte budget ``ceil(keep_ratio * hidden)`` and at least one.

``m`` is updated on both sides from the same float16 values, so device and coordinator hold the same ``m``
bit for bit (:meth:`ChannelMeans.update`).
"""

from __future__ import annotations

import math

import numpy as np

COVERAGE = 0.99  # share of the total LCIS the kept channels must hold (when the budget allows)
DECAY = 0.9  # of the running means (per step)


class ChannelMeans:
    """The running per-channel mean ``m`` (``(hidden,)`` float32) of the smashed data the coordinator received."""

    def __init__(self, hidden: int):
        self.mean = np.zeros(hidden, np.float32)
        self.seen = np.zeros(hidden, bool)

    def update(self, values: np.ndarray, channels: np.ndarray, mask: np.ndarray) -> None:
        """Fold one step's sent ``values`` ``(batch, seq_len, len(channels))`` (as float16 on the wire) of
        ``channels`` into ``m``, over the real tokens of ``mask`` ``(batch, seq_len)``."""
        valid = mask.astype(bool)
        if not valid.any():
            return
        step_mean = values.astype(np.float32)[valid].mean(axis=0, dtype=np.float32)
        old = self.mean[channels]
        fresh = ~self.seen[channels]
        self.mean[channels] = np.where(fresh, step_mean, np.float32(DECAY) * old + np.float32(1 - DECAY) * step_mean)
        self.seen[channels] = True

    def fill(self, values: np.ndarray, channels: np.ndarray) -> np.ndarray:
        """The full ``(batch, seq_len, hidden)`` float32 smashed data: ``values`` on ``channels``, ``m`` elsewhere."""
        out = np.broadcast_to(self.mean, (*values.shape[:2], self.mean.size)).copy()
        out[:, :, channels] = values
        return out


def budget(keep_ratio: float, hidden: int) -> int:
    """The most channels a step may send: ``ceil(keep_ratio * hidden)``, at least 1."""
    return max(1, min(hidden, math.ceil(keep_ratio * hidden)))


def select_channels(
    smashed: np.ndarray, mask: np.ndarray, means: ChannelMeans, gradient_scale: np.ndarray, keep_ratio: float
) -> np.ndarray:
    """The channels to send, ascending int32 (module docstring).

    Args:
        smashed: ``(batch, seq_len, hidden)``. mask: ``(batch, seq_len)``, 1 for real tokens.
        means: the running means both sides hold. gradient_scale: ``g``, ``(hidden,)`` (ones before any gradient).
        keep_ratio: the budget's share of channels, in (0, 1].
    """
    hidden = smashed.shape[-1]
    limit = budget(keep_ratio, hidden)
    if limit >= hidden:
        return np.arange(hidden, dtype=np.int32)
    valid = mask.astype(bool)
    deviation = np.abs(smashed[valid] - means.mean).sum(axis=0, dtype=np.float64)
    scores = gradient_scale.astype(np.float64) * deviation
    order = np.argsort(-scores, kind="stable")
    mass = np.cumsum(scores[order])
    enough = int(np.searchsorted(mass, COVERAGE * mass[-1])) + 1 if mass[-1] > 0 else limit
    return np.sort(order[: max(1, min(limit, enough))]).astype(np.int32)


def update_gradient_scale(scale: np.ndarray | None, gradient: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``g`` after one received ``gradient`` ``(batch, seq_len, hidden)``: running mean of ``|lambda_j|`` over
    real tokens (the first gradient sets it)."""
    step: np.ndarray = np.abs(gradient.astype(np.float32)[mask.astype(bool)]).mean(axis=0)
    return step if scale is None else np.float32(DECAY) * scale + np.float32(1 - DECAY) * step
