"""The protocol's messages: frozen dataclasses whose annotated field types (``wire.fields``) are their schema.

A message's ``TYPE`` is its wire name. ``PAYLOAD`` says what follows the JSON header: None, ``"tensors"``
(field ``tensors``: name -> array, a safetensors blob) or ``"bytes"`` (field ``data``, raw bytes).
"""

from dataclasses import Field, dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, TypeVar, dataclass_transform

import msgspec
import numpy as np

from device_runtime.errors import ProtocolError
from device_runtime.shape_key import ShapeKey
from device_runtime.wire.fields import (
    MAX_HIDDEN,
    MAX_LABELS,
    MAX_PERTURBATIONS,
    MAX_SPLIT_HISTORY,
    MAX_ZO_SEEDS,
    BatchSize,
    Bytes32,
    Bytes64,
    Count,
    EvalExamples,
    EvalLoss,
    ExpertIds,
    Finite,
    Fraction,
    Id,
    JsonDict,
    LocalSteps,
    LongText,
    Metrics,
    NonNegative,
    NumExamples,
    NumTokens,
    Probabilities,
    Probability,
    Profile,
    RelPath,
    Seed32,
    SeqLen,
    Sha256,
    ShortText,
    VersionNumber,
    WireDtype,
    ZoSeedCount,
    payload_field,
    printable,
    validate,
)


@dataclass(frozen=True)
class SplitConfig:
    """Split mode (HO-SFL, Chen et al., arXiv 2603.14773): how a split device trains its bottom with the coordinator.

    Attributes:
        cut_layer: K, the first decoder layer the coordinator runs (the bundle's ``ShapeKey.cut_layer``).
        perturbations: P, perturbed forwards per step (the paper: 2 for language).
        mu: the perturbation scale of the scalar estimate (the paper: 1e-3).
        keep_ratio: ACP-SL's uplink budget, the share of hidden channels of the smashed data sent per step
            (``device_runtime.acp``); 1 = send every channel.
        learning_rate: the bottom's SGD step size (``bench/bench_split.py``: 1e-5 adds nothing measurable with one
            device, 1e-4 costs points; the top trains with ``FitConfig.learning_rate``).
    """

    cut_layer: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    perturbations: Annotated[int, msgspec.Meta(ge=1, le=MAX_PERTURBATIONS)] = 2
    mu: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1e-3
    keep_ratio: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    learning_rate: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1e-5


ZO_LEARNING_RATE = 1e-5
"""Zeroth-order devices' default SGD step size: the mixed fleet (docs/fleets/mixed.toml) reached 76% at round 5
with it, 16% when its MeZO steps ran at the preset's AdamW rate 5e-4 (its loss rose to 21: diverged)."""


@dataclass(frozen=True)
class FitConfig:
    """Local training settings: a round's (in its Assignment), a bundle's defaults (``Manifest.training``) and
    the coordinator's ``[fit]`` are all this one type.

    Attributes:
        batch_size: sequences per step. seq_len: tokens per sequence.
        learning_rate: AdamW learning rate. local_steps: optimizer steps (0: one epoch of local data).
        aux_loss_coef: load-balancing loss coefficient.
        prox_mu: FedProx proximal coefficient mu (Li et al. 2020, loss + mu/2 * ||w - w_global||^2); 0 = off.
        routing_prior: FedAlign-MoE global routing distribution p_global, per MoE layer a probability
            over all ``num_experts`` global experts, or None.
        routing_reg_coef: lambda_r of FedAlign-MoE's KL(p_local || p_global) regulariser; 0 = off.
        seed: local shuffling / dropout seed.
        update_dtype: ``"float32"`` or ``"float16"``: the dtype the device sends its update in.
        zo_learning_rate: SGD step size of zeroth-order devices (MeZO); default :data:`ZO_LEARNING_RATE`; 0 =
            ``learning_rate`` (an AdamW rate: MeZO's SGD diverges at 5e-4).
        zo_seeds: K, FedKSeed's candidate seeds per round (``zo_directions.candidate_seeds(seed, round, K)``);
            a zeroth-order device then uploads a :class:`ZoUpdate` instead of tensors. 0 = dense tensors.
        labels: the federation's candidate labels (classification records' ``label`` values), or None.
        logit_adjustment: tau of the balanced-softmax shift ``tau * log pi`` of each label's first answer token by
            the device's own label prior pi (``device_runtime.answer_prior``); 0 = off; needs ``labels``.
        eval_fraction: share of the device's local records held out of training, in [0, 1)
            (``device_runtime.data.split_train_eval`` with the fixed ``EVAL_SPLIT_SEED``, so the same records every
            round); the device scores the model it received on them before training and reports an
            :class:`EvalResult` in its Update (federated evaluation). 0 = no held-out split, no evaluation.
        split: split mode's settings (:class:`SplitConfig`) for a split device's assignment, else None.
    """

    batch_size: BatchSize = 8
    seq_len: SeqLen = 128
    learning_rate: NonNegative = 1e-4
    local_steps: LocalSteps = 0
    aux_loss_coef: NonNegative = 0.01
    prox_mu: NonNegative = 0.0
    routing_prior: Probabilities | None = None
    routing_reg_coef: NonNegative = 0.0
    seed: Seed32 = 0
    update_dtype: WireDtype = "float32"
    zo_learning_rate: NonNegative = ZO_LEARNING_RATE
    zo_seeds: ZoSeedCount = 0
    labels: Annotated[tuple[ShortText, ...], msgspec.Meta(max_length=MAX_LABELS)] | None = None
    logit_adjustment: NonNegative = 0.0
    eval_fraction: Fraction = 0.0
    split: SplitConfig | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FitConfig":
        """Raises ValueError naming the first unknown, missing or invalid field."""
        return validate(cls, data)


