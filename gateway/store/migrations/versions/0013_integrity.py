"""why an interview was screened out (quota | ineligible)

Revision ID: 0013
Revises: 0009
Create Date: 2026-12-01 10:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("interviews", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reason", sa.String(20), nullable=True))
    # Every screen-out before this revision was a full quota cell.
    op.execute("UPDATE interviews SET reason = 'quota' WHERE status = 'screened_out'")


def downgrade() -> None:
    with op.batch_alter_table("interviews", schema=None) as batch_op:
        batch_op.drop_column("reason")
