"""One spelling of "enroll" (issue 20, item 5): the ``enrol_tokens`` table becomes ``enroll_tokens``.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.rename_table("enrol_tokens", "enroll_tokens")


def downgrade() -> None:
    op.rename_table("enroll_tokens", "enrol_tokens")
