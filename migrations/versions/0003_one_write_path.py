"""One write path: JSON kept as sent, the lease's owner, the last heartbeat.

- `metadata`, `result` and `detail` become `json` on PostgreSQL (they were
  `jsonb`), which keeps the text as written, so numbers read back as they
  were sent. Values stored before keep jsonb's normal form. SQLite stores
  JSON as text already.
- `lease_owner`: the token subject that took the lease; with `worker_id` it
  names the holder. A job processing now gets its `updated_by`, which is
  the subject of its claim or of its last heartbeat.
- `heartbeat_at`: the holder's last heartbeat (heartbeats no longer add
  an event each).

Revision ID: 0003_one_write_path
Revises: 0002_job_lifecycle
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_one_write_path"
down_revision: str | None = "0002_job_lifecycle"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_COLUMNS = (
    ("extraction_job", "metadata"),
    ("extraction_job", "result"),
    ("extraction_job_event", "detail"),
)


def _retype(json_type: sa.types.TypeEngine, cast: str) -> None:
    for table, column in JSON_COLUMNS:
        op.alter_column(
            table,
            column,
            type_=json_type,
            postgresql_using=f'"{column}"::{cast}',
        )


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _retype(sa.JSON(none_as_null=True), "json")
    op.add_column("extraction_job", sa.Column("lease_owner", sa.String(255)))
    op.add_column(
        "extraction_job", sa.Column("heartbeat_at", sa.DateTime(timezone=True))
    )
    op.execute(
        "UPDATE extraction_job SET lease_owner = updated_by WHERE status = 'processing'"
    )


def downgrade() -> None:
    op.drop_column("extraction_job", "heartbeat_at")
    op.drop_column("extraction_job", "lease_owner")
    if op.get_bind().dialect.name == "postgresql":
        _retype(postgresql.JSONB(none_as_null=True), "jsonb")
