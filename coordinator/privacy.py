"""Client-level differential privacy, central model (DP-FedAvg): the mechanism as pure numpy, no I/O.

Sources: McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018 (clip each
client's update to L2 norm S, add N(0, sigma^2 S^2) to the sum); Andrew et al., "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021 (S follows a target quantile of the update norms; Theorem 1 for the
budget). Accounting: Google's ``dp-accounting`` (RDP accountant). Flower's anchor is
``DifferentialPrivacyServerSideFixedClipping`` / ``...AdaptiveClipping``: the coordinator clips and noises.

The coordinator is trusted: it sees every update in clear. What is protected is the *released model* (every
global version): whoever reads it learns little about any one device's update. The routing statistics devices
send (used to pick their experts) and the registry's per-device rows are not covered.

**The mechanism, per round, on sparse updates.** Device i sent rows R_i (its expert rows, its router rows over
the experts it held, any unindexed tensor it sent); its delta d_i is its rows minus the global rows the round
started from, and ||d_i|| the L2 norm over *all* of them (every tensor, routers included). The coordinator
clips, c_i = d_i * min(1, S / ||d_i||), and for every row r held by n_r >= 1 devices sets

    new_r = global_r + (sum_{i holds r} c_{i,r} + N(0, (z_v S)^2 I)) / n_r

A row nobody held (n_r = 0) is not touched: no noise, unchanged. Row weights are 1 per holder, never
num_examples or routing-based weights: those depend on the data (they would leak) and would scale a device's
contribution past S.

**Sensitivity with rows of different holders.** Let F(D) be the vector of *all* row sums, the concatenation over
rows r of sum_{i in D, i holds r} c_{i,r}. Neighbouring federations D, D' differ in one device's update being
replaced by the zero update (the "zero-out" relation, ``dp_accounting.NeighboringRelation.REPLACE_SPECIAL``;
Kairouz et al. 2021, Def. 1.1): the assignment, hence every n_r, is the same in both. Then F(D) - F(D') is
device i's clipped delta c_i laid out on the rows it held and 0 elsewhere, so ||F(D) - F(D')||_2 = ||c_i|| <= S,
however its rows overlap the others'. Adding N(0, (z S)^2) to every coordinate of every held row sum is thus
exactly the Gaussian mechanism with L2 sensitivity S and noise multiplier z on F. Rows nobody holds are 0 in
both F(D) and F(D') (no coordinate to protect). Dividing by n_r and adding the global model are
post-processing of (F + noise, n), which costs nothing more **given n**.

**The holder counts n_r are public.** They follow from the coordinator's assignment (which devices were
selected, which experts each trains: profiles and routing statistics, decided before training), not from the
updates, and the release reveals them: a row no device held is visibly unchanged and a row's noise has standard
deviation z_v S / n_r. So the model reveals which rows were trained this round and by how many devices, not
what any device's update was. The number of accepted updates per round is public in the same way.

**Sampling.** The round's sampling rate q = (devices selected) / (devices eligible when the round started: the
connected ones the participation rules allow) is recorded by the round engine and passed to the strategy; the
accountant rounds it up to two significant digits. A round resumed after a restart, whose q is unknown, counts
with q = 1 (no amplification). Rounds are accounted as
``PoissonSampledDpEvent(q, GaussianDpEvent(z))``: our selection draws a fixed-size uniform subset, and
Poisson accounting for it is the usual approximation (Flower's and TensorFlow Federated's); q over the
*eligible* devices is no smaller than over all enrolled ones, so it errs on the safe side. Amplification by
sampling needs the identity of the selected devices to stay hidden from the adversary (it is in the
coordinator's registry, which the trusted-coordinator model keeps private). With q = 1 no amplification is
claimed.

**Known gaps.** An update the coordinator rejects (malformed, non-finite, a tensor above ``update_norm_bound``)
is dropped, so whether a device counts as a holder can depend on its update; DP-FedAvg's clip makes the norm
bound unnecessary, so keep ``update_norm_bound`` loose (its default 1e4 bounds weights, not deltas). The round
history the accountant composes is the strategy state committed with each version: switching to another
strategy and back to ``dp-fedavg`` starts it again from zero (the ``dp_epsilon`` round metrics keep the record).

**Adaptive clipping** (Andrew et al., Algorithm 1, geometric update): with b_i = 1 if ||d_i|| <= S,
b~ = (sum_i b_i + N(0, sigma_b^2)) / m over the round's m updates, and S <- S exp(-eta (b~ - gamma)) for the
target quantile gamma. Theorem 1: noising the update sum with multiplier z_v and the count with std sigma_b is
the Gaussian mechanism with multiplier z = (z_v^-2 + (2 sigma_b)^-2)^-1/2 (the count's centred bits b_i - 1/2
have sensitivity 1/2; the two normalised queries stack into one of sensitivity 1/z). Under zero-out the special
record contributes (0, 0) to (sum of c_i, sum of (b_i - 1/2)), so a device still moves the pair by at most
(S, 1/2); sum_i b_i = sum_i (b_i - 1/2) + m/2 with m public. We account with the
configured total z and noise the sum with z_v = (z^-2 - (2 sigma_b)^-2)^-1/2, which needs z < 2 sigma_b
(Andrew et al. suggest sigma_b = m / 20). The next S is post-processing of the noised count.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from device_runtime.errors import ConfigError

log = logging.getLogger("fedmoe.coord")


@dataclass(frozen=True)
class PrivacyConfig:
    """The ``[privacy]`` table of the coordinator config (``CoordinatorConfig.privacy``); off by default.

    Attributes:
        noise_multiplier: z, the Gaussian noise multiplier the accountant uses (> 0 turns DP on; 0: off). With
            adaptive clipping it is the *total* one (the sum is noised a little more, see the module docstring).
        clip: S, the fixed L2 clip of a device's update delta; 0 with ``target_quantile`` > 0: adaptive.
        target_quantile: gamma in (0, 1): adaptive clipping towards this quantile of the update norms (0: fixed).
        clip_learning_rate: eta of the geometric clip update (Andrew et al. use 0.2).
        initial_clip: the adaptive clip of round 1.
        clipped_count_stddev: sigma_b, the noise on the count of unclipped devices (adaptive; Andrew et al.
            suggest the expected devices per round / 20); must exceed noise_multiplier / 2.
        delta: the delta of the (epsilon, delta) reported.
        epsilon_budget: stop starting rounds when the next one would spend more epsilon than this (0: no budget).
        seed: seed of the noise (>= 0: reproducible, for tests and simulations only; -1: fresh OS entropy each
            round, what a deployment needs: whoever knows the seed can subtract the noise).
        secure_aggregation: aggregate with secure aggregation (``coordinator.secagg``, ``device_runtime.secagg``):
            the coordinator sees each row's sum over its holders only. With DP on, devices clip their own deltas.
        secure_min_holders: a row is aggregated only over at least this many devices (>= 2); fewer: it keeps
            its global value that round (reported as ``secagg_rows_below_min``).
        secure_threshold: share of the round's key holders whose shares reconstruct a secret (t = max(2,
            floor(share x n) + 1)): more dropouts than n - t fail the round.
        secure_clip_range: each weighted delta coordinate is clipped to +- this before quantisation (without DP).
        secure_max_weight: examples that weigh 1 on a device (its rows are scaled by min(n, this) / this);
            0: ``[fit] local_steps x batch_size`` (1000 when local_steps is 0).
        secure_timeout_s: seconds each secure phase (keys, shares, reveals) waits at most for the devices (a phase
            closes as soon as every device answered, the reveals once every connected device asked did). Measured:
            60 s was too short on the main job at load 6-8, where devices answer only after their bundle
            transfer and install.
    Raises:
        ConfigError: naming the value out of range.
    """

    noise_multiplier: float = 0.0
    clip: float = 0.0
    target_quantile: float = 0.0
    clip_learning_rate: float = 0.2
    initial_clip: float = 0.1
    clipped_count_stddev: float = 0.0
    delta: float = 1e-5
    epsilon_budget: float = 0.0
    seed: int = -1
    secure_aggregation: bool = False
    secure_min_holders: int = 2
    secure_threshold: float = 0.5
    secure_clip_range: float = 1.0
    secure_max_weight: float = 0.0
    secure_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        secure = [
            (not isinstance(self.secure_aggregation, bool), "secure_aggregation must be true or false"),
            (
                isinstance(self.secure_min_holders, bool) or not 2 <= self.secure_min_holders <= 1024,
                f"secure_min_holders must be an integer in [2, 1024], got {self.secure_min_holders}",
            ),
            (not 0 <= self.secure_threshold < 1, f"secure_threshold must be in [0, 1), got {self.secure_threshold}"),
            (
                not 0 < self.secure_clip_range <= 1e6,
                f"secure_clip_range must be in (0, 1e6], got {self.secure_clip_range}",
            ),
            (
                not 0 <= self.secure_max_weight <= 1e12,
                f"secure_max_weight must be in [0, 1e12] (0: from [fit]), got {self.secure_max_weight}",
            ),
            (
                not 0 < self.secure_timeout_s <= 86400,
                f"secure_timeout_s must be in (0, 86400], got {self.secure_timeout_s}",
            ),
        ]
        for bad, message in secure:
            if bad:
                raise ConfigError(f"config [privacy]: {message}")
        if not self.enabled:
            return
        z, sb = self.noise_multiplier, self.clipped_count_stddev
        problems = [
            (not math.isfinite(z), f"noise_multiplier must be finite, got {z}"),
            (
                (self.clip > 0) == (self.target_quantile > 0),
                "set exactly one of clip (fixed clipping) and target_quantile (adaptive clipping)",
            ),
            (self.clip < 0 or not math.isfinite(self.clip), f"clip must be > 0, got {self.clip}"),
            (not 0 <= self.target_quantile < 1, f"target_quantile must be in (0, 1), got {self.target_quantile}"),
            (not self.clip_learning_rate > 0, f"clip_learning_rate must be > 0, got {self.clip_learning_rate}"),
            (not self.initial_clip > 0, f"initial_clip must be > 0, got {self.initial_clip}"),
            (
                self.adaptive and not 2 * sb > z,
                f"adaptive clipping needs clipped_count_stddev > noise_multiplier / 2 = {z / 2:g} (Andrew et al. "
                f"Theorem 1; they suggest the expected devices per round / 20), got {sb}; raise it or lower "
                "noise_multiplier",
            ),
            (not 0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}"),
            (not self.epsilon_budget >= 0, f"epsilon_budget must be >= 0 (0: none), got {self.epsilon_budget}"),
            (self.seed < -1, f"seed must be >= 0, or -1 for fresh entropy, got {self.seed}"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(f"config [privacy]: {message}")

    @property
    def enabled(self) -> bool:
        """Whether DP is on (``noise_multiplier`` > 0)."""
        return self.noise_multiplier > 0

    @property
    def adaptive(self) -> bool:
        return self.target_quantile > 0

    @property
    def value_noise_multiplier(self) -> float:
        """z_v, the multiplier of the noise on the update sums: z (fixed clipping), or Andrew et al.'s
        (z^-2 - (2 sigma_b)^-2)^-1/2 (adaptive)."""
        if not self.adaptive:
            return self.noise_multiplier
        return value_noise_multiplier(self.noise_multiplier, self.clipped_count_stddev)

    def rng(self, server_round: int) -> np.random.Generator:
        """The noise generator of round ``server_round``: seeded from (seed, round), or fresh entropy."""
        return np.random.default_rng(None if self.seed < 0 else [self.seed, server_round])


def value_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """z_v with (z_v^-2 + (2 sigma_b)^-2)^-1/2 = z (Andrew et al. 2021, Theorem 1).

    Raises:
        ConfigError: sigma_b <= z / 2 (no z_v achieves z).
    """
    rest = noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2
    if not rest > 0:
        raise ConfigError(
            f"clipped_count_stddev {clipped_count_stddev} is too small for noise_multiplier {noise_multiplier}: "
            "it must exceed noise_multiplier / 2"
        )
    return float(rest**-0.5)


def clip_factor(norm: float, clip: float) -> float:
    """min(1, S / ||d||): the factor that brings a delta of L2 norm ``norm`` within ``clip``."""
    return 1.0 if norm <= clip else clip / norm


def l2_norm(parts: Sequence[np.ndarray]) -> float:
    """The L2 norm of the concatenation of ``parts`` (float64 sums of squares, one part at a time)."""
    return math.sqrt(sum(float(np.vdot(p, p)) for p in parts))


def noisy_rows(
    base_rows: np.ndarray, sum_rows: np.ndarray, holders: np.ndarray, std: float, rng: np.random.Generator
) -> np.ndarray:
    """New values of held rows: base + (sum of clipped deltas + N(0, std^2)) / holders.

    Args:
        base_rows: the global rows ``(k, ...)``. sum_rows: the sums of the holders' clipped deltas, ``(k, ...)``.
        holders: n_r per row, ``(k,)``, all >= 1. std: z_v * S, per coordinate of each sum.
    """
    noise = rng.normal(0.0, std, sum_rows.shape) if std > 0 else 0.0
    scale = holders.reshape(holders.shape + (1,) * (sum_rows.ndim - 1))
    out: np.ndarray = base_rows + (sum_rows + noise) / scale
    return out


def adaptive_clip_step(
    clip: float,
    unclipped: int,
    count: int,
    *,
    target_quantile: float,
    learning_rate: float,
    count_stddev: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """One geometric update of the adaptive clip (Andrew et al., Algorithm 1).

    Args:
        clip: S of this round. unclipped: devices whose delta norm was <= S. count: the round's updates m.
    Returns:
        (S exp(-eta (b~ - gamma)), b~) with b~ = (unclipped + N(0, sigma_b^2)) / m, the noised unclipped share.
    """
    noised = (unclipped + (rng.normal(0.0, count_stddev) if count_stddev > 0 else 0.0)) / count
    return clip * math.exp(-learning_rate * (noised - target_quantile)), noised


def accounted_rate(q: float) -> float:
    """``q`` rounded *up* to two significant digits (0.333 -> 0.34, 0.0031 -> 0.0031): epsilon grows with q, so
    this errs on the safe side, and it bounds how many distinct rounds the accountant must evaluate (each new q
    costs dp-accounting up to ~0.2 s at its fractional orders)."""
    if q >= 1:
        return 1.0
    step = 10.0 ** (math.floor(math.log10(q)) - 1)
    return min(1.0, round(math.ceil(q / step - 1e-9) * step, 12))


@functools.lru_cache(maxsize=4096)
def _round_rdp(noise_multiplier: float, q: float) -> np.ndarray:
    """The RDP (at dp-accounting's default orders) of one round ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``,
    zero-out neighbours (for this event the same numbers as add-or-remove).

    For small z, dp-accounting's series at some fractional orders does not converge; it then excludes that order
    (its RDP becomes infinite, which can only raise the epsilon reported) and logs a warning through absl for each
    such order of every call. That warning is silenced here (the ``absl`` logger at ERROR while composing), and
    the count of excluded orders goes to this module's debug log."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier)))
    finally:
        absl.setLevel(level)
    excluded = int(np.sum(np.isinf(accountant.rdp)))
    if excluded:
        log.debug("dp-accounting excluded %d RDP orders (z %g, q %g): no convergence", excluded, noise_multiplier, q)
    rdp: np.ndarray = np.array(accountant.rdp, np.float64)
    rdp.setflags(write=False)
    return rdp


def epsilon(rounds: Sequence[tuple[float, float]], delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds``, one ``(noise multiplier z, sampling rate q)`` per round: Google's
    ``dp-accounting`` RDP accountant, each round a ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` (q as
    :func:`accounted_rate`), composed by adding their RDP, converted with its ``compute_epsilon``. 0.0 before the
    first round."""
    if not len(rounds):
        return 0.0
    from dp_accounting.rdp import RdpAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    total = sum(_round_rdp(float(z), accounted_rate(float(q))) for z, q in rounds)
    eps, _ = compute_epsilon(RdpAccountant().orders, total, delta)
    return float(eps)


def noise_for_epsilon(target: float, rounds: int, sampling_rate: float, delta: float) -> float:
    """The smallest noise multiplier z (to 0.1%) whose ``rounds`` rounds at ``sampling_rate`` spend at most
    ``target`` epsilon at ``delta`` (:func:`epsilon`): bisection on log z over [0.05, 1000].

    Raises:
        ConfigError: ``target`` or ``rounds`` is not positive, or even z = 1000 spends more.
    """
    if not target > 0 or rounds < 1:
        raise ConfigError(f"a target epsilon > 0 over >= 1 round is needed, got {target} over {rounds}")

    def spent(z: float) -> float:
        return epsilon([(z, sampling_rate)] * rounds, delta)

    low, high = 0.05, 1000.0
    if spent(high) > target:
        raise ConfigError(f"epsilon {target:g} over {rounds} rounds is out of reach (z = {high:g} spends more)")
    if spent(low) <= target:
        return low
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if spent(middle) <= target else (middle, high)
    return high
