"""tally snapshots

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 16:15:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "tally_snapshots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("questionnaire_versions", sa.Text(), nullable=False),
        sa.Column("margins_sha256", sa.String(length=64), nullable=False),
        sa.Column("margins", sa.Text(), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("n_interviews", sa.Integer(), nullable=False),
        sa.Column("n_completed", sa.Integer(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("campaign_id", "version", name="uq_tally_version"),
    )
    with op.batch_alter_table("tally_snapshots", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_tally_snapshots_campaign_id"), ["campaign_id"], unique=False
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("tally_snapshots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tally_snapshots_campaign_id"))
    op.drop_table("tally_snapshots")
