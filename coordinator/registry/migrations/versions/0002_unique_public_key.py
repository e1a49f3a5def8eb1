"""One enrolled device per public key (issue 10, defect 7: a key enrolled twice); Alembic's
``alembic_version`` replaces the ``schema_version`` table.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch_op:
        batch_op.create_index("ix_devices_public_key", ["public_key"], unique=True)
    op.drop_table("schema_version")


def downgrade() -> None:
    op.create_table(
        "schema_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO schema_version (id, version) VALUES (1, 1)")
    with op.batch_alter_table("devices") as batch_op:
        batch_op.drop_index("ix_devices_public_key")
