"""Queries over the `extraction_job` table, on SQLite or PostgreSQL alike.

Every method is ONE statement: one round trip on PostgreSQL, in autocommit
(see database.run). Statements are SQLAlchemy Core, and the rows they return
map straight to the contract model: no ORM session or object per request.
Concurrency is handled inside each statement (conditions in the WHERE
clause, `FOR UPDATE SKIP LOCKED`), never by holding locks across calls.
"""

import uuid
from collections.abc import Collection
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    CTE,
    BigInteger,
    Connection,
    Executable,
    Insert,
    Integer,
    Select,
    String,
    Text,
    Update,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from database import database_url_from_env, ping, run
from db_models import ExtractionJob, UTCDateTime
from models import Job, JobStatus
from schemas import job_from_row, to_values

JOBS = ExtractionJob.__table__
CLAIM_ORDER = (ExtractionJob.priority.desc(), ExtractionJob.seq)


class strictly_after(FunctionElement):
    """`max(now, earlier + 1 µs)`: a change's timestamp, strictly after the
    last one whatever the clock says, computed where the row is."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(strictly_after, "postgresql")
def _strictly_after_postgresql(element, compiler, **kw):
    now, earlier = list(element.clauses)
    return (
        f"GREATEST({compiler.process(now, **kw)}, "
        f"{compiler.process(earlier, **kw)} + INTERVAL '1 microsecond')"
    )


@compiles(strictly_after, "sqlite")
def _strictly_after_sqlite(element, compiler, **kw):
    # A Python function registered on every SQLite connection (database.py).
    now, earlier = list(element.clauses)
    return (
        f"strictly_after({compiler.process(now, **kw)}, "
        f"{compiler.process(earlier, **kw)})"
    )


# Statements are built once and run with bound parameters: SQLAlchemy then
# reuses not only the compiled SQL but also what it derives from the
# statement object itself (the result columns), per request.


@cache
def _by_id() -> Select:
    return select(JOBS).where(JOBS.c.id == bindparam("job_id", type_=JOBS.c.id.type))


@cache
def _by_idempotency_key() -> Select:
    return select(JOBS).where(
        func.coalesce(JOBS.c.created_by, "") == bindparam("created_by", type_=String),
        JOBS.c.idempotency_key == bindparam("key", type_=String),
    )


@cache
def _insert() -> Insert:
    # inline(): no `RETURNING seq`; nothing reads the new row's key.
    return insert(JOBS).inline()


@cache
def _list(by_document: bool, by_status: bool) -> Select:
    query = (
        select(JOBS)
        .order_by(JOBS.c.seq)
        .limit(bindparam("limit", type_=Integer))
        .offset(bindparam("offset", type_=BigInteger))
    )
    if by_document:
        query = query.where(JOBS.c.document_id == bindparam("document_id"))
    if by_status:
        query = query.where(JOBS.c.status == bindparam("status"))
    return query


def _list_params(
    document_id: str | None, status: JobStatus | None, limit: int, offset: int
) -> tuple[Select, dict[str, Any]]:
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if document_id is not None:
        params["document_id"] = document_id
    if status is not None:
        params["status"] = status.value
    return _list(document_id is not None, status is not None), params


def list_query(
    document_id: str | None, status: JobStatus | None, limit: int, offset: int
) -> Select:
    """The list statement with its values bound (for EXPLAIN and tests)."""
    statement, params = _list_params(document_id, status, limit, offset)
    return statement.params(**params)


def next_pending_jobs(limit: Any) -> CTE:
    """The `limit` most urgent pending jobs, locked, skipping locked ones.

    MATERIALIZED, so it is evaluated exactly once. As a plain `IN (subquery)`,
    PostgreSQL may plan a nested-loop semi-join that rescans the subquery for
    every outer row; each rescan skips the rows just updated and locks new
    ones, so one claim with LIMIT 1 took every pending job (caught by the
    tests).
    """
    return (
        select(JOBS.c.seq)
        .where(JOBS.c.status == JobStatus.PENDING.value)
        .order_by(*CLAIM_ORDER)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("next_jobs")
        .prefix_with("MATERIALIZED")
    )


def _claim_update(limit: Any, worker_id: Any, moment: Any) -> Update:
    """`WITH next_jobs AS MATERIALIZED (… FOR UPDATE SKIP LOCKED) UPDATE … RETURNING …`

    One statement, so one round trip. More work belongs in it as further
    CTEs (data-modifying CTEs are still one statement on PostgreSQL): e.g.
    a sweep of expired leases, or an INSERT into an events table that
    selects from this UPDATE's RETURNING.
    """
    next_jobs = next_pending_jobs(limit)
    return (
        update(JOBS)
        .where(
            JOBS.c.seq.in_(select(next_jobs.c.seq)),
            JOBS.c.status == JobStatus.PENDING.value,
        )
        .values(
            status=JobStatus.PROCESSING.value,
            worker_id=worker_id,
            started_at=moment,
            updated_at=moment,
            finished_at=None,
            attempts=JOBS.c.attempts + 1,
            version=JOBS.c.version + 1,
        )
        .returning(*JOBS.c)
    )


@cache
def _claim() -> Update:
    return _claim_update(
        bindparam("limit", type_=Integer),
        bindparam("claimer", type_=String),
        bindparam("moment", type_=UTCDateTime()),
    )


def _claim_params(worker_id: str, limit: int, now: datetime) -> dict[str, Any]:
    return {"claimer": worker_id, "limit": limit, "moment": now}


def claim_statement(worker_id: str, limit: int, now: datetime) -> Update:
    """The claim statement with its values in it (for EXPLAIN and benchmarks)."""
    return _claim_update(limit, worker_id, literal(now, UTCDateTime()))


@cache
def _transition(
    target: JobStatus,
    sources: frozenset[JobStatus],
    finished: bool,
    with_versions: bool,
) -> Update:
    """Move a job to `target` in one conditional UPDATE … RETURNING.

    It changes the row only if the job is in one of `sources` (or already
    at `target` with a different error message, which then is all that
    changes) and, `with_versions`, at one of the versions If-Match named.
    A move sets `finished_at` if `finished`, else clears it.
    """
    allowed = sorted(source.value for source in sources)
    moving = JOBS.c.status != target.value
    message = bindparam("message", type_=Text)
    changed_at = strictly_after(
        bindparam("moment", type_=UTCDateTime()), JOBS.c.updated_at
    )
    values: dict[str, Any] = {
        "status": target.value,
        "error_message": message,
        "updated_at": changed_at,
        "finished_at": case(
            (moving, changed_at if finished else null()),
            else_=JOBS.c.finished_at,
        ),
        "version": JOBS.c.version + 1,
    }
    if target == JobStatus.PROCESSING:
        values["started_at"] = case((moving, changed_at), else_=JOBS.c.started_at)
        values["attempts"] = JOBS.c.attempts + case((moving, 1), else_=0)
    only_message = and_(
        JOBS.c.status == target.value,
        JOBS.c.error_message.is_distinct_from(message),
    )
    condition = [
        JOBS.c.id == bindparam("job_id", type_=JOBS.c.id.type),
        or_(JOBS.c.status.in_(allowed), only_message),
    ]
    if with_versions:
        condition.append(JOBS.c.version.in_(bindparam("versions", expanding=True)))
    return update(JOBS).where(*condition).values(values).returning(*JOBS.c)


class IdempotencyKeyTaken(Exception):
    """Another job already holds this caller's idempotency key."""


