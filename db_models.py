"""The tables, as SQLAlchemy Core `Table`s, and the column types they use.

Core only: nothing here (or anywhere on the request path) imports
`sqlalchemy.orm`, which would cost a Lambda cold start about 60 ms.
The schema belongs to Alembic (migrations/); tests/test_migrations.py keeps
these definitions and the migrated databases equal, CHECK constraints and
partial-index predicates included.
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    func,
    text,
)

from models import (
    DEFAULT_MAX_ATTEMPTS,
    FINISHED,
    MAX_PRIORITY,
    MIN_PRIORITY,
    JobStatus,
)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC timestamp on every backend.

    PostgreSQL stores `timestamptz`, which psycopg2 returns aware, in the
    session's time zone (UTC when database.py sets it at connect); SQLite has
    no time zones, so values are stored as naive UTC there and made aware
    again on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime | None, dialect: Any
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: datetime | None, dialect: Any
    ) -> datetime | None:
        if value is None:
            return None
        return (
            value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        )

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        # psycopg2 returns aware datetimes, in UTC itself where database.py
        # sets TimeZone=UTC at connect (it marks the dialect so): no per-value
        # call, which was ~6 % of the CPU time of a list of 50. Behind a
        # pooler (DB_POOLER=1) the zone is the role's default, converted here.
        if getattr(dialect, "session_time_zone", None) == "UTC":
            return None
        return super().result_processor(dialect, coltype)


# `json`, not `jsonb`, on PostgreSQL: it keeps the text as sent, so numbers
# read back as they were written (jsonb turns 1e308 into 309 digits and
# 1.5e300 into an integer). A JSON null stays SQL NULL: "no metadata" is one
# value, not two.
JSONDocument = JSON(none_as_null=True)


class PartialIndex(Index):
    """An index `WHERE where` on PostgreSQL and SQLite.

    The same as `Index(..., postgresql_where=where, sqlite_where=where)`,
    except that those keywords make SQLAlchemy load both dialects at import
    (to validate them); here each dialect's option is filled in when that
    dialect first asks for it, e.g. while compiling CREATE INDEX.
    """

    def __init__(self, name: str, *expressions: Any, where: Any, **kw: Any) -> None:
        super().__init__(name, *expressions, **kw)
        self.partial_where = where

    def _kw_reg_for_dialect_cls(self, dialect_name: str) -> Any:
        options = super()._kw_reg_for_dialect_cls(dialect_name)
        if dialect_name in ("postgresql", "sqlite"):
            options["where"] = self.partial_where
        return options


# SQLite only autoincrements an INTEGER PRIMARY KEY.
Sequence = BigInteger().with_variant(Integer(), "sqlite")

# The Alembic revisions in migrations/versions, oldest first; the last one is
# the schema this code needs (a test keeps the two in step).
SCHEMA_REVISIONS = (
    "0001_initial",
    "0002_job_lifecycle",
    "0003_one_write_path",
    "0004_job_control",
    "0005_change_feed",
)


def status_in(statuses: Any) -> str:
    """`status IN (...)` for a set of statuses, in the enum's order."""
    listed = ", ".join(
        f"'{status.value}'" for status in JobStatus if status in statuses
    )
    return f"status IN ({listed})"


def _status_is(status: JobStatus) -> Any:
    return text(f"status = '{status.value}'")


metadata = MetaData()

