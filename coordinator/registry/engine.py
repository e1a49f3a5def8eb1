"""Opening the registry database: engine set-up (SQLite WAL + busy timeout) and the schema-version check."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event, inspect, select

from coordinator.registry.tables import SCHEMA_VERSION, Base, SchemaVersion
from device_runtime.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 5000


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine for ``url``; on SQLite every connection gets WAL mode, a busy timeout of
    ``SQLITE_BUSY_TIMEOUT_MS`` and foreign-key enforcement (``docs/stack.md``, SQLite)."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def ensure_schema(engine: Engine) -> None:
    """Create the tables in an empty database, or check an existing one's schema version.

    Raises:
        ConfigError: the database was written by another fedmoe schema version (newer: upgrade fedmoe;
            older: no migration exists yet), or holds tables but no ``schema_version`` (not a registry).
    """
    tables = set(inspect(engine).get_table_names())
    if SchemaVersion.__tablename__ not in tables:
        if tables & set(Base.metadata.tables):
            raise ConfigError(f"{engine.url} has fedmoe-like tables but no schema_version; set database_url in "
                              "the coordinator's config (fedmoe-coord --config FILE) to a new database or the "
                              "original registry")
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
            conn.execute(SchemaVersion.__table__.insert().values(id=1, version=SCHEMA_VERSION))
        return
    with engine.connect() as conn:
        found = conn.scalar(select(SchemaVersion.version).where(SchemaVersion.id == 1))
    if found is None:
        raise ConfigError(f"registry {engine.url} has an empty schema_version table; it is not a usable registry")
    if found > SCHEMA_VERSION:
        raise ConfigError(f"registry {engine.url} has schema version {found}, newer than this fedmoe "
                          f"(schema {SCHEMA_VERSION}); upgrade fedmoe on the coordinator")
    if found < SCHEMA_VERSION:
        raise ConfigError(f"registry {engine.url} has schema version {found}; this fedmoe needs "
                          f"{SCHEMA_VERSION} and has no migration for it: start a new registry file")
