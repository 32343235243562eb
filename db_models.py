"""The `extraction_job` table in SQLAlchemy 2.0's typed declarative style."""

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    Uuid,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from models import DEFAULT_MAX_ATTEMPTS, MAX_PRIORITY, MIN_PRIORITY, JobStatus


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


class JSONDocument(TypeDecorator[Any]):
    """JSONB on PostgreSQL, JSON elsewhere; a JSON null stays SQL NULL, so
    "no metadata" is one value, not two.

    A decorator rather than `JSON().with_variant(JSONB())`: naming JSONB at
    import would load the whole PostgreSQL dialect on every cold start,
    SQLite too; this loads it when a PostgreSQL engine first needs it.
    """

    impl = JSON(none_as_null=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB(none_as_null=True))
        return dialect.type_descriptor(JSON(none_as_null=True))


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
SCHEMA_REVISIONS = ("0001_initial", "0002_job_lifecycle")

STATUS_VALUES = ", ".join(f"'{status.value}'" for status in JobStatus)
PENDING = text(f"status = '{JobStatus.PENDING.value}'")
PROCESSING = text(f"status = '{JobStatus.PROCESSING.value}'")
FINISHED = text(
    f"status IN ('{JobStatus.COMPLETED.value}', '{JobStatus.FAILED.value}')"
)


class Base(DeclarativeBase):
    pass


class ExtractionJob(Base):
    """One job per ingested document.

    `seq` is the creation order: a database-assigned counter, so listing and
    claiming stay deterministic even for jobs created in the same microsecond.
    The public identifier is the UUID `id`.
    """

    __tablename__ = "extraction_job"

    seq: Mapped[int] = mapped_column(Sequence, primary_key=True, autoincrement=True)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    document_id: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # `metadata` is reserved on declarative classes, hence the attribute name.
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column(
        "metadata", JSONDocument()
    )
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column(Integer, default=1)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # Revision 0002 (leases, retries, results): rows from before it got
    # max_attempts 3 and run_at = created_at.
    max_attempts: Mapped[int] = mapped_column(
        Integer, default=DEFAULT_MAX_ATTEMPTS, server_default=str(DEFAULT_MAX_ATTEMPTS)
    )
    run_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument())
    updated_by: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (
        CheckConstraint(
            f"status IN ({STATUS_VALUES})", name="ck_extraction_job_status"
        ),
        CheckConstraint(
            f"priority BETWEEN {MIN_PRIORITY} AND {MAX_PRIORITY}",
            name="ck_extraction_job_priority",
        ),
        CheckConstraint("attempts >= 0", name="ck_extraction_job_attempts"),
        # The list filters, each in creation order.
        Index("ix_extraction_job_document_id", "document_id", "seq"),
        Index("ix_extraction_job_status", "status", "seq"),
        # The claim query: pending jobs, most urgent first, then oldest.
        PartialIndex(
            "ix_extraction_job_pending_claim",
            text("priority DESC"),
            "seq",
            where=PENDING,
        ),
        # The sweep: leases that ran out, and finished jobs past retention.
        PartialIndex("ix_extraction_job_lease", "lease_expires_at", where=PROCESSING),
        PartialIndex("ix_extraction_job_finished", "finished_at", where=FINISHED),
        # One job per idempotency key and caller; anonymous callers share ''.
        Index(
            "uq_extraction_job_idempotency",
            func.coalesce(text("created_by"), ""),
            "idempotency_key",
            unique=True,
        ),
    )


class JobEventRow(Base):
    """One entry of a job's append-only history, written in the same
    transaction (on PostgreSQL, the same statement) as the change it records.

    No foreign key: retention deletes a job's events with it, explicitly.
    """

    __tablename__ = "extraction_job_event"

    seq: Mapped[int] = mapped_column(Sequence, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    type: Mapped[str] = mapped_column(String(32))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str | None] = mapped_column(String(16))
    actor: Mapped[str | None] = mapped_column(String(255))
    worker_id: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument())

    __table_args__ = (Index("ix_extraction_job_event_job", "job_id", "seq"),)


class CursorKey(Base):
    """The key that signs list cursors unless `CURSOR_SECRET` is set: 32
    random bytes (hex) the migration stored, one row, the same for every
    instance that uses this database. The application only reads it."""

    __tablename__ = "extraction_job_cursor_key"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64))
