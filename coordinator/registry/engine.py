"""Opening the registry database: engine set-up (SQLite WAL + busy timeout) and the schema migrations (Alembic)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.exc import DatabaseError

from coordinator.registry.tables import SCHEMA_REVISION, Base
from device_runtime.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 5000
_LEGACY_VERSION_TABLE = "schema_version"  # fedmoe's version table before Alembic (schema version 1)
# Alembic logs "Context impl SQLiteImpl" and its plugin set-up at INFO on every registry open: noise in the
# coordinator's log; its warnings still show.
logging.getLogger("alembic").setLevel(logging.WARNING)


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
    """Bring the database to the schema this code uses (:data:`SCHEMA_REVISION`) with the Alembic migrations
    in ``migrations/``: an empty database is created, an older one upgraded in place (a registry from before
    Alembic, with its ``schema_version`` table, counts as revision 0001). Several processes may open one
    database at once: each upgrade runs in one transaction.

    Raises:
        ConfigError: the database was written by a newer fedmoe (upgrade fedmoe), holds fedmoe-like tables
            but no version (not a registry), or cannot be read (corrupted, not a database, no permission).
    """
    try:
        _migrate(engine)
    except DatabaseError as exc:
        raise ConfigError(
            f"cannot read the registry {engine.url.render_as_string()}: {exc.orig or exc}; restore it "
            "from a backup, or point database_url in the coordinator's config at a good one"
        ) from exc


def _migrate(engine: Engine) -> None:
    with engine.begin() as conn:
        config = _alembic_config(conn)
        current = MigrationContext.configure(conn).get_current_revision()
        if current is None:
            tables = set(inspect(conn).get_table_names())
            if _LEGACY_VERSION_TABLE in tables:
                command.stamp(config, "0001")
            elif tables & set(Base.metadata.tables):
                raise ConfigError(
                    f"{engine.url} has fedmoe-like tables but no schema_version or alembic_version; "
                    "set database_url in the coordinator's config (fedmoe-coord --config FILE) to a "
                    "new database or the original registry"
                )
        elif current not in {rev.revision for rev in ScriptDirectory.from_config(config).walk_revisions()}:
            raise ConfigError(
                f"registry {engine.url} has schema revision {current}, newer than this fedmoe "
                f"(schema {SCHEMA_REVISION}); upgrade fedmoe on the coordinator"
            )
        if current != SCHEMA_REVISION:
            command.upgrade(config, SCHEMA_REVISION)


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    return config
