"""The coordinator's part of secure aggregation: one round's protocol state (I/O-free) and the unmasking sum.

The protocol, the masks and why they cancel are in ``device_runtime.secagg`` (Bonawitz et al., CCS 2017; Bell et
al., CCS 2020). Here: :class:`SecureRound` collects each phase's messages (keys -> shares -> masked rows ->
reveals), decides when a phase closes (everyone answered, or ``[privacy] secure_timeout_s`` passed) and what to
send next; :func:`secure_sums` turns the stored masked payloads and the revealed secrets into per-row sums of
the weighted deltas and of the weights, one payload at a time (memory O(model): one uint32 accumulator per
tensor touched), which a strategy's ``aggregate_secure`` turns into the new global rows.

Threat model: the coordinator is honest-but-curious (it runs this protocol as written and tries to learn from
what it sees), the devices are honest (they do not send poisoned rows: nothing here could tell). What the
coordinator learns: each aggregated row's sum over at least ``min_holders`` devices, and its weight sum; which
devices hold which rows (it assigned them); the routing statistics, trained experts, metrics and federated
evaluation each device sends in clear (``SecAggMasked``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import safetensors.numpy
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from coordinator.privacy import PrivacyConfig
from coordinator.strategy.secure_rows import SecureRows
from coordinator.strategy.types import Params
from device_runtime.errors import ConfigError, ProtocolError
from device_runtime.secagg import (
    WORD,
    Slot,
    agree,
    combine_secret,
    dequantize,
    holders,
    mask_public,
    pair_sign,
    prg,
    scales,
    sent_slots,
    unmaskable,
)
from device_runtime.wire import (
    FitConfig,
    ImportanceWeighting,
    Message,
    Participant,
    SealedShare,
    SecAggInbox,
    SecAggKeys,
    SecAggMasked,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
)

NOT_SECURE = {
    "fedalign": "its expert alignment selects devices by the cosine similarity of their individual updates",
    "fedprox": "its anchor checks read each device's individual update",
    "fedadam": "a server optimizer over the secure average is not wired yet",
    "fedyogi": "a server optimizer over the secure average is not wired yet",
}
"""Why each registered strategy that cannot aggregate securely refuses (``check_secure``)."""
MASKED = "masked"  # the one tensor of a stored masked payload: its uint32 words


def masked_blob(data: bytes) -> bytes:
    """A SecAggMasked payload as the tensor store keeps it: a safetensors blob of one uint32 tensor ``MASKED``."""
    return safetensors.numpy.save({MASKED: np.frombuffer(data, WORD)})


def masked_payload(blob: bytes) -> bytes:
    """The payload of a :func:`masked_blob`. Raises ProtocolError("bad_payload"): not one uint32 tensor."""
    try:
        tensors = safetensors.numpy.load(blob)
    except Exception as exc:  # safetensors' own error types
        raise ProtocolError("bad_payload", f"stored masked payload unreadable: {exc}") from exc
    words = tensors.get(MASKED)
    if set(tensors) != {MASKED} or words is None or words.dtype != WORD or words.ndim != 1:
        raise ProtocolError("bad_payload", "a stored masked payload holds one uint32 vector")
    return words.tobytes()


def check_secure(strategy: str, weighting: str | None, privacy: PrivacyConfig, fit: FitConfig) -> None:
    """Whether a federation may run with ``[privacy] secure_aggregation``.

    Raises:
        ConfigError: the strategy needs individual updates (or is not wired), adaptive clipping is asked for (its
            unclipped count would need individual norms), or zeroth-order seed updates are on.
    """
    if weighting is None:
        why = NOT_SECURE.get(strategy, "it reads individual updates")
        raise ConfigError(
            f"config: [privacy] secure_aggregation cannot run strategy {strategy!r}: {why}; secure aggregation "
            "gives the coordinator only each row's sum. Use hfedmoe, fedavg, fedmoe, dense-fedavg or dp-fedavg"
        )
    if privacy.adaptive:
        raise ConfigError(
            "config: [privacy] secure_aggregation with adaptive clipping is not supported (the unclipped count "
            "needs each device's norm); set a fixed clip"
        )
    if fit.zo_seeds:
        raise ConfigError("config: [privacy] secure_aggregation needs dense updates: set [fit] zo_seeds = 0")


@dataclass(frozen=True)
class SecureSettings:
    """A secure round's parameters: the SecAggStart fields every device gets (``weighting``, ``max_weight``,
    ``clip``, ``clip_range``, ``min_holders``, ``importance``), the share of U1 needed to reconstruct a secret
    (``threshold``: t = max(2, floor(threshold * |U1|) + 1), at most |U1|) and the seconds a phase waits
    (``timeout_s``)."""

    weighting: str
    max_weight: float
    clip: float
    clip_range: float
    min_holders: int
    threshold: float
    timeout_s: float
    importance: ImportanceWeighting | None = None

    @classmethod
    def from_config(
        cls, privacy: PrivacyConfig, fit: FitConfig, weighting: str, importance: ImportanceWeighting | None = None
    ) -> SecureSettings:
        """From ``[privacy]`` and ``[fit]``: with DP (``weighting`` "unit") the device clips its delta to S and
        each coordinate is within S; ``max_weight`` 0 means the examples of ``local_steps`` batches (or Flower's
        1000 for one epoch). ``importance``: HFedMoE's parameters (``Strategy.secure_importance``)."""
        dp = weighting == "unit"
        max_weight = privacy.secure_max_weight or float(fit.local_steps * fit.batch_size or 1000)
        return cls(
            weighting,
            max_weight,
            privacy.clip if dp else 0.0,
            privacy.clip if dp else privacy.secure_clip_range,
            privacy.secure_min_holders,
            privacy.secure_threshold,
            privacy.secure_timeout_s,
            importance,
        )


