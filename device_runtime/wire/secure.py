"""The secure-aggregation messages (SecAgg / SecAgg+ over sparse expert rows, ``device_runtime.secagg``).

A round with ``[privacy] secure_aggregation`` runs these beside its Assignment (coordinator -> device messages
are signed like the Assignment; every field is bounded here and checked again by the side that reads it)::

    coordinator -> SecAggStart (before the Assignment)      device -> SecAggKeys(cipher_key, mask_key)
    coordinator -> SecAggRoster(participants, threshold)    device -> SecAggShares(one ciphertext per peer)
    coordinator -> SecAggInbox(the ciphertexts for it)      device -> SecAggMasked(its masked rows, payload)
    coordinator -> SecAggUnmask(survivors, dropped)         device -> SecAggReveal(shares of their secrets)

The coordinator answers SecAggMasked with an ``Ack``, like an Update.
"""

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import msgspec

from device_runtime.errors import ProtocolError
from device_runtime.wire.fields import (
    MAX_SECURE_PEERS,
    Bytes32,
    Count,
    ExpertIds,
    Id,
    JsonDict,
    Metrics,
    NonNegative,
    Probability,
    payload_field,
)
from device_runtime.wire.messages import EvalResult, Message, _message

CIPHERTEXT_BYTES = 12 + 64 + 16  # AES-GCM nonce + two 32-byte Shamir shares + tag (device_runtime.secagg)
Ciphertext = Annotated[bytes, msgspec.Meta(min_length=CIPHERTEXT_BYTES, max_length=CIPHERTEXT_BYTES)]
PeerIds = Annotated[tuple[Id, ...], msgspec.Meta(max_length=MAX_SECURE_PEERS)]


def _distinct(ids: tuple[str, ...], what: str) -> None:
    if len(set(ids)) != len(ids):
        raise ProtocolError("bad_header", f"{what} names a device twice")


@dataclass(frozen=True)
class ImportanceWeighting:
    """HFedMoE's row weights, computed by the device under secure aggregation (``device_runtime.hfedmoe_weights``):
    usage threshold ``tau``, importance mix ``lam`` and the global experts of each MoE layer (``num_experts``)."""

    tau: Probability
    lam: Probability
    num_experts: Annotated[tuple[Annotated[int, msgspec.Meta(ge=1, le=4096)], ...], msgspec.Meta(max_length=4096)]


@_message
class SecAggStart(Message):
    """Coordinator -> device, before the round's Assignment: this round aggregates securely.

    Attributes:
        round_id, update_id: those of the Assignment that follows.
        weighting: ``"examples"`` (FedAvg: the device weighs its rows by min(num_examples, max_weight) /
            max_weight), ``"unit"`` (DP-FedAvg: weight 1) or ``"hfedmoe"`` (HFedMoE: per row, by ``importance``).
        max_weight: examples that weigh 1 (> 0). clip: L2 clip S of the device's whole delta (0: none; DP).
        clip_range: each weighted delta coordinate is clipped to [-clip_range, clip_range] before quantisation.
        min_holders: a row is aggregated only over at least this many holders (>= 2).
        importance: HFedMoE's parameters, with weighting ``"hfedmoe"`` only.
    """

    TYPE: ClassVar[str] = "secagg_start"
    SIGNED: ClassVar[bool] = True
    round_id: Count
    update_id: Id
    weighting: Literal["examples", "unit", "hfedmoe"]
    max_weight: Annotated[float, msgspec.Meta(gt=0.0, le=1e12)]
    clip: NonNegative
    clip_range: Annotated[float, msgspec.Meta(gt=0.0, le=1e6)]
    min_holders: Annotated[int, msgspec.Meta(ge=2, le=MAX_SECURE_PEERS)]
    importance: ImportanceWeighting | None = None

    def __post_init__(self) -> None:
        if (self.weighting == "hfedmoe") != (self.importance is not None):
            raise ProtocolError("bad_header", "secagg_start: importance goes with weighting hfedmoe, and only there")


@_message
class SecAggKeys(Message):
    """Device -> coordinator: its two fresh X25519 public keys of the round (raw 32 bytes): ``cipher_key`` to
    encrypt the shares sent to it, ``mask_key`` to agree its pairwise masks."""

    TYPE: ClassVar[str] = "secagg_keys"
    round_id: Count
    update_id: Id
    cipher_key: Bytes32
    mask_key: Bytes32


