"""The coordinator's SQL schema (SQLAlchemy 2 typed ORM); its history is the Alembic migrations in
``coordinator/registry/migrations/versions`` (revision :data:`SCHEMA_REVISION`).

Tables: ``devices``, ``enroll_tokens``, ``rounds``, ``assignments``, ``updates``,
``model_versions``, ``metrics``. Plain portable SQL types only (any SQLAlchemy URL works); timestamps
are stored as naive UTC and read back timezone-aware (:class:`UTCDateTime`). Tensors never live in the
database: rows hold the sha256 of a file in the ``coordinator.tensor_store``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, ForeignKey, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

SCHEMA_REVISION = "0004"  # the Alembic head revision this code reads and writes


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime stored as a naive UTC ``DATETIME`` (portable across dialects)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("timestamps must be timezone-aware")
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON, datetime: UTCDateTime, bytes: LargeBinary}


class Device(Base):
    """An enrolled device. ``public_key``: raw 32-byte Ed25519 key, one device per key (no secret is stored)."""

    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    profile: Mapped[dict]
    public_key: Mapped[bytes] = mapped_column(index=True, unique=True)
    created_at: Mapped[datetime]
    last_seen: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class EnrollToken(Base):
    """A single-use enrollment token, stored only as its sha256."""

    __tablename__ = "enroll_tokens"
    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id"))


class Round(Base):
    """A federated round. ``status``: ``running``, ``finished`` or ``failed``."""

    __tablename__ = "rounds"
    id: Mapped[int] = mapped_column(primary_key=True)
    strategy: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    config: Mapped[dict]
    metrics: Mapped[dict]


class AssignmentRecord(Base):
    """The expert subset a device trains in a round. ``status``: ``assigned`` or ``reported``.
    ``config``: the FitConfig sent (``FitConfig.from_dict`` reads it back; None for rows of fedmoe before
    schema 0003)."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("round_id", "device_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    update_id: Mapped[str] = mapped_column(String(100), unique=True)
    shape_key: Mapped[str] = mapped_column(String(200))
    expert_ids: Mapped[list]
    config: Mapped[dict | None]
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]


class UpdateRecord(Base):
    """A device's update, recorded once per ``update_id`` (the idempotency key).

    ``meta`` (column ``metadata``): metrics, routing statistics, trained experts, as the device sent them.
    """

    __tablename__ = "updates"
    id: Mapped[int] = mapped_column(primary_key=True)
    update_id: Mapped[str] = mapped_column(String(100), unique=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    num_examples: Mapped[int]
    num_tokens: Mapped[int]
    tensor_sha256: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict] = mapped_column("metadata", JSON)
    accepted: Mapped[bool]
    reason: Mapped[str] = mapped_column(String(2000))
    received_at: Mapped[datetime]


class ModelVersion(Base):
    """A global model checkpoint; version 0 is the initial model, round N's aggregate follows.
    ``strategy_state_sha256``: the safetensors file of the state the strategy carried after producing this
    version (``Strategy.state_dict``), or None (version 0, or made by fedmoe before schema 0003)."""

    __tablename__ = "model_versions"
    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"))
    tensor_sha256: Mapped[str] = mapped_column(String(64))
    strategy_state_sha256: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict]
    created_at: Mapped[datetime]


class Metric(Base):
    """A named scalar, optionally tied to a round and / or a device (e.g. ``eval_loss``)."""

    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"), index=True)
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id"))
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float]
    created_at: Mapped[datetime]
