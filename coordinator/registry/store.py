"""The :class:`Registry`: every read and write the coordinator makes to its SQL database."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from coordinator.registry.engine import ensure_schema, make_engine
from coordinator.registry.tables import AssignmentRecord, Device, EnrollToken, Metric, ModelVersion, Round, UpdateRecord
from device_runtime.auth import check_device_name, check_public_key, hash_token, new_enroll_token
from device_runtime.errors import AuthError, ConfigError, UpdateRejected

ROUND_STATUSES = ("running", "finished", "failed")


def utc_now() -> datetime:
    return datetime.now(UTC)


class Registry:
    """Devices, enrollment tokens, rounds, assignments, updates, model versions and metrics in SQL.

    Args:
        url: any SQLAlchemy URL, e.g. ``sqlite:////var/lib/fedmoe/registry.db``.
        clock: source of timezone-aware UTC timestamps (token expiry, ``last_seen``, ...).

    Returned rows are detached snapshots (``expire_on_commit=False``): read them freely, change the
    database only through these methods.

    Raises:
        ConfigError: on opening, if the database has another schema version (see ``ensure_schema``).
    """

    def __init__(self, url: str, *, clock: Callable[[], datetime] = utc_now):
        self.engine = make_engine(url)
        ensure_schema(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._clock = clock

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ enrollment and devices

    def create_enroll_token(self, name: str, ttl_s: float) -> str:
        """A new single-use token for enrolling a device called ``name``, valid ``ttl_s`` seconds.

        Only its sha256 is stored; the plaintext is returned once, to hand to the device.

        Raises:
            ConfigError: no device can enroll under ``name`` (``device_runtime.auth.check_device_name``).
        """
        check_device_name(name)
        token, now = new_enroll_token(), self._clock()
        with self._session.begin() as s:
            s.add(
                EnrollToken(
                    token_sha256=hash_token(token), name=name, created_at=now, expires_at=now + timedelta(seconds=ttl_s)
                )
            )
        return token

    def redeem_token(self, token: str, name: str, profile: dict, public_key: bytes) -> Device:
        """Spend ``token`` and register a device called ``name`` with this Ed25519 ``public_key``.

        The token must have been created for ``name`` and not be used or expired; the key must pass
        :func:`device_runtime.auth.check_public_key` and not belong to an enrolled device already. Atomic:
        of concurrent redemptions of one token, exactly one succeeds.

        Raises:
            AuthError: naming the rule that fails (nothing is recorded then).
        """
        digest, now = hash_token(token), self._clock()
        try:
            with self._session.begin() as s:
                device = Device(
                    id=f"d-{secrets.token_hex(8)}",
                    name=name,
                    profile=profile,
                    public_key=bytes(public_key),
                    created_at=now,
                )
                s.add(device)
                s.flush()  # IntegrityError: the key is enrolled already (unique index)
                spent = s.execute(
                    update(EnrollToken)
                    .where(
                        EnrollToken.token_sha256 == digest,
                        EnrollToken.name == name,
                        EnrollToken.used_at.is_(None),
                        EnrollToken.expires_at > now,
                    )
                    .values(used_at=now, device_id=device.id)
                )
                if spent.rowcount != 1:  # raising rolls the device insert back
                    raise AuthError(self._token_problem(s, digest, name, now) or "enrollment token used concurrently")
                check_public_key(public_key)  # ~7 ms of arithmetic: only for a valid token
        except IntegrityError as exc:
            with self._session() as s:
                problem = self._token_problem(s, digest, name, now)
            raise AuthError(
                problem or "this public key is enrolled already; generate a new key pair for a new device"
            ) from exc
        return device

    @staticmethod
    def _token_problem(s: Session, digest: str, name: str, now: datetime) -> str | None:
        """Why the token cannot be redeemed under ``name`` now, or None if it can."""
        row, new = s.get(EnrollToken, digest), "create one with `fedmoe-coord enroll --name NAME`"
        if row is None:
            return f"unknown enrollment token; {new}"
        if row.used_at is not None:
            return f"enrollment token already used; {new}"
        if row.name != name:
            return f"this enrollment token was issued for another device name than {name!r}; enroll with that name"
        if row.expires_at <= now:
            return f"enrollment token expired; {new}"
        return None

    def get_device(self, device_id: str) -> Device | None:
        with self._session() as s:
            return s.get(Device, device_id)

    def touch_device(self, device_id: str, profile: dict | None = None) -> None:
        """Set ``last_seen`` to now (and replace the profile if given). Raises ConfigError if unknown."""
        values = {"last_seen": self._clock()} | ({} if profile is None else {"profile": profile})
        self._update_device(device_id, values)

    def touch_devices(self, device_ids: Iterable[str]) -> None:
        """Set ``last_seen`` to now for every one of ``device_ids`` in one statement and one commit (none for no
        ids); unknown ids are skipped."""
        ids = list(device_ids)
        if ids:
            with self._session.begin() as s:
                s.execute(update(Device).where(Device.id.in_(ids)).values(last_seen=self._clock()))

    def revoke_device(self, device_id: str) -> None:
        """Revoke a device: it can no longer authenticate. Raises ConfigError if unknown."""
        self._update_device(device_id, {"revoked_at": self._clock()})

    def _update_device(self, device_id: str, values: dict) -> None:
        with self._session.begin() as s:
            if s.execute(update(Device).where(Device.id == device_id).values(**values)).rowcount != 1:
                raise ConfigError(f"no device {device_id!r}; list them with `fedmoe-coord devices`")

    def active_device_ids(self, device_ids: Iterable[str]) -> list[str]:
        """Those of ``device_ids`` that are enrolled and not revoked (one query)."""
        ids = list(device_ids)
        if not ids:
            return []
        query = select(Device.id).where(Device.id.in_(ids), Device.revoked_at.is_(None))
        with self._session() as s:
            return list(s.scalars(query))

    def revoked_device_ids(self) -> set[str]:
        """The ids of the revoked devices (one query, whose answer grows with the revoked devices only)."""
        with self._session() as s:
            return set(s.scalars(select(Device.id).where(Device.revoked_at.is_not(None))))

    def list_devices(self, *, include_revoked: bool = True) -> list[Device]:
        query = select(Device).order_by(Device.created_at, Device.id)
        if not include_revoked:
            query = query.where(Device.revoked_at.is_(None))
        with self._session() as s:
            return list(s.scalars(query))

    # ------------------------------------------------------------ rounds and assignments

    def start_round(self, strategy: str, config: dict) -> Round:
        """Open a new round (``status="running"``); ids increase from 1."""
        with self._session.begin() as s:
            row = Round(strategy=strategy, status="running", started_at=self._clock(), config=config, metrics={})
            s.add(row)
        return row

    def get_round(self, round_id: int) -> Round | None:
        with self._session() as s:
            return s.get(Round, round_id)

    def finish_round(self, round_id: int, *, metrics: dict, status: str = "finished") -> Round:
        """Close a round with its metrics. Raises ConfigError for an unknown round or status."""
        if status not in ROUND_STATUSES[1:]:
            raise ConfigError(f"a round finishes as one of {ROUND_STATUSES[1:]}, not {status!r}")
        with self._session.begin() as s:
            row = self._round(s, round_id)
            row.status, row.finished_at, row.metrics = status, self._clock(), metrics
        return row

    def list_rounds(self, *, limit: int = 100) -> list[Round]:
        """The ``limit`` most recent rounds, newest first."""
        with self._session() as s:
            return list(s.scalars(select(Round).order_by(Round.id.desc()).limit(limit)))

    def record_assignment(
        self,
        round_id: int,
        device_id: str,
        *,
        update_id: str,
        shape_key: str,
        expert_ids: list[list[int]],
        config: dict,
    ) -> AssignmentRecord:
        """Record the expert subset and the FitConfig (``config``, as JSON builtins) sent to a device. Raises
        ConfigError for an unknown round or device, or a second assignment of the device in the round."""
        with self._session() as s:
            row = AssignmentRecord(
                round_id=round_id,
                device_id=device_id,
                update_id=update_id,
                shape_key=shape_key,
                expert_ids=[list(ids) for ids in expert_ids],
                config=config,
                status="assigned",
                created_at=self._clock(),
            )
            s.add(row)
            try:
                s.commit()
            except IntegrityError as exc:
                raise ConfigError(
                    f"cannot assign device {device_id} in round {round_id} (unknown round or "
                    f"device, or already assigned): {exc.orig}"
                ) from exc
        return row

    def assignments(self, round_id: int) -> list[AssignmentRecord]:
        with self._session() as s:
            return list(
                s.scalars(
                    select(AssignmentRecord).where(AssignmentRecord.round_id == round_id).order_by(AssignmentRecord.id)
                )
            )

    def device_shape_keys(self, device_id: str) -> set[str]:
        """The shape key ids of every assignment ``device_id`` was ever given (an update it sends, or re-sends
        after a lost Ack, answers one of them)."""
        query = select(AssignmentRecord.shape_key).where(AssignmentRecord.device_id == device_id).distinct()
        with self._session() as s:
            return set(s.scalars(query))

    @staticmethod
    def _round(s: Session, round_id: int) -> Round:
        row = s.get(Round, round_id)
        if row is None:
            raise ConfigError(f"no round {round_id}; list them with `fedmoe-coord rounds`")
        return row

    # ------------------------------------------------------------ updates

    def record_update(
        self,
        *,
        update_id: str,
        round_id: int,
        device_id: str,
        num_examples: int,
        num_tokens: int,
        tensor_sha256: str | None,
        metadata: dict,
        accepted: bool,
        reason: str = "",
    ) -> tuple[UpdateRecord, bool]:
        """Record a device's update once per ``update_id`` and mark its assignment ``reported``.

        Returns:
            ``(row, created)``: ``created`` is False when ``update_id`` was already recorded; the
            existing row is returned unchanged and nothing is counted twice.

        Raises:
            UpdateRejected: the round or device is unknown, or ``update_id`` was recorded for another
                device or round.
        """
        with self._session() as s:
            existing = self._existing_update(s, update_id, round_id, device_id)
            if existing is not None:
                return existing, False
            if s.get(Round, round_id) is None or s.get(Device, device_id) is None:
                raise UpdateRejected(f"update {update_id}: unknown round {round_id} or device {device_id}")
            row = UpdateRecord(
                update_id=update_id,
                round_id=round_id,
                device_id=device_id,
                num_examples=num_examples,
                num_tokens=num_tokens,
                tensor_sha256=tensor_sha256,
                meta=metadata,
                accepted=accepted,
                reason=reason,
                received_at=self._clock(),
            )
            s.add(row)
            s.execute(update(AssignmentRecord).where(AssignmentRecord.update_id == update_id).values(status="reported"))
            try:
                s.commit()
            except IntegrityError:  # a concurrent writer recorded the same update_id first
                s.rollback()
                return self._existing_update(s, update_id, round_id, device_id), False
        return row, True

    def get_update(self, update_id: str) -> UpdateRecord | None:
        with self._session() as s:
            return s.scalar(select(UpdateRecord).where(UpdateRecord.update_id == update_id))

    @staticmethod
    def _existing_update(s: Session, update_id: str, round_id: int, device_id: str) -> UpdateRecord | None:
        row = s.scalar(select(UpdateRecord).where(UpdateRecord.update_id == update_id))
        if row is not None and (row.device_id, row.round_id) != (device_id, round_id):
            raise UpdateRejected(f"update id {update_id} belongs to device {row.device_id}, round {row.round_id}")
        return row

    def accepted_updates(self, round_id: int) -> list[UpdateRecord]:
        """The accepted updates of a round, in arrival order."""
        query = (
            select(UpdateRecord)
            .where(UpdateRecord.round_id == round_id, UpdateRecord.accepted.is_(True))
            .order_by(UpdateRecord.id)
        )
        with self._session() as s:
            return list(s.scalars(query))

    def update_shas(self, *, except_round: int | None = None) -> list[str]:
        """The distinct tensor sha256 of every stored (accepted) update, but those of round ``except_round``."""
        query = select(UpdateRecord.tensor_sha256).where(UpdateRecord.tensor_sha256.is_not(None)).distinct()
        if except_round is not None:
            query = query.where(UpdateRecord.round_id != except_round)
        with self._session() as s:
            return list(s.scalars(query))

    def referenced_shas(self) -> set[str]:
        """The tensor files the federation still needs: every global version's and its strategy state's, and every
        accepted update's of a running round (a version byte-identical to an update shares its file)."""
        versions = select(ModelVersion.tensor_sha256)
        states = select(ModelVersion.strategy_state_sha256).where(ModelVersion.strategy_state_sha256.is_not(None))
        live = (
            select(UpdateRecord.tensor_sha256)
            .join(Round, Round.id == UpdateRecord.round_id)
            .where(Round.status == "running", UpdateRecord.accepted.is_(True), UpdateRecord.tensor_sha256.is_not(None))
        )
        with self._session() as s:
            return set(s.scalars(versions)) | set(s.scalars(states)) | set(s.scalars(live))

    # ------------------------------------------------------------ model versions and metrics

    def add_model_version(
        self,
        tensor_sha256: str,
        *,
        round_id: int | None = None,
        metrics: dict | None = None,
        strategy_state_sha256: str | None = None,
    ) -> ModelVersion:
        """Record a new global checkpoint (a ``TensorStore`` sha256) and the strategy state that produced it (one
        too, or None); versions count up from 0.

        A version made by round ``round_id`` finishes that round in the same transaction (its metrics plus
        ``model_version``), so a crash leaves both or neither. Raises ConfigError for an unknown round."""
        with self._session.begin() as s:
            made_by = None if round_id is None else self._round(s, round_id)
            last = s.scalar(select(func.max(ModelVersion.version)))
            row = ModelVersion(
                version=0 if last is None else last + 1,
                round_id=round_id,
                tensor_sha256=tensor_sha256,
                strategy_state_sha256=strategy_state_sha256,
                metrics=metrics or {},
                created_at=self._clock(),
            )
            s.add(row)
            if made_by is not None:
                made_by.status, made_by.finished_at = "finished", self._clock()
                made_by.metrics = {**row.metrics, "model_version": row.version}
        return row

    def latest_model_version(self) -> ModelVersion | None:
        with self._session() as s:
            return s.scalar(select(ModelVersion).order_by(ModelVersion.version.desc()).limit(1))

    def get_model_version(self, version: int) -> ModelVersion | None:
        with self._session() as s:
            return s.get(ModelVersion, version)

    def log_metrics(
        self, values: dict[str, float], *, round_id: int | None = None, device_id: str | None = None
    ) -> None:
        """Record ``values`` (metric name -> number) in one transaction: a reader sees all of them or none.
        Raises ValueError / TypeError (nothing recorded) for a value that is not a number."""
        rows = [
            Metric(name=name, value=float(value), round_id=round_id, device_id=device_id, created_at=self._clock())
            for name, value in values.items()
        ]
        with self._session.begin() as s:
            s.add_all(rows)

    def log_device_result(self, name: str, value: float, *, round_id: int, device_id: str) -> bool:
        """Record a device's own result ``name`` for a round it was assigned in, once: a repeat, or a round
        without an assignment of the device, records nothing (bounds what an unsolicited message can store).
        Returns whether it was recorded. Raises ValueError / TypeError for a value that is not a number."""
        row = Metric(name=name, value=float(value), round_id=round_id, device_id=device_id, created_at=self._clock())
        with self._session.begin() as s:
            assigned = s.scalar(
                select(AssignmentRecord.id).where(
                    AssignmentRecord.round_id == round_id, AssignmentRecord.device_id == device_id
                )
            )
            seen = s.scalar(
                select(Metric.id)
                .where(Metric.round_id == round_id, Metric.device_id == device_id, Metric.name == name)
                .limit(1)
            )
            if assigned is None or seen is not None:
                return False
            s.add(row)
        return True

    def metrics(self, *, round_id: int | None = None) -> list[Metric]:
        """Logged metrics, oldest first; only those of ``round_id`` when given."""
        query = select(Metric).order_by(Metric.id)
        if round_id is not None:
            query = query.where(Metric.round_id == round_id)
        with self._session() as s:
            return list(s.scalars(query))
