"""Queries over the `extraction_job` table, on SQLite or PostgreSQL alike.

Each method is one short transaction and, for reads, one query. Rows are
converted to contract models before they leave, and concurrency is handled
with compare-and-swap on `version`, never by holding locks across calls.
"""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Select, Update, func, select, update
from sqlalchemy.exc import IntegrityError

from database import database_url_from_env, ping, session_scope
from db_models import ExtractionJob
from models import Job, JobStatus
from schemas import to_job, to_row

CLAIM_ORDER = (ExtractionJob.priority.desc(), ExtractionJob.seq)


def list_query(
    document_id: str | None, status: JobStatus | None, limit: int, offset: int
) -> Select[tuple[ExtractionJob]]:
    query = (
        select(ExtractionJob).order_by(ExtractionJob.seq).limit(limit).offset(offset)
    )
    if document_id is not None:
        query = query.where(ExtractionJob.document_id == document_id)
    if status is not None:
        query = query.where(ExtractionJob.status == status.value)
    return query


def claim_statement(worker_id: str, limit: int, now: datetime) -> Update:
    """`UPDATE … WHERE seq IN (next pending … FOR UPDATE SKIP LOCKED) RETURNING …`

    The pending rows are picked in a MATERIALIZED CTE, evaluated exactly once.
    As a plain `IN (subquery)`, PostgreSQL may plan a nested-loop semi-join
    that rescans the subquery for every outer row; each rescan skips the rows
    just updated and locks new ones, so one claim with LIMIT 1 took every
    pending job (caught by the tests).
    """
    pending = ExtractionJob.status == JobStatus.PENDING.value
    next_jobs = (
        select(ExtractionJob.seq)
        .where(pending)
        .order_by(*CLAIM_ORDER)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("next_jobs")
        .prefix_with("MATERIALIZED")
    )
    return (
        update(ExtractionJob)
        .where(ExtractionJob.seq.in_(select(next_jobs.c.seq)), pending)
        .values(
            status=JobStatus.PROCESSING.value,
            worker_id=worker_id,
            started_at=now,
            updated_at=now,
            finished_at=None,
            attempts=ExtractionJob.attempts + 1,
            version=ExtractionJob.version + 1,
        )
        .returning(ExtractionJob)
        .execution_options(synchronize_session=False)
    )


class IdempotencyKeyTaken(Exception):
    """Another job already holds this caller's idempotency key."""


class ExtractionJobRepository:
    def __init__(self, db_url: str | None = None) -> None:
        self.url = db_url or database_url_from_env()

    def ping(self) -> None:
        ping(self.url)

    def add(self, job: Job, idempotency_key: str | None = None) -> Job:
        try:
            with session_scope(self.url, write=True) as session:
                session.add(to_row(job, idempotency_key))
        except IntegrityError:
            if idempotency_key is None:
                raise
            raise IdempotencyKeyTaken(idempotency_key) from None
        return job

    def get(self, job_id: uuid.UUID) -> Job | None:
        with session_scope(self.url) as session:
            row = session.scalar(
                select(ExtractionJob).where(ExtractionJob.id == job_id)
            )
            return to_job(row) if row else None

    def get_by_idempotency_key(self, created_by: str | None, key: str) -> Job | None:
        with session_scope(self.url) as session:
            row = session.scalar(
                select(ExtractionJob).where(
                    func.coalesce(ExtractionJob.created_by, "") == (created_by or ""),
                    ExtractionJob.idempotency_key == key,
                )
            )
            return to_job(row) if row else None

    def list_jobs(
        self,
        *,
        document_id: str | None,
        status: JobStatus | None,
        limit: int,
        offset: int,
    ) -> list[Job]:
        query = list_query(document_id, status, limit, offset)
        with session_scope(self.url) as session:
            return [to_job(row) for row in session.scalars(query)]

    def update(
        self, job_id: uuid.UUID, expected_version: int, **changes: Any
    ) -> Job | None:
        """Apply `changes` only if the job is still at `expected_version`.

        Returns the updated job, or None when the job changed (or vanished)
        in between, so the caller can decide between retrying and a 412.
        """
        statement = (
            update(ExtractionJob)
            .where(
                ExtractionJob.id == job_id, ExtractionJob.version == expected_version
            )
            .values(**changes, version=expected_version + 1)
            .returning(ExtractionJob)
            .execution_options(synchronize_session=False)
        )
        with session_scope(self.url, write=True) as session:
            row = session.scalar(statement)
            return to_job(row) if row else None

    def claim(self, *, worker_id: str, limit: int, now: datetime) -> list[Job]:
        """Move up to `limit` pending jobs to processing in one statement.

        On PostgreSQL, `FOR UPDATE SKIP LOCKED` lets concurrent claimers pass
        each other's rows instead of waiting or double-claiming; SQLite renders
        no locking clause and is serialised by its write lock instead.
        """
        statement = claim_statement(worker_id, limit, now)
        with session_scope(self.url, write=True) as session:
            rows = session.scalars(statement).all()
            # RETURNING has no order of its own.
            rows.sort(key=lambda row: (-row.priority, row.seq))
            return [to_job(row) for row in rows]

    def queue_gauges(self) -> tuple[int, int, datetime | None]:
        """Pending count, processing count, and the oldest pending job's
        `created_at`, in one query (for the scheduled gauges and /stats)."""
        pending = ExtractionJob.status == JobStatus.PENDING.value
        processing = ExtractionJob.status == JobStatus.PROCESSING.value
        query = select(
            func.count().filter(pending),
            func.count().filter(processing),
            func.min(ExtractionJob.created_at).filter(pending),
        ).where(
            ExtractionJob.status.in_(
                [JobStatus.PENDING.value, JobStatus.PROCESSING.value]
            )
        )
        with session_scope(self.url) as session:
            pending_count, processing_count, oldest = session.execute(query).one()
            return pending_count, processing_count, oldest
