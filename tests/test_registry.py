"""The SQL registry on a real SQLite file and on a real PostgreSQL server (a fresh database per test):
tokens, devices, rounds, idempotent updates, WAL, schema migrations.

PostgreSQL: the server of ``.ci/setup.d/20-postgresql.sh`` (its URL in /etc/fedmoe-test-postgres-url) or
``$FEDMOE_TEST_POSTGRES_URL``; without either those cases are skipped, with one they must pass.
"""

import os
import secrets
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, event, inspect, make_url, text

from coordinator.registry import SCHEMA_REVISION, Registry
from coordinator.registry.engine import _alembic_config
from device_runtime.auth import generate_keypair, hash_token, verify_challenge
from device_runtime.errors import AuthError, ConfigError, UpdateRejected

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
KEY = generate_keypair()[1]


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def db(tmp_path):
    return tmp_path / "registry.db"


def postgres_url() -> str | None:
    url_file = Path("/etc/fedmoe-test-postgres-url")
    return os.environ.get("FEDMOE_TEST_POSTGRES_URL") or (url_file.read_text().strip() if url_file.exists() else None)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, db):
    """A registry URL of a new, empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{db}"
        return
    base = postgres_url()
    if base is None:
        pytest.skip("no PostgreSQL: run .ci/setup.d/20-postgresql.sh or set FEDMOE_TEST_POSTGRES_URL")
    name = f"fedmoe_test_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield make_url(base).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def reg(url, clock):
    registry = Registry(url, clock=clock)
    yield registry
    registry.close()


def enroll(reg, name="pi"):
    return reg.redeem_token(reg.create_enroll_token(name, ttl_s=600), name, {"memory_mb": 1024}, generate_keypair()[1])


def test_token_is_single_use(reg):
    token = reg.create_enroll_token("pi-4", ttl_s=60)
    device = reg.redeem_token(token, "pi-4", {"memory_mb": 4096}, KEY)
    assert device.id.startswith("d-") and device.name == "pi-4" and device.public_key == KEY
    assert device.created_at == T0 and not device.revoked
    with pytest.raises(AuthError, match="already used"):
        reg.redeem_token(token, "pi-4", {}, generate_keypair()[1])
    with pytest.raises(AuthError, match="unknown"):
        reg.redeem_token("not-a-token", "x", {}, KEY)
    assert [d.id for d in reg.list_devices()] == [device.id]  # failed redemptions added no device


def test_token_expiry(reg, clock):
    token = reg.create_enroll_token("phone", ttl_s=30)
    clock.now = T0 + timedelta(seconds=30)  # expiry is exclusive
    with pytest.raises(AuthError, match="expired"):
        reg.redeem_token(token, "phone", {}, KEY)
    assert reg.list_devices() == []


def test_bad_public_key_rejected(reg):
    with pytest.raises(AuthError, match="32 raw bytes"):
        reg.redeem_token(reg.create_enroll_token("x", ttl_s=60), "x", {}, b"short")


# The eight points of small order (RFC 8032 curve, libsodium's blocklist), each with the sign bit set too:
# for the identity point a fixed signature (R = identity, S = 0) verifies every message.
SMALL_ORDER_KEYS = [
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "0000000000000000000000000000000000000000000000000000000000000080",
    )
]


@pytest.mark.parametrize("key", SMALL_ORDER_KEYS, ids=lambda k: k[:2].hex() + ".." + k[-1:].hex())
def test_small_order_public_key_refused(reg, key):
    identity, forged = SMALL_ORDER_KEYS[1], SMALL_ORDER_KEYS[1] + bytes(32)
    verify_challenge(identity, os.urandom(32), "d-1", forged)  # why: this "signature" verifies any challenge
    token = reg.create_enroll_token("evil", ttl_s=60)
    with pytest.raises(AuthError, match="small order|not a point"):
        reg.redeem_token(token, "evil", {}, key)
    assert reg.list_devices() == []


@pytest.mark.parametrize(
    "key, match",
    [
        (bytes(range(32)), "prime-order subgroup"),  # a curve point with a torsion component
        (bytes.fromhex("ed" + "ff" * 30 + "7f"), "canonical"),  # y = p: a second encoding of y = 0
    ],
    ids=["torsion-component", "non-canonical"],
)
def test_malformed_public_key_refused(reg, key, match):
    with pytest.raises(AuthError, match=match):
        reg.redeem_token(reg.create_enroll_token("x", ttl_s=60), "x", {}, key)


def test_one_key_enrolled_once(reg):
    reg.redeem_token(reg.create_enroll_token("a", ttl_s=60), "a", {}, KEY)
    token = reg.create_enroll_token("b", ttl_s=60)
    with pytest.raises(AuthError, match="enrolled already"):
        reg.redeem_token(token, "b", {}, KEY)
    assert [d.name for d in reg.list_devices()] == ["a"]
    reg.redeem_token(token, "b", {}, generate_keypair()[1])  # the refused attempt did not spend the token


def test_token_redeemed_only_under_its_name(reg):
    token = reg.create_enroll_token("pi-kitchen", ttl_s=60)
    with pytest.raises(AuthError, match="another device name"):
        reg.redeem_token(token, "pi-garage", {}, KEY)
    assert reg.list_devices() == []
    assert reg.redeem_token(token, "pi-kitchen", {}, KEY).name == "pi-kitchen"


def test_token_hashed_at_rest(db):
    reg = Registry(f"sqlite:///{db}")
    tokens = [reg.create_enroll_token(f"dev{i}", ttl_s=60) for i in range(3)]
    reg.redeem_token(tokens[0], "dev0", {}, KEY)
    stored = b"".join(p.read_bytes() for p in db.parent.glob("registry.db*"))
    for token in tokens:
        assert token.encode() not in stored
        assert hash_token(token).encode() in stored  # the hash really is what is stored
    reg.close()


def test_concurrent_redemption_exactly_one_wins(url, clock):
    first = Registry(url, clock=clock)
    token = first.create_enroll_token("race", ttl_s=60)
    registries = [first] + [Registry(url, clock=clock) for _ in range(3)]
    outcomes, barrier = [], threading.Barrier(len(registries))

    def redeem(registry):
        barrier.wait()
        try:
            outcomes.append(registry.redeem_token(token, "race", {}, KEY).id)
        except AuthError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=redeem, args=(r,)) for r in registries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == len(registries), outcomes  # no thread died of another error
    assert sum(o.startswith("d-") for o in outcomes) == 1, outcomes
    assert len(first.list_devices()) == 1
    for registry in registries:
        registry.close()


def test_touch_revoke_and_list(reg, clock):
    a, b = enroll(reg, "a"), enroll(reg, "b")
    clock.now = T0 + timedelta(minutes=5)
    reg.touch_device(a.id, profile={"memory_mb": 512})
    got = reg.get_device(a.id)
    assert got.last_seen == T0 + timedelta(minutes=5) and got.profile == {"memory_mb": 512}
    assert got.last_seen.tzinfo is not None
    reg.revoke_device(b.id)
    assert reg.get_device(b.id).revoked
    assert [d.id for d in reg.list_devices(include_revoked=False)] == [a.id]
    assert {d.id for d in reg.list_devices()} == {a.id, b.id}
    assert reg.active_device_ids([b.id, a.id, "d-unknown"]) == [a.id] and reg.active_device_ids([]) == []
    assert reg.revoked_device_ids() == {b.id}
    with pytest.raises(ConfigError):
        reg.revoke_device("d-missing")
    assert reg.get_device("d-missing") is None


def test_touch_devices_writes_last_seen_of_many_in_one_statement(reg, clock):
    """The coordinator's batched ``last_seen`` (``coordinator.presence``): one UPDATE for every due device, where
    each Heartbeat due used to be a ``touch_device`` commit of its own."""
    a, b, c = enroll(reg, "a"), enroll(reg, "b"), enroll(reg, "c")
    clock.now = T0 + timedelta(minutes=5)
    statements = []
    event.listen(reg.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))
    reg.touch_devices([a.id, c.id, "d-unknown"])
    assert [sql.split()[0] for sql in statements] == ["UPDATE"]
    assert [reg.get_device(d.id).last_seen for d in (a, b, c)] == [clock.now, None, clock.now]
    statements.clear()
    reg.touch_devices([])
    assert statements == []


def test_rounds_and_assignments(reg, clock):
    device = enroll(reg)
    r1 = reg.start_round("hfedmoe", {"clients": 2})
    r2 = reg.start_round("fedavg", {})
    assert (r1.id, r1.status, r1.config) == (1, "running", {"clients": 2})
    reg.record_assignment(
        r1.id, device.id, update_id="u-1", shape_key="experts-2.2", expert_ids=[[0, 3], [1, 2]], config={}
    )
    with pytest.raises(ConfigError):
        reg.record_assignment(
            r1.id, device.id, update_id="u-2", shape_key="experts-2.2", expert_ids=[[0], [1]], config={}
        )
    with pytest.raises(ConfigError):
        reg.record_assignment(99, device.id, update_id="u-3", shape_key="experts-1", expert_ids=[[0]], config={})
    [assignment] = reg.assignments(r1.id)
    assert (assignment.expert_ids, assignment.status) == ([[0, 3], [1, 2]], "assigned")
    clock.now = T0 + timedelta(hours=1)
    done = reg.finish_round(r1.id, metrics={"eval_loss": 2.5})
    assert (done.status, done.finished_at, done.metrics) == ("finished", clock.now, {"eval_loss": 2.5})
    assert [r.id for r in reg.list_rounds()] == [r2.id, r1.id]
    with pytest.raises(ConfigError):
        reg.finish_round(r2.id, metrics={}, status="running")
    with pytest.raises(ConfigError):
        reg.finish_round(42, metrics={})


def test_record_update_is_idempotent(reg):
    a, b = enroll(reg, "a"), enroll(reg, "b")
    rnd = reg.start_round("fedavg", {})
    reg.record_assignment(rnd.id, a.id, update_id="u-a", shape_key="experts-1", expert_ids=[[0]], config={})
    kwargs = dict(
        round_id=rnd.id,
        num_examples=40,
        num_tokens=5120,
        tensor_sha256="ab" * 32,
        metadata={"metrics": {"loss": 2.0}},
        accepted=True,
    )
    row, created = reg.record_update(update_id="u-a", device_id=a.id, **kwargs)
    assert created and row.num_examples == 40 and row.meta == {"metrics": {"loss": 2.0}}
    again, created = reg.record_update(update_id="u-a", device_id=a.id, **{**kwargs, "num_examples": 99})
    assert not created and again.id == row.id and again.num_examples == 40
    reg.record_update(update_id="u-b", device_id=b.id, **{**kwargs, "accepted": False})
    assert [u.update_id for u in reg.accepted_updates(rnd.id)] == ["u-a"]
    assert reg.assignments(rnd.id)[0].status == "reported"
    with pytest.raises(UpdateRejected, match="belongs to device"):
        reg.record_update(update_id="u-a", device_id=b.id, **kwargs)
    with pytest.raises(UpdateRejected, match="unknown round"):
        reg.record_update(update_id="u-c", device_id=a.id, **{**kwargs, "round_id": 77})


def test_model_versions_and_metrics(reg):
    assert reg.latest_model_version() is None
    rnd = reg.start_round("fedavg", {})
    v0 = reg.add_model_version("00" * 32)
    v1 = reg.add_model_version("11" * 32, round_id=rnd.id, metrics={"eval_loss": 3.0})
    assert (v0.version, v1.version) == (0, 1)
    latest = reg.latest_model_version()
    assert (latest.version, latest.tensor_sha256, latest.round_id) == (1, "11" * 32, rnd.id)
    closed = reg.get_round(rnd.id)  # the version and the round's end are one transaction
    assert (closed.status, closed.metrics) == ("finished", {"eval_loss": 3.0, "model_version": 1})
    with pytest.raises(ConfigError):
        reg.add_model_version("22" * 32, round_id=42)
    assert reg.latest_model_version().version == 1  # the failed transaction recorded nothing
    reg.log_metrics({"eval_loss": 3.0, "eval_accuracy": 0.5}, round_id=rnd.id)
    reg.log_metrics({"startup_s": 1.5})
    scores = sorted((m.name, m.value) for m in reg.metrics(round_id=rnd.id))
    assert scores == [("eval_accuracy", 0.5), ("eval_loss", 3.0)]
    with pytest.raises(ValueError):
        reg.log_metrics({"a": 1.0, "b": "not a number"}, round_id=rnd.id)
    assert len(reg.metrics()) == 3  # all or nothing: "a" was not recorded either


def test_sqlite_wal_busy_timeout_and_foreign_keys(db):
    reg = Registry(f"sqlite:///{db}")
    with reg.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    raw = sqlite3.connect(db)  # WAL is persistent in the file, visible to any client
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    reg.close()


def test_a_registry_from_before_alembic_is_migrated_in_place(url):
    """Schema version 1 with its ``schema_version`` table, as fedmoe wrote it before Alembic."""
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0001")
        conn.execute(text("INSERT INTO schema_version (id, version) VALUES (1, 1)"))
        conn.execute(
            text(
                "INSERT INTO devices (id, name, profile, public_key, created_at) "
                "VALUES ('d-old', 'old', '{}', :key, :now)"
            ),
            {"key": KEY, "now": T0.replace(tzinfo=None)},
        )
        conn.execute(text("DROP TABLE alembic_version"))
    engine.dispose()
    reg = Registry(url)
    assert reg.get_device("d-old").public_key == KEY
    tables = set(inspect(reg.engine).get_table_names())
    assert "schema_version" not in tables and "alembic_version" in tables
    with reg.engine.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == SCHEMA_REVISION
    token = reg.create_enroll_token("again", ttl_s=60)
    with pytest.raises(AuthError, match="enrolled already"):
        reg.redeem_token(token, "again", {}, KEY)
    reg.close()


def test_a_registry_of_a_newer_fedmoe_is_refused(url):
    Registry(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(ConfigError, match="newer"):
        Registry(url)


def test_reopen_keeps_data_and_foreign_db_refused(url, tmp_path):
    first = Registry(url)
    device = enroll(first)
    first.close()
    again = Registry(url)
    assert again.get_device(device.id).public_key == device.public_key
    again.close()
    foreign = tmp_path / "other.db"
    raw = sqlite3.connect(foreign)
    raw.execute("CREATE TABLE devices (id TEXT)")
    raw.close()
    with pytest.raises(ConfigError, match="no schema_version"):
        Registry(f"sqlite:///{foreign}")


def test_the_migrations_build_exactly_the_tables_the_code_declares(url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from coordinator.registry.tables import Base

    reg = Registry(url)
    with reg.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    reg.close()
    assert differences == []
