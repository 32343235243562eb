"""Job control: the `cancelled` status, cancel requests, operator lists.

- `cancelled` joins the status CHECK, and the finished-jobs index (retention).
- `cancel_requested_at`: an operator's cancel of a processing job.
- Indexes for the operator lists (by worker, by creation time) and for the
  oldest due pending job in /stats (by status and run_at).
- `extraction_job_create_clock`: one row, the newest job's `created_at`; a
  create takes its row lock and its time from it (db_models.CREATE_CLOCK).

SQLite cannot alter a CHECK constraint: the table is rebuilt from its own
stored definition with the new CHECK, its rows copied, and its indexes made
again from their own stored definitions (Alembic's batch mode would rebuild
them from reflection, which loses `priority DESC` and expression indexes).

Revision ID: 0004_job_control
Revises: 0003_one_write_path
"""

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_job_control"
down_revision: str | None = "0003_one_write_path"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "'pending', 'processing', 'completed', 'failed', 'cancelled'"
OLD_STATUSES = "'pending', 'processing', 'completed', 'failed'"
FINISHED = sa.text("status IN ('completed', 'failed', 'cancelled')")
OLD_FINISHED = sa.text("status IN ('completed', 'failed')")


def _statuses(old: str, new: str) -> None:
    check = "CONSTRAINT ck_extraction_job_status CHECK (status IN ({}))"
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("ck_extraction_job_status", "extraction_job", type_="check")
        # NOT VALID, then VALIDATE: the scan of the rows does not block writers.
        op.execute(f"ALTER TABLE extraction_job ADD {check.format(new)} NOT VALID")
        op.execute(
            "ALTER TABLE extraction_job VALIDATE CONSTRAINT ck_extraction_job_status"
        )
        return
    bind = op.get_bind()
    table_sql = bind.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'extraction_job'"
    ).scalar()
    if table_sql.count(check.format(old)) != 1:
        raise RuntimeError("extraction_job's status CHECK is not the one expected")
    indexes = (
        bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' "
            "AND tbl_name = 'extraction_job' AND sql IS NOT NULL"
        )
        .scalars()
        .all()
    )
    # After a rename SQLite stores the name quoted.
    rebuilt = re.sub(
        r'^CREATE TABLE "?extraction_job"?',
        "CREATE TABLE extraction_job_rebuilt",
        table_sql.replace(check.format(old), check.format(new)),
    )
    op.execute(rebuilt)
    op.execute("INSERT INTO extraction_job_rebuilt SELECT * FROM extraction_job")
    op.execute("DROP TABLE extraction_job")
    op.execute("ALTER TABLE extraction_job_rebuilt RENAME TO extraction_job")
    for index in indexes:
        op.execute(index)


def _finished_index(where: sa.TextClause) -> None:
    op.drop_index("ix_extraction_job_finished", table_name="extraction_job")
    op.create_index(
        "ix_extraction_job_finished",
        "extraction_job",
        ["finished_at"],
        postgresql_where=where,
        sqlite_where=where,
    )


def upgrade() -> None:
    op.add_column(
        "extraction_job",
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True)),
    )
    _statuses(OLD_STATUSES, STATUSES)
    _finished_index(FINISHED)
    op.create_index("ix_extraction_job_worker", "extraction_job", ["worker_id", "seq"])
    op.create_index(
        "ix_extraction_job_created", "extraction_job", ["created_at", "seq"]
    )
    op.create_index(
        "ix_extraction_job_status_run_at", "extraction_job", ["status", "run_at"]
    )
    op.create_table(
        "extraction_job_create_clock",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute(
        "INSERT INTO extraction_job_create_clock (id, created_at) "
        "SELECT 1, COALESCE(MAX(created_at), '1970-01-01 00:00:00') FROM extraction_job"
    )


def downgrade() -> None:
    op.drop_table("extraction_job_create_clock")
    op.drop_index("ix_extraction_job_status_run_at", table_name="extraction_job")
    op.drop_index("ix_extraction_job_created", table_name="extraction_job")
    op.drop_index("ix_extraction_job_worker", table_name="extraction_job")
    # The older schema has no place for a cancelled job: it goes back to failed.
    op.execute("UPDATE extraction_job SET status = 'failed' WHERE status = 'cancelled'")
    _finished_index(OLD_FINISHED)
    _statuses(STATUSES, OLD_STATUSES)
    op.drop_column("extraction_job", "cancel_requested_at")
