"""The change feed and the EventBridge outbox.

- `extraction_job_event.xid`: the writing transaction's id (PostgreSQL's
  pg_current_xact_id; 0 on SQLite and for events written before), and an
  index in (xid, seq) order, the feed's.
- `extraction_job_outbox`: the seqs of events still to publish.

Revision ID: 0005_change_feed
Revises: 0004_job_control
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_change_feed"
down_revision: str | None = "0004_job_control"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "extraction_job_event",
        sa.Column("xid", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_index(
        "ix_extraction_job_event_feed", "extraction_job_event", ["xid", "seq"]
    )
    op.create_table(
        "extraction_job_outbox",
        sa.Column("event_seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    )


def downgrade() -> None:
    op.drop_table("extraction_job_outbox")
    op.drop_index("ix_extraction_job_event_feed", table_name="extraction_job_event")
    op.drop_column("extraction_job_event", "xid")
