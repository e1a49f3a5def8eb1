"""The coordinator's SQL registry (SQLAlchemy 2): devices, enrollment tokens, rounds, assignments,
updates, model versions, metrics.

``tables`` holds the schema, ``engine`` opens a database (SQLite WAL, busy timeout, Alembic migrations),
``store`` the :class:`Registry` the server calls.
"""

from coordinator.registry.store import Registry
from coordinator.registry.tables import (
    SCHEMA_REVISION,
    AssignmentRecord,
    Device,
    EnrollToken,
    Metric,
    ModelVersion,
    Round,
    UpdateRecord,
)

__all__ = [
    "Registry",
    "SCHEMA_REVISION",
    "AssignmentRecord",
    "Device",
    "EnrollToken",
    "Metric",
    "ModelVersion",
    "Round",
    "UpdateRecord",
]
