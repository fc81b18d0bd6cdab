"""channels.unbound_at (an unbound channel keeps its row) and ussd_part_breaks

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-01 12:45:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unbound_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "ussd_part_breaks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("interview_id", sa.String(length=64), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("channel_id", sa.Integer(), nullable=True),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("interview_id", "part", name="uq_part_break"),
    )
    with op.batch_alter_table("ussd_part_breaks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ussd_part_breaks_campaign_id"), ["campaign_id"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ussd_part_breaks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ussd_part_breaks_campaign_id"))
    op.drop_table("ussd_part_breaks")
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.drop_column("unbound_at")
