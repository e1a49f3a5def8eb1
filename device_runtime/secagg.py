"""Secure aggregation of sparse expert rows: the math both sides share, and a device's part of the protocol.

Sources: Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017
(double masking, Shamir shares for dropouts; section 4, Figure 4: the honest-but-curious protocol); Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+: masks only along the
edges of a sparse graph). Flower's ``secaggplus_mod`` is the anchor for the quantisation (clipping range,
stochastic rounding, sums modulo 2^32) and for weighting by ``num_examples / max_weight`` on the device.

**Rows and holders.** A device sends *rows*: for every trainable tensor (name order) the rows on its expert axis
(expert and LoRA tensors: the experts it trains; router tensors: every expert its router scores), or the whole
tensor as one row when it is not indexed by expert (:class:`Slot`). The holders H_r of a row are the roster's
devices holding it (:func:`holds`). The masking graph is SecAgg+'s sparse graph made concrete: u and v agree a
pairwise mask on row r only when both hold r, so a Pi holding 1 of 4 experts masks only those rows and only
with their co-holders.

**One round** (U1 = devices that advertised keys, U2 = those that sent shares, U3 = those whose masked rows
arrived; Bonawitz et al.'s names). Each device u draws two X25519 key pairs (c_u to seal shares, s_u to agree
masks) and a 32-byte self-mask seed b_u, and Shamir-shares b_u and s_u's private key t-of-|U1| (pycryptodome's
GF(2^128) scheme on 16-byte halves), sealing share j for device j with AES-GCM under HKDF(X25519(c_u, c_j)).
Over Z_{2^32}, for each row r it sends (|H_r n U2| >= ``min_holders``, else the row is not sent at all)::

    y_{u,r} = Q(w_u * clip(d_{u,r})) || Q(w_u)  +  PRG(b_u, r)  +  sum_{v in H_r n U2, v != u} +-PRG(s_uv, r)

with Q stochastic fixed-point rounding (:func:`quantize`), d the row's delta against the global row the round
started from, w_u the device's weight of the row (:func:`row_weighting`: one per device for FedAvg and DP-FedAvg,
per row for HFedMoE) and s_uv = HKDF(X25519(s_u, s_v)), + when u < v, - otherwise. Summed over
a row's holders the pairwise masks cancel. To unmask, the coordinator picks S within U3 (:func:`unmaskable`:
no row may be left with fewer than ``min_holders`` holders in S) and asks the live devices for b-shares of S and
s-shares of U2 \\ S; it removes PRG(b_u, r) for u in S and, with the reconstructed s_v, the masks of S's members
with each v in U2 \\ S. A device never reveals both secrets of one peer, and refuses a request that would leave
a row with 1 <= holders < ``min_holders`` (the sum would be one device's row) or fewer than t survivors.

**Precision.** With n = |U1| the fixed point keeps |sum| < 2^31: value_scale = (2^31 - 1 - n) / (clip_range * n)
integers per unit (:func:`scales`); at n = 5 and clip_range 1, one step is 1.2e-9.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from device_runtime.bundle import HELD, TRAINED, Manifest, TensorRole
from device_runtime.errors import ProtocolError
from device_runtime.hfedmoe_weights import expert_weights, router_weight
from device_runtime.stats import RoutingStats
from device_runtime.wire.secure import (
    CIPHERTEXT_BYTES,
    Participant,
    RevealedShare,
    SealedShare,
    SecAggInbox,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
)

WORD = np.dtype("<u4")  # the ring Z_{2^32}, little-endian on the wire
SECRET_BYTES = 32  # b_u and an X25519 private key
SHARE_BYTES = 32  # a Shamir share of a 32-byte secret: two 16-byte GF(2^128) shares
_HALF = 16
_LIMIT = 2**31 - 1


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class Slot:
    """One row a device sends: tensor ``name``, its ``local`` index on the expert axis (0 unindexed), the global
    expert id ``row`` (0 unindexed), ``kind`` ``"trained"`` (expert / LoRA rows), ``"held"`` (router rows) or
    ``"shared"`` (a tensor not indexed by expert: one row), its MoE ``layer`` (-1 shared) and ``size``, the
    values of the row."""

    name: str
    local: int
    row: int
    kind: str
    layer: int
    size: int

    @property
    def key(self) -> tuple[str, int, int]:
        """What decides the holders: every tensor of a kind and layer has the same holders per row."""
        return (self.kind, self.layer, self.row)


def slots_of(manifest: Manifest, expert_ids: tuple[tuple[int, ...], ...]) -> tuple[Slot, ...]:
    """The rows a device with ``manifest`` training ``expert_ids`` sends, tensors in name order, rows in local
    order. A router's rows are the experts it scores (``Manifest.held_ids``: kind ``"held"``), every other indexed
    tensor's the experts trained (kind ``"trained"``), whatever bundle (pruned, resident, merged) the device has.

    Raises:
        ProtocolError("bad_tensor"): a trainable tensor's rows are not those (no bundle writes one).
    """
    held = manifest.held_ids(expert_ids)
    out: list[Slot] = []
    for spec in sorted((s for s in manifest.tensors if s.trainable), key=lambda s: s.name):
        size = math.prod(spec.shape)
        if not spec.indexed:
            out.append(Slot(spec.name, 0, 0, "shared", -1, size))
            continue
        router = spec.role is TensorRole.ROUTER
        rows = manifest.rows(spec, expert_ids)
        if tuple(rows) != tuple((held if router else expert_ids)[spec.moe_layer]) or not rows:
            raise ProtocolError("bad_tensor", f"trainable tensor {spec.name} holds rows {rows}")
        kind = HELD if router else TRAINED
        out.extend(Slot(spec.name, i, int(row), kind, spec.moe_layer, size // len(rows)) for i, row in enumerate(rows))
    return tuple(out)


def row_weighting(
    start: SecAggStart,
    num_examples: int,
    routing: Mapping[str, Any],
    expert_ids: Sequence[Sequence[int]],
    trained_experts: Sequence[Sequence[int]],
) -> Callable[[Slot], float]:
    """The weight in [0, 1] a device gives each of its rows (:class:`Slot`) under ``start.weighting``: 1 (``unit``);
    min(num_examples, max_weight) / max_weight (``examples``); HFedMoE's row weights (``hfedmoe``,
    ``device_runtime.hfedmoe_weights``: that example weight on shared rows and on the trained experts used above
    tau, 0 on other expert rows, the layer's gate alpha on router rows), from the device's own routing
    statistics (``routing``: its Update's, over the held experts, ``expert_ids`` first) and ``trained_experts``
    (global ids per MoE layer, those that got a gradient).

    Raises:
        ProtocolError("bad_routing_stats"): ``routing`` does not parse or has fewer layers than a row needs.
    """
    examples = 1.0 if start.weighting == "unit" else min(float(num_examples), start.max_weight) / start.max_weight
    importance = start.importance
    if importance is None:
        return lambda slot: examples
    layers = RoutingStats.from_dict(dict(routing)).layers
    if not len(layers) == len(importance.num_experts) == len(expert_ids) == len(trained_experts):
        raise ProtocolError("bad_routing_stats", f"routing statistics of {len(layers)} MoE layers for this model")
    alphas = [
        min(max(router_weight(stats, len(stats.usage), total, importance.lam), 0.0), 1.0)
        for stats, total in zip(layers, importance.num_experts)
    ]
    experts = [
        expert_weights(stats, ids, trained, examples, importance.tau)
        for stats, ids, trained in zip(layers, expert_ids, trained_experts)
    ]

    def weight(slot: Slot) -> float:
        if slot.kind == "shared":
            return examples
        return alphas[slot.layer] if slot.kind == HELD else float(experts[slot.layer][slot.local])

    return weight


def holds(participant: Participant, key: tuple[str, int, int]) -> bool:
    """Whether ``participant`` holds the row of ``key`` (:attr:`Slot.key`)."""
    kind, layer, row = key
    if kind == "shared":
        return True
    ids = participant.experts if kind == TRAINED else participant.held
    return 0 <= layer < len(ids) and row in ids[layer]


def holders(roster: Sequence[Participant], key: tuple[str, int, int], among: Iterable[str]) -> set[str]:
    """The devices of ``among`` that hold the row of ``key``."""
    ids = set(among)
    return {p.device_id for p in roster if p.device_id in ids and holds(p, key)}


def sent_slots(
    slots: Sequence[Slot], roster: Sequence[Participant], u2: Iterable[str], min_holders: int
) -> tuple[Slot, ...]:
    """The slots sent: those whose row has at least ``min_holders`` holders in U2."""
    u2 = set(u2)
    return tuple(s for s in slots if len(holders(roster, s.key, u2)) >= min_holders)


def row_keys(roster: Sequence[Participant]) -> set[tuple[str, int, int]]:
    """Every row key some participant holds (and the one shared row)."""
    keys: set[tuple[str, int, int]] = {("shared", -1, 0)}
    for p in roster:
        for kind, per_layer in ((TRAINED, p.experts), (HELD, p.held)):
            keys |= {(kind, layer, int(row)) for layer, ids in enumerate(per_layer) for row in ids}
    return keys


def unmaskable(roster: Sequence[Participant], u2: Iterable[str], u3: Iterable[str], min_holders: int) -> set[str]:
    """S: the largest set the rule below keeps of U3 (whose masked rows are unmasked and summed).

    A device of S holding a sent row (>= ``min_holders`` holders in U2) that has fewer than ``min_holders``
    holders in S would let that row's sum be one or a few devices' rows: such devices are dropped from S, and
    again, until no row is left between 1 and ``min_holders`` - 1 holders (each pass removes at least one).
    """
    u2, survivors = set(u2), set(u3) & set(u2)
    sets = [h for key in row_keys(roster) if len(h := holders(roster, key, u2)) >= min_holders]
    while True:
        thin = [h & survivors for h in sets if 0 < len(h & survivors) < min_holders]
        if not thin:
            return survivors
        survivors -= set().union(*thin)


# ---------------------------------------------------------------- quantisation


def scales(clip_range: float, n: int) -> tuple[float, float]:
    """(value_scale, weight_scale): integers per unit of a weighted delta coordinate (at most ``clip_range``)
    and of a weight (at most 1), so that the sums of ``n`` devices' stochastically rounded values stay in
    (-2^31, 2^31)."""
    room = _LIMIT - n
    return math.floor(room / (clip_range * n)), math.floor(room / n)


def quantize(values: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``values * scale`` stochastically rounded (unbiased) as elements of Z_{2^32} (``uint32``)."""
    y = np.asarray(values, np.float64) * scale
    low = np.floor(y)
    q = low + (rng.random(y.shape) < (y - low))
    return (q.astype(np.int64) & 0xFFFFFFFF).astype(WORD)


def dequantize(words: np.ndarray, scale: float) -> np.ndarray:
    """Sums in Z_{2^32} back to float64: read as signed 32-bit integers, divided by ``scale``."""
    return np.asarray(words, WORD).view("<i4").astype(np.float64) / scale


# ---------------------------------------------------------------- keys, masks, shares


def prg(secret: bytes, round_id: int, slot: Slot) -> np.ndarray:
    """``slot.size + 1`` pseudo-random elements of Z_{2^32}: AES-256-CTR keyed by SHA-256(secret, round, tensor,
    row), counter from 0 (one key per row and round: no two masks share a keystream)."""
    label = f"fedmoe-secagg/{round_id}/{slot.name}/{slot.row}".encode()
    key = hashlib.sha256(secret + b"\0" + label).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4 * (slot.size + 1)))
    return np.frombuffer(stream, WORD)


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: str, round_id: int) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 of the X25519 shared secret, bound to ``purpose`` and the
    round. Raises ProtocolError("bad_header"): ``peer_public`` is not a usable X25519 key."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise ProtocolError("bad_header", f"unusable X25519 key: {exc}") from exc
    info = f"fedmoe-secagg-{purpose}/{round_id}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def pair_sign(device: str, peer: str) -> int:
    """+1 if ``device`` adds the pair's mask (it sorts first), -1 if it subtracts it."""
    return 1 if device < peer else -1


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir t-of-n shares of a 32-byte ``secret``: share i (0-based) is for index i + 1, 32 bytes (a share of
    each 16-byte half, pycryptodome ``Crypto.Protocol.SecretSharing.Shamir`` over GF(2^128))."""
    from Crypto.Protocol.SecretSharing import Shamir

    halves = [Shamir.split(threshold, count, secret[i : i + _HALF]) for i in (0, _HALF)]
    return [a[1] + b[1] for a, b in zip(*halves)]


def combine_secret(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The 32-byte secret from at least ``threshold`` shares ``index -> share`` (indices 1-based).

    Raises:
        ProtocolError("unexpected"): fewer than ``threshold`` shares.
    """
    from Crypto.Protocol.SecretSharing import Shamir

    if len(shares) < threshold:
        raise ProtocolError("unexpected", f"{len(shares)} shares, {threshold} needed to reconstruct")
    chosen = sorted(shares.items())[:threshold]
    halves = [Shamir.combine([(i, s[h : h + _HALF]) for i, s in chosen]) for h in (0, _HALF)]
    return bytes(halves[0] + halves[1])