_REGISTRY: dict[str, "type[Message]"] = {}
_M = TypeVar("_M", bound="type[Message]")


@dataclass_transform(frozen_default=True)
def _message(cls: _M) -> _M:
    """Class decorator: a frozen dataclass registered under its ``TYPE`` name."""
    dataclass(frozen=True)(cls)  # makes ``cls`` itself a dataclass (no slots: the same class object)
    _REGISTRY[cls.TYPE] = cls
    return cls


class Message:
    """Base of every protocol message. ``TYPE`` is its wire name; ``PAYLOAD`` is None, ``"tensors"``
    (field ``tensors``: name -> array) or ``"bytes"`` (field ``data``). ``SIGNED``: its header may carry the
    coordinator's ``signature`` (``device_runtime.signing``)."""

    TYPE: ClassVar[str] = ""
    PAYLOAD: ClassVar[str | None] = None
    SIGNED: ClassVar[bool] = False
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # every message is a dataclass (``_message``)


@_message
class Enroll(Message):
    """Device -> coordinator, once: redeem a single-use enrollment token, register the device's Ed25519
    public key (raw 32 bytes; the private key never leaves the device, see ``device_runtime.auth``)."""

    TYPE: ClassVar[str] = "enroll"
    token: ShortText
    name: Id
    profile: Profile
    public_key: Bytes32


@_message
class EnrollOk(Message):
    """Coordinator -> device: the id under which the device is now registered."""

    TYPE: ClassVar[str] = "enroll_ok"
    device_id: Id


@_message
class Hello(Message):
    """Device -> coordinator: first message of every authenticated connection."""

    TYPE: ClassVar[str] = "hello"
    device_id: Id
    protocol_version: VersionNumber
    profile: Profile


@_message
class Challenge(Message):
    """Coordinator -> device: a fresh single-use 32-byte nonce to sign."""

    TYPE: ClassVar[str] = "challenge"
    nonce: Bytes32


@_message
class Auth(Message):
    """Device -> coordinator: Ed25519 signature (64 bytes) of ``auth.challenge_message(nonce, device_id)``."""

    TYPE: ClassVar[str] = "auth"
    device_id: Id
    signature: Bytes64


@_message
class AuthOk(Message):
    """Coordinator -> device: authenticated; the device now waits for work."""

    TYPE: ClassVar[str] = "auth_ok"


@_message
class Assignment(Message):
    """Coordinator -> device: train this expert subset for one round.

    Attributes:
        round_id: the round. update_id: id the device must put on its ``Update`` (retries reuse it;
            the coordinator records each update_id once). model_version: global model version of the weights.
        shape_key: the graph to train (fetch with ``BundleRequest(shape_key.id)`` if not cached).
        expert_ids: per MoE layer, local expert index -> global expert id.
        config: local training settings.
        tensors: the weights of the kept experts and router rows, name -> array (bundle tensor names).

    Signed by the coordinator for the receiving device (``SIGNED``: header ``signature``, covering every field
    and the payload's sha256, see ``device_runtime.signing``).

    Raises:
        ProtocolError("bad_header"): ``expert_ids`` does not hold ``shape_key.experts_per_layer`` ids per layer.
    """

    TYPE: ClassVar[str] = "assignment"
    PAYLOAD: ClassVar[str] = "tensors"
    SIGNED: ClassVar[bool] = True
    round_id: Count
    update_id: Id
    model_version: Count
    shape_key: ShapeKey
    expert_ids: ExpertIds
    config: FitConfig
    tensors: dict[str, np.ndarray] = payload_field(default_factory=dict)

    def __post_init__(self) -> None:
        counts = tuple(len(ids) for ids in self.expert_ids)
        if counts != self.shape_key.experts_per_layer:
            raise ProtocolError("bad_header", f"expert_ids {counts} disagree with shape key {self.shape_key.id}")


