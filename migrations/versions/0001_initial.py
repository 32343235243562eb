"""The schema as release 1 made it with create_all, before Alembic.

A database created by that release has this table and no `alembic_version`;
migrations/env.py recognises it and stamps it at this revision instead of
creating the table again.

Revision ID: 0001_initial
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "extraction_job",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("id", sa.Uuid(), nullable=False, unique=True),
        sa.Column("document_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column(
            "metadata",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True), "postgresql"
            ),
        ),
        sa.Column("error_message", sa.Text()),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.Column("created_by", sa.String(255)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(255)),
        sa.Column("started_at", timestamp),
        sa.Column("finished_at", timestamp),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(255)),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed')",
            name="ck_extraction_job_status",
        ),
        sa.CheckConstraint(
            "priority BETWEEN 0 AND 10", name="ck_extraction_job_priority"
        ),
        sa.CheckConstraint("attempts >= 0", name="ck_extraction_job_attempts"),
    )
    op.create_index(
        "ix_extraction_job_document_id", "extraction_job", ["document_id", "seq"]
    )
    op.create_index("ix_extraction_job_status", "extraction_job", ["status", "seq"])
    op.create_index(
        "ix_extraction_job_pending_claim",
        "extraction_job",
        [sa.text("priority DESC"), "seq"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    op.create_index(
        "uq_extraction_job_idempotency",
        "extraction_job",
        [sa.text("coalesce(created_by, '')"), "idempotency_key"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_table("extraction_job")