@dataclass(frozen=True)
class Participant:
    """A device of the roster: its public keys and the rows it holds (``experts``: per MoE layer the global ids of
    its expert/LoRA rows; ``held``: those of its router rows)."""

    device_id: Id
    cipher_key: Bytes32
    mask_key: Bytes32
    experts: ExpertIds
    held: ExpertIds


@_message
class SecAggRoster(Message):
    """Coordinator -> device: every device that advertised keys (sorted by device id: the 1-based position is its
    Shamir share index) and the share threshold t (2 <= t <= participants).

    Raises:
        ProtocolError("bad_header"): unsorted or repeated devices, or t out of range.
    """

    TYPE: ClassVar[str] = "secagg_roster"
    SIGNED: ClassVar[bool] = True
    round_id: Count
    update_id: Id
    threshold: Count
    participants: Annotated[tuple[Participant, ...], msgspec.Meta(max_length=MAX_SECURE_PEERS)]

    def __post_init__(self) -> None:
        ids = tuple(p.device_id for p in self.participants)
        _distinct(ids, "the roster")
        if list(ids) != sorted(ids) or not 2 <= self.threshold <= len(ids):
            raise ProtocolError(
                "bad_header", f"roster of {len(ids)} needs sorted ids and 2 <= t <= n, t={self.threshold}"
            )


@dataclass(frozen=True)
class SealedShare:
    """One device's shares for another, AES-GCM sealed for the recipient: ``peer`` is the recipient in a
    SecAggShares, the sender in a SecAggInbox."""

    peer: Id
    ciphertext: Ciphertext


@_message
class SecAggShares(Message):
    """Device -> coordinator: its sealed shares, one per other roster participant."""

    TYPE: ClassVar[str] = "secagg_shares"
    round_id: Count
    update_id: Id
    shares: Annotated[tuple[SealedShare, ...], msgspec.Meta(max_length=MAX_SECURE_PEERS)]

    def __post_init__(self) -> None:
        _distinct(tuple(s.peer for s in self.shares), "secagg_shares")


@_message
class SecAggInbox(Message):
    """Coordinator -> device: the shares sealed for it by every other device that sent shares (these devices and
    the receiver are the round's U2: masks are agreed among them only)."""

    TYPE: ClassVar[str] = "secagg_inbox"
    SIGNED: ClassVar[bool] = True
    round_id: Count
    update_id: Id
    shares: Annotated[tuple[SealedShare, ...], msgspec.Meta(max_length=MAX_SECURE_PEERS)]

    def __post_init__(self) -> None:
        _distinct(tuple(s.peer for s in self.shares), "secagg_inbox")


@_message
class SecAggMasked(Message):
    """Device -> coordinator: the result of local training, masked (``device_runtime.secagg``). The payload is
    little-endian uint32 words: its sent rows' quantised weighted deltas, then one quantised weight per row.
    Routing statistics, trained experts, metrics and the evaluation are in clear, as in an Update."""

    TYPE: ClassVar[str] = "secagg_masked"
    PAYLOAD: ClassVar[str] = "bytes"
    round_id: Count
    update_id: Id
    metrics: Metrics
    routing: JsonDict
    trained_experts: ExpertIds
    evaluation: EvalResult | None = None
    data: bytes = payload_field(default=b"")


@_message
class SecAggUnmask(Message):
    """Coordinator -> device: reveal the self-mask shares of ``survivors`` and the mask-key shares of ``dropped``
    (together: every device of U2)."""

    TYPE: ClassVar[str] = "secagg_unmask"
    SIGNED: ClassVar[bool] = True
    round_id: Count
    update_id: Id
    survivors: PeerIds
    dropped: PeerIds

    def __post_init__(self) -> None:
        _distinct(self.survivors + self.dropped, "secagg_unmask")


@dataclass(frozen=True)
class RevealedShare:
    """The revealer's Shamir share of ``owner``'s self-mask seed (``kind`` "self") or mask key ("mask")."""

    owner: Id
    kind: Literal["self", "mask"]
    share: Bytes32


@_message
class SecAggReveal(Message):
    """Device -> coordinator: the shares a SecAggUnmask asked for."""

    TYPE: ClassVar[str] = "secagg_reveal"
    round_id: Count
    update_id: Id
    shares: Annotated[tuple[RevealedShare, ...], msgspec.Meta(max_length=MAX_SECURE_PEERS)]

    def __post_init__(self) -> None:
        _distinct(tuple(s.owner for s in self.shares), "secagg_reveal")


SECURE_TO_DEVICE = (SecAggStart, SecAggRoster, SecAggInbox, SecAggUnmask)
SECURE_FROM_DEVICE = (SecAggKeys, SecAggShares, SecAggMasked, SecAggReveal)