@_message
class BundleRequest(Message):
    """Device -> coordinator: send the graph files of this ``ShapeKey.id``."""

    TYPE: ClassVar[str] = "bundle_request"
    shape_key_id: Id


@_message
class BundleData(Message):
    """Coordinator -> device: one chunk of one bundle file (see ``wire.transfer``).

    Attributes:
        shape_key_id: the bundle's shape key. name: relative file path inside the bundle.
        offset: byte offset of this chunk in the file. total_size: file size (bytes).
        sha256: hex sha256 of the whole file. more: False on the bundle's very last chunk.
        data: the chunk (payload).
    """

    TYPE: ClassVar[str] = "bundle_data"
    PAYLOAD: ClassVar[str] = "bytes"
    shape_key_id: Id
    name: RelPath
    offset: Count
    total_size: Count
    sha256: Sha256
    more: bool
    data: bytes = payload_field(default=b"")


@dataclass(frozen=True)
class ZoUpdate:
    """A zeroth-order update as seeds and scalars (FedKSeed, Qin et al., ICML 2024): the trained tensors are
    ``theta_0 + sum_j scalars[j] * z(seeds[j])``, ``theta_0`` the assignment's trainable tensors and ``z`` the
    seeded direction over them in manifest order (``device_runtime.zo_directions``); the coordinator expands it.

    Attributes:
        seeds: distinct seeds among the round's candidates, at most ``MAX_ZO_SEEDS``.
        scalars: one finite coefficient per seed (``-lr * sum of projected gradients`` of its steps).
        distribution: of ``z``: ``"rademacher"`` or ``"gaussian"``.

    Raises:
        ProtocolError("bad_header"): no seed, repeated seeds, or a different number of seeds and scalars.
    """

    seeds: Annotated[tuple[Count, ...], msgspec.Meta(max_length=MAX_ZO_SEEDS)]
    scalars: Annotated[tuple[Finite, ...], msgspec.Meta(max_length=MAX_ZO_SEEDS)]
    distribution: Literal["rademacher", "gaussian"] = "rademacher"

    def __post_init__(self) -> None:
        if not self.seeds or len(self.seeds) != len(self.scalars) or len(set(self.seeds)) != len(self.seeds):
            raise ProtocolError(
                "bad_header",
                f"zo update needs as many distinct seeds as scalars, got "
                f"{len(self.seeds)} seeds ({len(set(self.seeds))} distinct), "
                f"{len(self.scalars)} scalars",
            )


@dataclass(frozen=True)
class EvalResult:
    """A device's score of the global model it received in the Assignment, on its held-out split (``FitConfig.
    eval_fraction``), computed BEFORE local training (federated evaluation piggybacked on fit: no second download).

    The model scored is the global model as the device's bundle holds it: a pruned bundle (``frozen_dtype`` None)
    routes over its kept experts only, a resident one over every expert (the untrained ones in float16); the
    coordinator tags the result with the assignment's shape key.

    Attributes:
        loss: mean cross-entropy of the completion tokens (the label word and what follows it,
            ``device_runtime.data.format_example``), nats per token, without the training-time answer shift;
            finite, in ``[0, MAX_EVAL_LOSS]``.
        num_examples: held-out sequences scored (>= 1; weights the federation's average).
        num_tokens: their non-padding tokens.
        accuracy: label accuracy in [0, 1] where the device can compute it, else None (today's device graphs
            output only scalar losses, so devices send None).
    """

    loss: EvalLoss
    num_examples: EvalExamples
    num_tokens: NumTokens
    accuracy: Probability | None = None


