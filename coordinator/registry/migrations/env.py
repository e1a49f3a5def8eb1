"""Alembic environment of the registry schema: always run by ``coordinator.registry.engine.ensure_schema``
on a connection it passes in ``config.attributes["connection"]`` (no alembic.ini, no offline mode)."""

from alembic import context

from coordinator.registry.tables import Base

context.configure(
    connection=context.config.attributes["connection"], target_metadata=Base.metadata, render_as_batch=True
)
with context.begin_transaction():
    context.run_migrations()