# One job per ingested document. `seq` is the creation order: a
# database-assigned counter, so listing and claiming stay deterministic even
# for jobs created in the same microsecond. The public identifier is `id`.
JOBS = Table(
    "extraction_job",
    metadata,
    Column("seq", Sequence, primary_key=True, autoincrement=True),
    Column("id", Uuid, nullable=False, unique=True),
    Column("document_id", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("metadata", JSONDocument),
    Column("error_message", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("created_by", String(255)),
    Column("attempts", Integer, nullable=False),
    Column("worker_id", String(255)),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("version", Integer, nullable=False),
    Column("idempotency_key", String(255)),
    # Revision 0002 (leases, retries, results): rows from before it got
    # max_attempts 3 and run_at = created_at.
    Column(
        "max_attempts",
        Integer,
        nullable=False,
        server_default=str(DEFAULT_MAX_ATTEMPTS),
    ),
    Column("run_at", UTCDateTime, nullable=False),
    Column("lease_expires_at", UTCDateTime),
    Column("result", JSONDocument),
    Column("updated_by", String(255)),
    # Revision 0003: the token subject that took the lease (with worker_id,
    # the holder), and the holder's last heartbeat.
    Column("lease_owner", String(255)),
    Column("heartbeat_at", UTCDateTime),
    # Revision 0004: an operator's cancel request (see service.cancel).
    Column("cancel_requested_at", UTCDateTime),
    CheckConstraint(status_in(JobStatus), name="ck_extraction_job_status"),
    CheckConstraint(
        f"priority BETWEEN {MIN_PRIORITY} AND {MAX_PRIORITY}",
        name="ck_extraction_job_priority",
    ),
    CheckConstraint("attempts >= 0", name="ck_extraction_job_attempts"),
    # The list filters, each in creation order; created_at is creation
    # order too (see CREATE_CLOCK), so its index also finds where a time
    # range starts in `seq`.
    Index("ix_extraction_job_document_id", "document_id", "seq"),
    Index("ix_extraction_job_status", "status", "seq"),
    Index("ix_extraction_job_worker", "worker_id", "seq"),
    Index("ix_extraction_job_created", "created_at", "seq"),
    # The claim query: pending jobs, most urgent first, then oldest.
    PartialIndex(
        "ix_extraction_job_pending_claim",
        text("priority DESC"),
        "seq",
        where=_status_is(JobStatus.PENDING),
    ),
    # /stats: the longest-waiting due job. Not partial: a second index on
    # just the pending jobs would compete with the claim's (see
    # repository._due).
    Index("ix_extraction_job_status_run_at", "status", "run_at"),
    # The sweep: leases that ran out, and finished jobs past retention.
    PartialIndex(
        "ix_extraction_job_lease",
        "lease_expires_at",
        where=_status_is(JobStatus.PROCESSING),
    ),
    PartialIndex(
        "ix_extraction_job_finished", "finished_at", where=text(status_in(FINISHED))
    ),
    # One job per idempotency key and caller; anonymous callers share ''.
    Index(
        "uq_extraction_job_idempotency",
        func.coalesce(text("created_by"), ""),
        "idempotency_key",
        unique=True,
    ),
)

# A job's append-only history: each entry written in the same transaction
# (on PostgreSQL, the same statement) as the change it records. No foreign
# key: retention deletes a job's events with it, explicitly.
EVENTS = Table(
    "extraction_job_event",
    metadata,
    Column("seq", Sequence, primary_key=True, autoincrement=True),
    Column("job_id", Uuid, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("type", String(32), nullable=False),
    Column("from_status", String(16)),
    Column("to_status", String(16)),
    Column("actor", String(255)),
    Column("worker_id", String(255)),
    Column("detail", JSONDocument),
    # Revision 0005: the id of the transaction that wrote it (0 on SQLite,
    # where one writer at a time makes `seq` commit order). The change feed
    # reads in (xid, seq) order, only below the oldest transaction still
    # running: see repository._feed.
    Column("xid", BigInteger, nullable=False, server_default="0"),
    Index("ix_extraction_job_event_job", "job_id", "seq"),
    Index("ix_extraction_job_event_feed", "xid", "seq"),
)

# Events to publish to EventBridge (with EVENT_BUS_NAME set), by their seq:
# written with the event, deleted once published (publisher.py).
OUTBOX = Table(
    "extraction_job_outbox",
    metadata,
    Column("event_seq", BigInteger, primary_key=True, autoincrement=False),
)

# One row: when the newest job was created. A create takes its row lock
# (held to its commit) and its new `created_at` from it: creates commit one
# at a time, in `seq` order, and `created_at` never goes back (whatever the
# clocks of the instances say), so a time range is a range of `seq`.
CREATE_CLOCK = Table(
    "extraction_job_create_clock",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),
)

# The key that signs list cursors unless `CURSOR_SECRET` is set: 32 random
# bytes (hex) the migration stored, one row, the same for every instance
# that uses this database. The application only reads it.
CURSOR_KEY = Table(
    "extraction_job_cursor_key",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(64), nullable=False),
)