@_message
class Update(Message):
    """Device -> coordinator: the result of local training.

    Attributes:
        update_id: from the assignment (idempotency key). round_id: the round.
        num_examples: training sequences seen (at most ``MAX_NUM_EXAMPLES``; it weights the aggregate).
        num_tokens: training tokens seen (at most ``MAX_NUM_TOKENS``).
        metrics: name -> number (e.g. ``loss``, ``train_seconds``, ``peak_rss_mb``).
        routing: routing statistics, e.g. ``{"usage": [[...]], "importance": [[...]]}`` per MoE layer over
            the local experts (HFedMoE u_c(e) and s_c(e)).
        trained_experts: per MoE layer, the global ids of experts whose weights were actually updated.
        tensors: the trained tensors, name -> array (float16 if the config asked for it); empty with ``zo``.
        zo: the trained tensors as seeds and scalars instead (:class:`ZoUpdate`), or None.
        evaluation: the device's score of the assignment's model on its held-out split before training
            (:class:`EvalResult`), or None (``eval_fraction`` 0, or too few local records to hold one out).
    """

    TYPE: ClassVar[str] = "update"
    PAYLOAD: ClassVar[str] = "tensors"
    update_id: Id
    round_id: Count
    num_examples: NumExamples
    num_tokens: NumTokens
    metrics: Metrics
    routing: JsonDict
    trained_experts: ExpertIds
    zo: ZoUpdate | None = None
    evaluation: EvalResult | None = None
    tensors: dict[str, np.ndarray] = payload_field(default_factory=dict)


Scalars: TypeAlias = Annotated[tuple[Finite, ...], msgspec.Meta(min_length=1, max_length=MAX_PERTURBATIONS)]


@_message
class SmashedData(Message):
    """Split device -> coordinator, one HO-SFL step: the smashed data of one batch at the cut.

    Tensors: ``smashed`` ``(batch, seq_len, C)`` float16 (C = hidden, or ``len(channels)`` with ACP-SL pruning),
    ``attention_mask`` and ``labels`` ``(batch, seq_len)`` int32 (labels -100 where no target).

    Attributes:
        update_id: the split assignment. round_id: its round. step: the device's step index (0-based).
        channels: ACP-SL's kept hidden channels, ascending (``device_runtime.acp``), or None: all of them.
    """

    TYPE: ClassVar[str] = "smashed_data"
    PAYLOAD: ClassVar[str] = "tensors"
    update_id: Id
    round_id: Count
    step: Count
    channels: (
        Annotated[
            tuple[Annotated[int, msgspec.Meta(ge=0, lt=MAX_HIDDEN)], ...],
            msgspec.Meta(min_length=1, max_length=MAX_HIDDEN),
        ]
        | None
    ) = None
    tensors: dict[str, np.ndarray] = payload_field(default_factory=dict)


@_message
class CutGradient(Message):
    """Coordinator -> split device: lambda = dL/dz for the device's last SmashedData (tensor ``gradient``,
    ``(batch, seq_len, hidden)`` float16), and the top's loss on that batch (nats per target token)."""

    TYPE: ClassVar[str] = "cut_gradient"
    PAYLOAD: ClassVar[str] = "tensors"
    update_id: Id
    round_id: Count
    step: Count
    loss: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)]
    tensors: dict[str, np.ndarray] = payload_field(default_factory=dict)


@_message
class SplitScalars(Message):
    """Split device -> coordinator: the P projected scalars ``v_p`` of one step (``device_runtime.hosfl``)."""

    TYPE: ClassVar[str] = "split_scalars"
    update_id: Id
    round_id: Count
    step: Count
    scalars: Scalars


@_message
class SplitStep(Message):
    """Coordinator -> split device: the averaged scalars ``vbar`` of steps ``first_step`` .. ``first_step +
    len(scalars) - 1``, each to apply with that step's seeds (``hosfl.apply_step``). One step normally; a device
    that fell behind gets the history it missed (then it smashes its batch again at the current step)."""

    TYPE: ClassVar[str] = "split_step"
    update_id: Id
    round_id: Count
    first_step: Count
    scalars: Annotated[tuple[Scalars, ...], msgspec.Meta(min_length=1, max_length=MAX_SPLIT_HISTORY)]


@_message
class Ack(Message):
    """Coordinator -> device: the update was recorded (accepted or rejected with a reason).

    ``reason`` is made :func:`~device_runtime.wire.fields.printable` on construction: the device logs it.
    """

    TYPE: ClassVar[str] = "ack"
    update_id: Id
    accepted: bool
    reason: LongText = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", printable(self.reason))


@_message
class Heartbeat(Message):
    """Either direction: keep-alive, no fields."""

    TYPE: ClassVar[str] = "heartbeat"


@_message
class Error(Message):
    """Either direction: the peer rejected something; ``code`` is one of ``ERROR_CODES``.

    ``message`` is made :func:`~device_runtime.wire.fields.printable` on construction, so it is safe to log.
    """

    TYPE: ClassVar[str] = "error"
    code: Id
    message: LongText

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", printable(self.message))


MESSAGE_TYPES: dict[str, type[Message]] = _REGISTRY  # the live registry: ``wire.secure`` adds its messages