@dataclass(frozen=True)
class SecureMember:
    """A device assigned in a secure round: its update id, the rows it holds and the slots it may send."""

    device_id: str
    update_id: str
    experts: tuple[tuple[int, ...], ...]
    held: tuple[tuple[int, ...], ...]
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class Advance:
    """What closing a phase asks of the coordinator: ``sends`` (device, message), assignments to reject
    (``dropped``: device -> reason), or the round failed (``failed``: why)."""

    sends: list[tuple[str, Message]] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    failed: str | None = None


class SecureRound:
    """One secure round's protocol state: phase ``keys`` -> ``shares`` -> ``masking`` (-> ``unmasking``).

    Args:
        round_id: the registry round. members: the assigned devices. settings: the round's parameters.
        now: seconds, monotonic.
    """

    def __init__(self, round_id: int, members: Sequence[SecureMember], settings: SecureSettings, *, now: float):
        self.round_id, self.settings = round_id, settings
        self.members = {m.device_id: m for m in members}
        self.min_holders, self.timeout_s = settings.min_holders, settings.timeout_s
        self.phase, self.deadline = "keys", now + self.timeout_s
        self.keys: dict[str, SecAggKeys] = {}
        self.shares: dict[str, SecAggShares] = {}
        self.roster: tuple[Participant, ...] = ()
        self.threshold = 0
        self.u2: frozenset[str] = frozenset()
        self.survivors: frozenset[str] = frozenset()
        self.asked: dict[str, SecAggUnmask] = {}
        self.reveals: dict[str, SecAggReveal] = {}
        self.sent: dict[str, list[Message]] = {d: [self.start_message(d)] for d in self.members}

    def start_message(self, device_id: str) -> SecAggStart:
        s = self.settings
        return SecAggStart(
            round_id=self.round_id,
            update_id=self.members[device_id].update_id,
            weighting=s.weighting,  # type: ignore[arg-type]  # "examples" | "unit" | "hfedmoe", checked by the decoder
            max_weight=s.max_weight,
            clip=s.clip,
            clip_range=s.clip_range,
            min_holders=s.min_holders,
            importance=s.importance,
        )

    def _member(self, device_id: str, update_id: str, round_id: int) -> SecureMember:
        member = self.members.get(device_id)
        if member is None or (member.update_id, round_id) != (update_id, self.round_id):
            raise ProtocolError("unexpected", f"no secure assignment {update_id} of round {round_id} for this device")
        return member

    # ------------------------------------------------------------ messages from devices

    def on_keys(self, device_id: str, msg: SecAggKeys) -> None:
        """Record a device's public keys (a repeat of the same keys is ignored). Raises ProtocolError."""
        self._member(device_id, msg.update_id, msg.round_id)
        if self.keys.get(device_id, msg) != msg:
            raise ProtocolError("unexpected", "keys already advertised for this round")
        if self.phase != "keys" and device_id not in self.keys:
            raise ProtocolError("unexpected", "the key phase of this round is over")
        self.keys[device_id] = msg

    def on_shares(self, device_id: str, msg: SecAggShares) -> None:
        """Record a device's sealed shares: exactly one for every other roster device. Raises ProtocolError."""
        self._member(device_id, msg.update_id, msg.round_id)
        roster = {p.device_id for p in self.roster}
        if device_id in self.shares:
            if self.shares[device_id] != msg:
                raise ProtocolError("unexpected", "shares already sent for this round")
            return
        if self.phase != "shares" or device_id not in roster:
            raise ProtocolError("unexpected", "not in the share phase of this round, or not on its roster")
        if {s.peer for s in msg.shares} != roster - {device_id}:
            raise ProtocolError("unexpected", "shares must go to every other device of the roster, once")
        self.shares[device_id] = msg

    def expected_bytes(self, device_id: str) -> int:
        """The size of the device's masked payload: 4 bytes per value and per weight of its sent slots."""
        slots = sent_slots(self.members[device_id].slots, self.roster, self.u2, self.min_holders)
        return 4 * sum(s.size + 1 for s in slots)

    def check_masked(self, device_id: str, msg: SecAggMasked) -> None:
        """Whether a masked payload may count. Raises ProtocolError: not in U2, wrong phase or payload size."""
        self._member(device_id, msg.update_id, msg.round_id)
        if self.phase != "masking" or device_id not in self.u2:
            raise ProtocolError("unexpected", "this device sent no shares, or the masking phase is over")
        if len(msg.data) != self.expected_bytes(device_id):
            raise ProtocolError(
                "bad_payload", f"masked payload of {len(msg.data)} bytes, expected {self.expected_bytes(device_id)}"
            )

    def on_reveal(self, device_id: str, msg: SecAggReveal) -> None:
        """Record the shares a device revealed: exactly those asked of it. Raises ProtocolError."""
        self._member(device_id, msg.update_id, msg.round_id)
        asked = self.asked.get(device_id)
        if asked is None or self.phase != "unmasking":
            raise ProtocolError("unexpected", "no unmask request is open for this device")
        wanted = {(o, "self") for o in asked.survivors} | {(o, "mask") for o in asked.dropped}
        if {(s.owner, s.kind) for s in msg.shares} != wanted:
            raise ProtocolError("unexpected", "the revealed shares are not those asked for")
        self.reveals.setdefault(device_id, msg)

    # ------------------------------------------------------------ phases

    def advance(self, now: float) -> Advance:
        """Close the key or share phase when every device answered or the phase's deadline passed."""
        if self.phase == "keys" and (len(self.keys) == len(self.members) or now >= self.deadline):
            return self._close_keys(now)
        if self.phase == "shares" and (len(self.shares) == len(self.roster) or now >= self.deadline):
            return self._close_shares()
        return Advance()

    def _close_keys(self, now: float) -> Advance:
        dropped = {d: "advertised no secure-aggregation keys in time" for d in self.members if d not in self.keys}
        if len(self.keys) < 2:
            return Advance(dropped=dropped, failed=f"secure aggregation needs >= 2 devices, {len(self.keys)} sent keys")
        self.roster = tuple(
            Participant(d, k.cipher_key, k.mask_key, self.members[d].experts, self.members[d].held)
            for d, k in sorted(self.keys.items())
        )
        n = len(self.roster)
        self.threshold = min(n, max(2, math.floor(self.settings.threshold * n) + 1))
        self.phase, self.deadline = "shares", now + self.timeout_s
        sends: list[tuple[str, Message]] = []
        for p in self.roster:
            update_id = self.members[p.device_id].update_id
            sends.append(
                (
                    p.device_id,
                    SecAggRoster(
                        round_id=self.round_id, update_id=update_id, threshold=self.threshold, participants=self.roster
                    ),
                )
            )
        return self._sending(sends, dropped)

    def _close_shares(self) -> Advance:
        in_roster = {p.device_id for p in self.roster}
        dropped = {d: "sent no secure-aggregation shares in time" for d in in_roster if d not in self.shares}
        if len(self.shares) < self.threshold:
            return Advance(
                dropped=dropped,
                failed=f"{len(self.shares)} devices sent shares, fewer than the threshold t = {self.threshold}",
            )
        self.u2, self.phase = frozenset(self.shares), "masking"
        sends: list[tuple[str, Message]] = []
        for v in sorted(self.u2):
            sealed = tuple(
                SealedShare(u, s.ciphertext)
                for u in sorted(self.u2 - {v})
                for s in self.shares[u].shares
                if s.peer == v
            )
            update_id = self.members[v].update_id
            sends.append((v, SecAggInbox(round_id=self.round_id, update_id=update_id, shares=sealed)))
        return self._sending(sends, dropped)

    def _sending(self, sends: list[tuple[str, Message]], dropped: dict[str, str]) -> Advance:
        for device_id, msg in sends:
            self.sent[device_id].append(msg)
        return Advance(sends=sends, dropped=dropped)

    def unmask(self, u3: Sequence[str]) -> list[tuple[str, Message]]:
        """Open the unmasking of the masked payloads of ``u3``: S = :func:`unmaskable` of them; every device of
        ``u3`` is asked for the b-shares of S and the s-shares of U2 \\ S.

        Raises:
            ProtocolError("unexpected"): S has fewer than t devices: the round cannot be unmasked.
        """
        survivors = unmaskable(self.roster, self.u2, u3, self.min_holders)
        if len(survivors) < self.threshold:
            raise ProtocolError(
                "unexpected",
                f"only {len(survivors)} of the {len(u3)} masked updates can be unmasked without exposing a row held "
                f"by fewer than min_holders = {self.min_holders}; t = {self.threshold} are needed",
            )
        self.survivors, self.phase = frozenset(survivors), "unmasking"
        sends: list[tuple[str, Message]] = []
        for d in sorted(set(u3) & self.u2):
            request = SecAggUnmask(
                round_id=self.round_id,
                update_id=self.members[d].update_id,
                survivors=tuple(sorted(survivors)),
                dropped=tuple(sorted(self.u2 - survivors)),
            )
            self.asked[d] = request
            sends.append((d, request))
        for device_id, msg in sends:
            self.sent[device_id].append(msg)
        return sends

    def secrets(self) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """The reconstructed self-mask seeds of S and mask private keys of U2 \\ S.

        Raises:
            ProtocolError("unexpected"): fewer than t devices revealed, or a reconstructed key does not match
                the public key its owner advertised (a corrupted share).
        """
        if len(self.reveals) < self.threshold:
            raise ProtocolError(
                "unexpected",
                f"{len(self.reveals)} devices revealed their shares, the threshold is t = {self.threshold}",
            )
        index = {p.device_id: i + 1 for i, p in enumerate(self.roster)}
        collected: dict[tuple[str, str], dict[int, bytes]] = {}
        for revealer, msg in self.reveals.items():
            for s in msg.shares:
                collected.setdefault((s.owner, s.kind), {})[index[revealer]] = s.share
        seeds = {o: combine_secret(collected[(o, "self")], self.threshold) for o in self.survivors}
        masks = {o: combine_secret(collected[(o, "mask")], self.threshold) for o in self.u2 - self.survivors}
        for owner, private in masks.items():
            if mask_public(private) != self.keys[owner].mask_key:
                raise ProtocolError("unexpected", f"the mask key of {owner} reconstructed from the shares is wrong")
        return seeds, masks


