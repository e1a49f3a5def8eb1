"""Durable strategy state and assignment configs (issue 19, item 3): each model version names the file of the
strategy state that produced it (``strategy_state_sha256``; NULL for versions of an older fedmoe), and each
assignment keeps the FitConfig it was sent with (``config``; NULL for older rows), so that a resumed round
re-sends exactly what it signed.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch_op:
        batch_op.add_column(sa.Column("strategy_state_sha256", sa.String(length=64), nullable=True))
    with op.batch_alter_table("assignments") as batch_op:
        batch_op.add_column(sa.Column("config", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("assignments") as batch_op:
        batch_op.drop_column("config")
    with op.batch_alter_table("model_versions") as batch_op:
        batch_op.drop_column("strategy_state_sha256")
