"""quotas, reminder schedule, airtime thank-you

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25 18:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quotas", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("reminder_hours", sa.Integer(), nullable=False,
                                      server_default="12"))
        batch_op.add_column(sa.Column("reminder_max", sa.Integer(), nullable=False,
                                      server_default="1"))
        batch_op.add_column(sa.Column("airtime_currency", sa.String(length=3), nullable=False,
                                      server_default=""))
        batch_op.add_column(sa.Column("airtime_amount", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("airtime_budget", sa.Integer(), nullable=True))
    op.create_table(
        "airtime_payments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("respondent", sa.String(length=64), nullable=False),
        sa.Column("interview_id", sa.String(length=64), nullable=False),
        sa.Column("channel_id", sa.Integer(), nullable=True),
        sa.Column("recipient", sa.Text(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=100), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("campaign_id", "respondent", name="uq_airtime_once"),
    )
    with op.batch_alter_table("airtime_payments", schema=None) as batch_op:
        batch_op.create_index("ix_airtime_payments_campaign_id", ["campaign_id"])
        batch_op.create_index("ix_airtime_payments_status", ["status"])
        batch_op.create_index("ix_airtime_payments_request_id", ["request_id"])
    # Strict per-recipient ordering asks "is an earlier message to this person pending?"
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.create_index("ix_outbound_order", ["channel_id", "respondent", "id"])


def downgrade() -> None:
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_outbound_order")
    op.drop_table("airtime_payments")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        for column in ("airtime_budget", "airtime_amount", "airtime_currency", "reminder_max",
                       "reminder_hours", "quotas"):
            batch_op.drop_column(column)