class ExtractionJobRepository:
    def __init__(self, db_url: str | None = None) -> None:
        self.url = db_url or database_url_from_env()

    def ping(self) -> None:
        ping(self.url)

    def _one(
        self, statement: Executable, params: dict[str, Any], *, write: bool = False
    ) -> Job | None:
        def one(connection: Connection) -> Job | None:
            row = connection.execute(statement, params).mappings().first()
            return job_from_row(row) if row is not None else None

        return run(self.url, one, write=write)

    def _all(
        self, statement: Executable, params: dict[str, Any], *, write: bool = False
    ) -> list[Job]:
        def all_(connection: Connection) -> list[Job]:
            rows = connection.execute(statement, params).mappings()
            return [job_from_row(row) for row in rows]

        return run(self.url, all_, write=write)

    def add(self, job: Job, idempotency_key: str | None = None) -> Job:
        """One INSERT; a taken idempotency key is `IdempotencyKeyTaken`."""
        values = to_values(job, idempotency_key)
        try:
            run(
                self.url,
                lambda connection: connection.execute(_insert(), values),
                write=True,
            )
        except IntegrityError:
            if idempotency_key is None:
                raise
            raise IdempotencyKeyTaken(idempotency_key) from None
        return job

    def get(self, job_id: uuid.UUID) -> Job | None:
        return self._one(_by_id(), {"job_id": job_id})

    def get_by_idempotency_key(self, created_by: str | None, key: str) -> Job | None:
        params = {"created_by": created_by or "", "key": key}
        return self._one(_by_idempotency_key(), params)

    def list_jobs(
        self,
        *,
        document_id: str | None,
        status: JobStatus | None,
        limit: int,
        offset: int,
    ) -> list[Job]:
        return self._all(*_list_params(document_id, status, limit, offset))

    def update(
        self, job_id: uuid.UUID, expected_version: int, **changes: Any
    ) -> Job | None:
        """Apply `changes` only if the job is still at `expected_version`.

        Returns the updated job, or None when the job changed (or vanished)
        in between, so the caller can decide between retrying and a 412.
        """
        statement = (
            update(JOBS)
            .where(JOBS.c.id == job_id, JOBS.c.version == expected_version)
            .values(**changes, version=expected_version + 1)
            .returning(*JOBS.c)
        )
        return self._one(statement, {}, write=True)

    def transition(
        self,
        job_id: uuid.UUID,
        *,
        target: JobStatus,
        error_message: str | None,
        sources: Collection[JobStatus],
        versions: Collection[int] | None,
        finished: bool,
        now: datetime,
    ) -> Job | None:
        """Move the job to `target` along the state machine (see _transition).

        Returns the job after the move, or None when the conditions refused
        it; the caller re-reads the job to say why.
        """
        params: dict[str, Any] = {
            "job_id": job_id,
            "message": error_message,
            "moment": now,
        }
        if versions is not None:
            if not versions:
                return None  # If-Match named no version of ours: nothing matches
            params["versions"] = sorted(versions)
        statement = _transition(
            target, frozenset(sources), finished, versions is not None
        )
        return self._one(statement, params, write=True)

    def claim(self, *, worker_id: str, limit: int, now: datetime) -> list[Job]:
        """Move up to `limit` pending jobs to processing in one statement.

        On PostgreSQL, `FOR UPDATE SKIP LOCKED` lets concurrent claimers pass
        each other's rows instead of waiting or double-claiming; SQLite renders
        no locking clause and is serialised by its write lock instead.
        """
        params = _claim_params(worker_id, limit, now)

        def claimed(connection: Connection) -> list[Job]:
            rows = connection.execute(_claim(), params).mappings().all()
            # RETURNING has no order of its own.
            rows.sort(key=lambda row: (-row["priority"], row["seq"]))
            return [job_from_row(row) for row in rows]

        return run(self.url, claimed, write=True)

    def queue_gauges(self) -> tuple[int, int, datetime | None]:
        """Pending count, processing count, and the oldest pending job's
        `created_at`, in one query (for the scheduled gauges and /stats)."""
        pending = JOBS.c.status == JobStatus.PENDING.value
        processing = JOBS.c.status == JobStatus.PROCESSING.value
        query = select(
            func.count().filter(pending),
            func.count().filter(processing),
            func.min(JOBS.c.created_at).filter(pending),
        ).where(
            JOBS.c.status.in_([JobStatus.PENDING.value, JobStatus.PROCESSING.value])
        )
        pending_count, processing_count, oldest = run(
            self.url, lambda connection: connection.execute(query).one()
        )
        return pending_count, processing_count, oldest