def secure_sums(
    state: SecureRound,
    payload: Callable[[str], bytes],
    global_params: Params,
    seeds: Mapping[str, bytes],
    masks: Mapping[str, bytes],
) -> SecureRows:
    """Sum S's masked payloads (``payload(device_id)``, read one at a time) per row and remove the masks left:
    each survivor's self mask PRG(b_u) and its pairwise masks with the devices of U2 \\ S (s_uv from the
    reconstructed s_v). Dequantised with :func:`device_runtime.secagg.scales` of |U1|.

    Raises:
        ProtocolError("bad_payload"): a payload of another size than its slots need.
    """
    n, round_id = len(state.roster), state.round_id
    value_scale, weight_scale = scales(state.settings.clip_range, n)
    mask_keys = {p.device_id: p.mask_key for p in state.roster}
    gone = state.u2 - state.survivors
    acc: dict[str, np.ndarray] = {}
    wacc: dict[str, np.ndarray] = {}
    count: dict[str, np.ndarray] = {}
    for u in sorted(state.survivors):
        words = np.frombuffer(payload(u), WORD)
        slots = sent_slots(state.members[u].slots, state.roster, state.u2, state.min_holders)
        if words.size != sum(s.size + 1 for s in slots):
            raise ProtocolError("bad_payload", f"the stored masked payload of {u} does not fit its rows")
        pairs = {v: agree(X25519PrivateKey.from_private_bytes(masks[v]), mask_keys[u], "mask", round_id) for v in gone}
        offset = 0
        for slot in slots:
            row = words[offset : offset + slot.size + 1] - prg(seeds[u], round_id, slot)
            offset += slot.size + 1
            for v in sorted(holders(state.roster, slot.key, gone)):
                pair = prg(pairs[v], round_id, slot)
                row = row - pair if pair_sign(u, v) > 0 else row + pair
            if slot.name not in acc:
                reference = global_params[slot.name]
                rows = reference.reshape(1 if slot.kind == "shared" else reference.shape[0], -1)
                acc[slot.name] = np.zeros(rows.shape, WORD)
                wacc[slot.name] = np.zeros(rows.shape[0], WORD)
                count[slot.name] = np.zeros(rows.shape[0], np.int64)
            acc[slot.name][slot.row] += row[:-1]
            wacc[slot.name][slot.row : slot.row + 1] += row[-1:]  # an array add: wraps modulo 2^32 silently
            count[slot.name][slot.row] += 1
    sums = {name: dequantize(a, value_scale) for name, a in acc.items()}
    totals = {name: dequantize(w, weight_scale) for name, w in wacc.items()}
    below = {
        (s.name, s.row)
        for m in state.members.values()
        for s in m.slots
        if len(holders(state.roster, s.key, state.survivors)) < state.min_holders
    }
    return SecureRows(
        sums, totals, count, state.min_holders, len(state.survivors), len(state.u2 - state.survivors), len(below)
    )
