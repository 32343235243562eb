"""Leases, retries, scheduled runs, results, history (issue 11).

Also the table holding the list cursors' signing key, a random one per
database. Existing rows get sensible values: max_attempts 3, run_at = created_at, and
a job already processing gets a lease of 300 s from its last change, so a job
stranded by release 1 is swept like any other.

Revision ID: 0002_job_lifecycle
Revises: 0001_initial
"""

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_job_lifecycle"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PROCESSING = sa.text("status = 'processing'")
FINISHED = sa.text("status IN ('completed', 'failed')")
LEASE_FOR_EXISTING_SECONDS = 300


def _json() -> sa.types.TypeEngine:
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    postgres = op.get_bind().dialect.name == "postgresql"
    op.add_column(
        "extraction_job",
        sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="3"),
    )
    # SQLite can only add a NOT NULL column with a default; every row is then
    # given its own value, and PostgreSQL drops the placeholder default.
    op.add_column(
        "extraction_job",
        sa.Column(
            "run_at",
            timestamp,
            nullable=False,
            server_default=sa.text("'1970-01-01 00:00:00'"),
        ),
    )
    op.add_column("extraction_job", sa.Column("lease_expires_at", timestamp))
    op.add_column("extraction_job", sa.Column("result", _json()))
    op.add_column("extraction_job", sa.Column("updated_by", sa.String(255)))
    op.execute("UPDATE extraction_job SET run_at = created_at")
    if postgres:
        op.alter_column("extraction_job", "run_at", server_default=None)
        op.execute(
            "UPDATE extraction_job SET lease_expires_at = updated_at + "
            f"interval '{LEASE_FOR_EXISTING_SECONDS} seconds' WHERE status = 'processing'"
        )
    else:
        op.execute(
            "UPDATE extraction_job SET lease_expires_at = strftime('%Y-%m-%d %H:%M:%S', "
            f"updated_at, '+{LEASE_FOR_EXISTING_SECONDS} seconds') || '.000000' "
            "WHERE status = 'processing'"
        )
    op.create_index(
        "ix_extraction_job_lease",
        "extraction_job",
        ["lease_expires_at"],
        postgresql_where=PROCESSING,
        sqlite_where=PROCESSING,
    )
    op.create_index(
        "ix_extraction_job_finished",
        "extraction_job",
        ["finished_at"],
        postgresql_where=FINISHED,
        sqlite_where=FINISHED,
    )
    op.create_table(
        "extraction_job_event",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("at", timestamp, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(16)),
        sa.Column("to_status", sa.String(16)),
        sa.Column("actor", sa.String(255)),
        sa.Column("worker_id", sa.String(255)),
        sa.Column("detail", _json()),
    )
    op.create_index(
        "ix_extraction_job_event_job", "extraction_job_event", ["job_id", "seq"]
    )
    # The list cursors' signing key: random per database, made here once.
    keys = op.create_table(
        "extraction_job_cursor_key",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
    )
    op.bulk_insert(keys, [{"id": 1, "key": secrets.token_hex(32)}])


def downgrade() -> None:
    op.drop_table("extraction_job_cursor_key")
    op.drop_table("extraction_job_event")
    op.drop_index("ix_extraction_job_finished", table_name="extraction_job")
    op.drop_index("ix_extraction_job_lease", table_name="extraction_job")
    for column in (
        "updated_by",
        "result",
        "lease_expires_at",
        "run_at",
        "max_attempts",
    ):
        op.drop_column("extraction_job", column)