def mask_public(private_bytes: bytes) -> bytes:
    """The X25519 public key of a raw private key (to check a reconstructed one against the roster)."""
    return X25519PrivateKey.from_private_bytes(private_bytes).public_key().public_bytes_raw()


def _seal_data(round_id: int, sender: str, recipient: str) -> bytes:
    return f"fedmoe-secagg-share/{round_id}/{sender}/{recipient}".encode()


# ---------------------------------------------------------------- a device's part


class DeviceSecAgg:
    """One device's secure-aggregation state for one assignment (the secrets stay in memory only: a device that
    restarts mid-round is a dropout). Every method checks the message against what this device knows and is
    idempotent for a message re-sent after a reconnect.

    Raises (every method): ProtocolError naming what is inconsistent.
    """

    def __init__(self, start: SecAggStart, device_id: str):
        self.start, self.device_id = start, device_id
        self._cipher, self._mask = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._seed = os.urandom(SECRET_BYTES)
        self._roster: SecAggRoster | None = None
        self._shares: SecAggShares | None = None
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (its b share, its s share) at my index
        self._u2: frozenset[str] | None = None
        self._revealed: dict[str, str] = {}  # owner -> "self" | "mask"

    def _check(self, round_id: int, update_id: str) -> None:
        if (round_id, update_id) != (self.start.round_id, self.start.update_id):
            raise ProtocolError("unexpected", f"secure message of {update_id}, this state is {self.start.update_id}")

    def keys(self) -> SecAggKeys:
        """The public keys to advertise."""
        return SecAggKeys(
            round_id=self.start.round_id,
            update_id=self.start.update_id,
            cipher_key=self._cipher.public_key().public_bytes_raw(),
            mask_key=self._mask.public_key().public_bytes_raw(),
        )

    @property
    def ready(self) -> bool:
        """Whether the inbox arrived (masking needs U2)."""
        return self._u2 is not None

    def on_roster(self, roster: SecAggRoster) -> SecAggShares:
        """Share b_u and s_u among the roster; returns the sealed shares to send."""
        self._check(roster.round_id, roster.update_id)
        if self._roster is not None and self._shares is not None:
            if roster != self._roster:
                raise ProtocolError("unexpected", "a second, different roster for this round")
            return self._shares
        ids = [p.device_id for p in roster.participants]
        keys = self.keys()
        me = next((p for p in roster.participants if p.device_id == self.device_id), None)
        if me is None or (me.cipher_key, me.mask_key) != (keys.cipher_key, keys.mask_key):
            raise ProtocolError("unexpected", "the roster does not list this device with its keys")
        n, t = len(ids), roster.threshold
        seeds = split_secret(self._seed, t, n)
        masks = split_secret(self._mask.private_bytes_raw(), t, n)
        sealed = []
        for index, peer in enumerate(roster.participants):
            if peer.device_id == self.device_id:
                self._held[self.device_id] = (seeds[index], masks[index])
                continue
            key = agree(self._cipher, peer.cipher_key, "seal", roster.round_id)
            nonce = os.urandom(12)
            data = _seal_data(roster.round_id, self.device_id, peer.device_id)
            sealed.append(
                SealedShare(peer.device_id, nonce + AESGCM(key).encrypt(nonce, seeds[index] + masks[index], data))
            )
        self._roster = roster
        self._shares = SecAggShares(round_id=roster.round_id, update_id=roster.update_id, shares=tuple(sealed))
        return self._shares

    def on_inbox(self, inbox: SecAggInbox) -> None:
        """Open the shares sealed for this device; their senders and it are U2."""
        self._check(inbox.round_id, inbox.update_id)
        roster = self._require_roster()
        by_id = {p.device_id: p for p in roster.participants}
        opened: dict[str, tuple[bytes, bytes]] = {}
        for sealed in inbox.shares:
            peer = by_id.get(sealed.peer)
            if peer is None or sealed.peer == self.device_id or len(sealed.ciphertext) != CIPHERTEXT_BYTES:
                raise ProtocolError("unexpected", f"inbox share from {sealed.peer}, not a peer of the roster")
            key = agree(self._cipher, peer.cipher_key, "seal", roster.round_id)
            data = _seal_data(roster.round_id, sealed.peer, self.device_id)
            try:
                plain = AESGCM(key).decrypt(sealed.ciphertext[:12], sealed.ciphertext[12:], data)
            except Exception as exc:  # cryptography's InvalidTag: tampered or sealed for another device
                raise ProtocolError("bad_payload", f"the share of {sealed.peer} does not open") from exc
            opened[sealed.peer] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
        u2 = frozenset(opened) | {self.device_id}
        if self._u2 is not None and u2 != self._u2:
            raise ProtocolError("unexpected", "a second, different inbox for this round")
        self._held.update(opened)
        self._u2 = u2

    def mask(
        self,
        slots: Sequence[Slot],
        base: Mapping[str, np.ndarray],
        trained: Mapping[str, np.ndarray],
        weight_of: Callable[[Slot], float],
    ) -> bytes:
        """The SecAggMasked payload: for each sent slot (:func:`sent_slots`) its quantised, weighted, clipped
        delta then its quantised weight, each row masked; little-endian uint32 words.

        Args:
            slots: :func:`slots_of` this device's manifest and assignment. base: the assignment's trainable
                tensors (the global rows). trained: the same tensors after training. weight_of: each row's weight in
                [0, 1] (:func:`row_weighting`).
        """
        roster, u2 = self._require_roster(), self._u2
        if u2 is None:
            raise ProtocolError("unexpected", "masking before the inbox arrived")
        start, n = self.start, len(roster.participants)
        sent = sent_slots(slots, roster.participants, u2, start.min_holders)

        def delta(slot: Slot) -> np.ndarray:  # one row at a time: temporaries stay the size of one row
            row: np.ndarray = _row(trained[slot.name], slot) - _row(base[slot.name], slot)
            return row

        factor = 1.0
        if start.clip > 0:
            norm = math.sqrt(sum(float(np.vdot(d, d)) for d in map(delta, sent)))
            factor = 1.0 if norm <= start.clip else start.clip / norm
        value_scale, weight_scale = scales(start.clip_range, n)
        rng = np.random.default_rng()
        keys = {p.device_id: p.mask_key for p in roster.participants}
        pair_keys: dict[str, bytes] = {}  # s_uv per peer, agreed once
        out, offset = np.empty(sum(s.size + 1 for s in sent), WORD), 0  # the payload, filled row by row
        for slot in sent:
            weight = weight_of(slot)
            values = np.clip(delta(slot) * (weight * factor), -start.clip_range, start.clip_range)
            words = np.concatenate(
                [quantize(values, value_scale, rng), quantize(np.array([weight]), weight_scale, rng)]
            )
            words += prg(self._seed, start.round_id, slot)
            for peer in sorted(holders(roster.participants, slot.key, u2) - {self.device_id}):
                if peer not in pair_keys:
                    pair_keys[peer] = agree(self._mask, keys[peer], "mask", start.round_id)
                pair = prg(pair_keys[peer], start.round_id, slot)
                words = words + pair if pair_sign(self.device_id, peer) > 0 else words - pair
            out[offset : offset + slot.size + 1] = words
            offset += slot.size + 1
        return out.tobytes()

    def on_unmask(self, request: SecAggUnmask) -> SecAggReveal:
        """The shares ``request`` asks for, after checking it: survivors and dropped partition U2, at least t
        survivors, no row left with 1 <= holders < ``min_holders`` among them (:func:`unmaskable` keeps them all),
        and no peer ever gets both its secrets revealed."""
        self._check(request.round_id, request.update_id)
        roster, u2 = self._require_roster(), self._u2
        if u2 is None:
            raise ProtocolError("unexpected", "unmask request before the inbox")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors | dropped != u2 or survivors & dropped:
            raise ProtocolError("unexpected", "survivors and dropped must partition the devices that sent shares")
        if len(survivors) < roster.threshold:
            raise ProtocolError("unexpected", f"{len(survivors)} survivors, fewer than t = {roster.threshold}")
        if unmaskable(roster.participants, u2, survivors, self.start.min_holders) != survivors:
            raise ProtocolError("unexpected", "unmasking these survivors would expose a row held by too few")
        wanted: dict[str, Literal["self", "mask"]] = {**{o: "self" for o in survivors}, **{o: "mask" for o in dropped}}
        if any(self._revealed.get(o, kind) != kind for o, kind in wanted.items()):
            raise ProtocolError("unexpected", "refusing to reveal both secrets of a device")
        self._revealed.update(wanted)
        shares = tuple(
            RevealedShare(owner, kind, self._held[owner][0 if kind == "self" else 1])
            for owner, kind in sorted(wanted.items())
        )
        return SecAggReveal(round_id=request.round_id, update_id=request.update_id, shares=shares)

    def _require_roster(self) -> SecAggRoster:
        if self._roster is None:
            raise ProtocolError("unexpected", "secure message before the roster")
        return self._roster


def _row(tensor: np.ndarray, slot: Slot) -> np.ndarray:
    """The slot's row of a pruned tensor (expert axis 0), flat, float64."""
    array = np.asarray(tensor, np.float64)
    return (array if slot.kind == "shared" else array[slot.local]).reshape(-1)
