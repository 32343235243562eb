"""Queries over the `extraction_job` and `extraction_job_event` tables, on
SQLite or PostgreSQL alike.

Every request is ONE statement on PostgreSQL: one round trip, in autocommit
(see database.run). A change and the event that records it are written
together: on PostgreSQL in that one statement (data-modifying CTEs), on
SQLite in one `BEGIN IMMEDIATE` transaction. Statements are SQLAlchemy Core,
and the rows they return map straight to the contract model. Concurrency is
handled inside each statement (conditions in the WHERE clause, `FOR UPDATE
SKIP LOCKED`), never by holding locks across calls. Only the scheduled sweep
runs several statements, in short transactions of bounded size.
"""

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    ARRAY,
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
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from database import database_url_from_env, ping, prepared, run, transaction
from db_models import (
    CursorKey,
    ExtractionJob,
    JobEventRow,
    JSONDocument,
    UTCDateTime,
)
from models import EventType, Job, JobEvent, JobStats, JobStatus, StatusCounts
from schemas import job_from_row, to_event, to_values

JOBS = ExtractionJob.__table__
EVENTS = JobEventRow.__table__
CLAIM_ORDER = (ExtractionJob.priority.desc(), ExtractionJob.seq)
EVENT_COLUMNS = [
    "job_id",
    "at",
    "type",
    "from_status",
    "to_status",
    "actor",
    "worker_id",
    "detail",
]
# Expired leases failed per claim (the rest wait for the next claim or the
# scheduled sweep), so a claim stays O(claimed + this).
SWEEP_BATCH = 100
# Finished jobs deleted per retention transaction, and transactions per sweep.
RETENTION_BATCH = 500
MAX_RETENTION_BATCHES = 20
# pg_advisory_xact_lock key that orders creates (see _add_with_event).
CREATE_LOCK_ID = 0x45585431  # "EXT1"; migrations use "EXTR"

PENDING = JobStatus.PENDING.value
PROCESSING = JobStatus.PROCESSING.value
COMPLETED = JobStatus.COMPLETED.value
FAILED = JobStatus.FAILED.value
# The claim statement's count of the lease_expired events it wrote.
LEASES_EXPIRED = "leases_expired"


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="microseconds")


@dataclass(frozen=True)
class NewEvent:
    """An event to write with a change; job id and time come with the change."""

    type: EventType
    from_status: JobStatus | None
    to_status: JobStatus | None
    actor: str | None
    worker_id: str | None
    detail: dict[str, Any] | None = field(default=None)

    def values(self, job_id: uuid.UUID, at: datetime) -> dict[str, Any]:
        return {
            "job_id": job_id,
            "at": at,
            "type": self.type.value,
            "from_status": self.from_status.value if self.from_status else None,
            "to_status": self.to_status.value if self.to_status else None,
            "actor": self.actor,
            "worker_id": self.worker_id,
            "detail": self.detail,
        }


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
    return prepared(
        select(JOBS).where(JOBS.c.id == bindparam("job_id", type_=JOBS.c.id.type))
    )


@cache
def _by_idempotency_key() -> Select:
    return prepared(
        select(JOBS).where(
            func.coalesce(JOBS.c.created_by, "")
            == bindparam("created_by", type_=String),
            JOBS.c.idempotency_key == bindparam("key", type_=String),
        )
    )


@cache
def _insert() -> Insert:
    # inline(): no `RETURNING seq`; nothing reads the new row's key.
    return prepared(insert(JOBS).inline())


@cache
def _cursor_key() -> Select:
    return prepared(select(CursorKey.key).order_by(CursorKey.id).limit(1))


@cache
def _list(by_document: bool, by_status: bool, after: bool, with_key: bool) -> Select:
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
    if after:
        query = query.where(JOBS.c.seq > bindparam("after_seq", type_=BigInteger))
    if with_key:
        # The cursor key rides along the first page a process serves, so
        # loading it costs no round trip of its own.
        query = query.add_columns(_cursor_key().scalar_subquery().label("cursor_key"))
    # Planned per call when filtered by status: statuses are skewed (a long
    # pending queue, a few failed jobs), and only a plan that sees which one
    # is asked for reads the status index rather than every job in `seq` order.
    return query if by_status else prepared(query)


def _list_params(
    document_id: str | None,
    status: JobStatus | None,
    limit: int,
    offset: int,
    after_seq: int | None = None,
    with_key: bool = False,
) -> tuple[Select, dict[str, Any]]:
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if document_id is not None:
        params["document_id"] = document_id
    if status is not None:
        params["status"] = status.value
    if after_seq is not None:
        params["after_seq"] = after_seq
    statement = _list(
        document_id is not None, status is not None, after_seq is not None, with_key
    )
    return statement, params


def list_query(
    document_id: str | None,
    status: JobStatus | None,
    limit: int,
    offset: int,
    after_seq: int | None = None,
) -> Select:
    """The list statement with its values bound (for EXPLAIN and tests)."""
    statement, params = _list_params(document_id, status, limit, offset, after_seq)
    return statement.params(**params)


def _exhausted(now: datetime) -> Select:
    """Processing jobs whose lease ran out with no attempts left."""
    return (
        select(
            JOBS.c.seq,
            JOBS.c.id,
            JOBS.c.worker_id,
            JOBS.c.attempts,
            JOBS.c.max_attempts,
            JOBS.c.lease_expires_at,
        )
        .where(
            JOBS.c.status == PROCESSING,
            JOBS.c.lease_expires_at <= now,
            JOBS.c.attempts >= JOBS.c.max_attempts,
        )
        .order_by(JOBS.c.lease_expires_at)
        .limit(SWEEP_BATCH)
        .with_for_update(skip_locked=True)
    )


# What the claim needs of a job it may take: lapsed leases and due jobs alike.
_CANDIDATE_COLUMNS = (
    JOBS.c.seq,
    JOBS.c.priority,
    JOBS.c.status,
    JOBS.c.worker_id,
    JOBS.c.attempts,
    JOBS.c.max_attempts,
    JOBS.c.lease_expires_at,
)


def _lapsed(now: datetime, limit: int) -> Select:
    """Processing jobs whose lease ran out and that may be tried again."""
    return (
        select(*_CANDIDATE_COLUMNS)
        .where(
            JOBS.c.status == PROCESSING,
            JOBS.c.lease_expires_at <= now,
            JOBS.c.attempts < JOBS.c.max_attempts,
        )
        # Longest expired first, in index order: the claim reads `limit` of
        # them, however many leases have run out (the priority order then
        # applies among these and the due jobs).
        .order_by(JOBS.c.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def _due(now: datetime, limit: int) -> Select:
    """Pending jobs whose `run_at` has come, most urgent first, then oldest."""
    return (
        select(*_CANDIDATE_COLUMNS)
        .where(JOBS.c.status == PENDING, JOBS.c.run_at <= now)
        .order_by(JOBS.c.priority.desc(), JOBS.c.seq)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def expiry_message(attempts: int) -> str:
    return f"lease expired after {attempts} attempts"


def _expiry_detail(attempts: Any, max_attempts: Any, lease: Any) -> dict[str, Any]:
    return {
        "attempts": attempts,
        "max_attempts": max_attempts,
        "lease_expires_at": lease,
    }


def _lease_expired(row: Any, to_status: JobStatus) -> NewEvent:
    """The event of a lapsed lease read on SQLite: the job failed for good or
    went back to pending."""
    return NewEvent(
        EventType.LEASE_EXPIRED,
        JobStatus.PROCESSING,
        to_status,
        None,
        row.worker_id,
        _expiry_detail(row.attempts, row.max_attempts, iso(row.lease_expires_at)),
    )


def _pg_utc_text(column: Any) -> Any:
    """A timestamptz as the API writes it: 2026-01-01T00:00:00.000000+00:00."""
    return func.to_char(
        func.timezone("UTC", column), 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'
    )


def _failed_values(now: datetime) -> dict[str, Any]:
    return {
        "status": FAILED,
        "finished_at": now,
        "updated_at": now,
        "lease_expires_at": None,
        "version": JOBS.c.version + 1,
        "updated_by": None,
    }


def _claimed_values(
    worker_id: str, now: datetime, lease_until: datetime, actor: str | None
) -> dict[str, Any]:
    return {
        "status": PROCESSING,
        "worker_id": worker_id,
        "started_at": now,
        "updated_at": now,
        "finished_at": None,
        "lease_expires_at": lease_until,
        "attempts": JOBS.c.attempts + 1,
        "version": JOBS.c.version + 1,
        "updated_by": actor,
    }


def _claim_pg(
    worker_id: Any, limit: Any, now: Any, lease_until: Any, lease_text: Any, actor: Any
) -> Select:
    """PostgreSQL: the sweep, the claim and their events in ONE statement.

    - `exhausted`/`failed`: expired leases with no attempts left become failed;
    - `due` and `lapsed`: pending jobs whose run_at has come, and processing
      jobs whose lease ran out (claimable again at once), each picked through
      its partial index with `FOR UPDATE SKIP LOCKED` in a MATERIALIZED CTE,
      evaluated exactly once (as a plain `IN (subquery)` PostgreSQL may rescan
      it per outer row, locking and claiming more rows than asked);
    - `picked`: the best `limit` of both, priority desc, then oldest;
    - `claimed`: the UPDATE; `events`: lease_expired and claimed rows.

    Every part sees the same snapshot, and the parts touch disjoint rows
    (attempts >= max_attempts vs <), so no row is updated twice. Each row
    returned is a claimed job with `leases_expired`, the number of
    lease_expired events written; with nothing claimed, one row of NULLs
    carries it.
    """
    exhausted = _exhausted(now).cte("exhausted").prefix_with("MATERIALIZED")
    failed = (
        update(JOBS)
        .where(JOBS.c.seq == exhausted.c.seq)
        .values(
            **_failed_values(now),
            error_message=func.concat(
                "lease expired after ", JOBS.c.attempts, " attempts"
            ),
        )
        .returning(
            JOBS.c.id,
            JOBS.c.attempts,
            JOBS.c.max_attempts,
            exhausted.c.worker_id,
            exhausted.c.lease_expires_at,
        )
        .cte("failed")
    )
    due = _due(now, limit).cte("due").prefix_with("MATERIALIZED")
    lapsed = _lapsed(now, limit).cte("lapsed").prefix_with("MATERIALIZED")
    candidates = union_all(select(due), select(lapsed)).subquery("candidates")
    picked = (
        select(candidates)
        .order_by(candidates.c.priority.desc(), candidates.c.seq)
        .limit(limit)
        .cte("picked")
        .prefix_with("MATERIALIZED")
    )
    claimed = (
        update(JOBS)
        .where(JOBS.c.seq == picked.c.seq)
        .values(**_claimed_values(worker_id, now, lease_until, actor))
        .returning(*JOBS.c)
        .cte("claimed")
    )
    at = cast(now, UTCDateTime())

    def event(order: int, *columns: Any) -> Select:
        return select(literal(order).label("ord"), *columns)

    expired_failed = event(
        1,
        failed.c.id,
        at,
        literal(EventType.LEASE_EXPIRED.value),
        literal(PROCESSING),
        literal(FAILED),
        null(),
        failed.c.worker_id,
        func.jsonb_build_object(
            "attempts",
            failed.c.attempts,
            "max_attempts",
            failed.c.max_attempts,
            "lease_expires_at",
            _pg_utc_text(failed.c.lease_expires_at),
        ),
    )
    expired_reclaimed = event(
        2,
        claimed.c.id,
        at,
        literal(EventType.LEASE_EXPIRED.value),
        literal(PROCESSING),
        literal(PENDING),
        null(),
        picked.c.worker_id,
        func.jsonb_build_object(
            "attempts",
            picked.c.attempts,
            "max_attempts",
            picked.c.max_attempts,
            "lease_expires_at",
            _pg_utc_text(picked.c.lease_expires_at),
        ),
    ).where(claimed.c.seq == picked.c.seq, picked.c.status == PROCESSING)
    claimed_events = event(
        3,
        claimed.c.id,
        at,
        literal(EventType.CLAIMED.value),
        literal(PENDING),
        literal(PROCESSING),
        actor,
        worker_id,
        func.jsonb_build_object(
            "attempt", claimed.c.attempts, "lease_expires_at", lease_text
        ),
    )
    events_union = union_all(
        expired_failed, expired_reclaimed, claimed_events
    ).subquery("new_events")
    events = (
        insert(EVENTS)
        .from_select(
            EVENT_COLUMNS,
            select(*list(events_union.c)[1:]).order_by(events_union.c.ord),
        )
        .returning(EVENTS.c.type)
        .cte("events")
    )
    expired = (
        select(func.count().label(LEASES_EXPIRED))
        .where(events.c.type == EventType.LEASE_EXPIRED.value)
        .subquery("expired")
    )
    return select(expired.c[LEASES_EXPIRED], claimed).select_from(
        expired.outerjoin(claimed, true())
    )


@cache
def _claim() -> Select:
    """The claim statement, built once and run with bound parameters."""
    return prepared(
        _claim_pg(
            bindparam("claimer", type_=String),
            bindparam("limit", type_=Integer),
            bindparam("moment", type_=UTCDateTime()),
            bindparam("lease_until", type_=UTCDateTime()),
            bindparam("lease_text", type_=String),
            bindparam("actor", type_=String),
        )
    )


def _claim_params(
    worker_id: str, limit: int, now: datetime, lease_until: datetime, actor: str | None
) -> dict[str, Any]:
    return {
        "claimer": worker_id,
        "limit": limit,
        "moment": now,
        "lease_until": lease_until,
        "lease_text": iso(lease_until),
        "actor": actor,
    }


def claim_query(
    worker_id: str,
    limit: int,
    now: datetime,
    lease_until: datetime,
    actor: str | None,
) -> tuple[Select, dict[str, Any]]:
    """The claim statement and its parameters, as the repository runs them
    (for benchmarks that send what the app sends)."""
    return _claim(), _claim_params(worker_id, limit, now, lease_until, actor)


def claim_statement(
    worker_id: str,
    limit: int,
    now: datetime,
    lease_until: datetime,
    actor: str | None,
) -> Select:
    """The claim statement with its values bound (for EXPLAIN and benchmarks)."""
    statement, params = claim_query(worker_id, limit, now, lease_until, actor)
    return statement.params(**params)


@cache
def _transition(
    target: JobStatus,
    sources: frozenset[JobStatus],
    finished: bool,
    with_versions: bool,
    with_worker: bool,
    with_result: bool,
    with_retry: bool,
    postgres: bool,
) -> Executable:
    """Move a job to `target` in one conditional UPDATE … RETURNING, and on
    PostgreSQL write its event in the same statement.

    It changes the row only if the job is in one of `sources` (or already at
    `target` with something else to change: the error message or the
    result, but never `with_retry`) and, `with_versions`, at one of the
    versions If-Match named; `with_worker`, a processing job only if that
    worker holds it. The row is read as `old` in the same statement, and only
    updated while still at that version, so the event's `from_status` is
    exactly the status the change started from.
    """
    allowed = sorted(source.value for source in sources)
    old = JOBS.alias("old")
    before = (
        select(
            old.c.seq.label("old_seq"),
            old.c.status.label("old_status"),
            old.c.version.label("old_version"),
        )
        .where(old.c.id == bindparam("job_id", type_=JOBS.c.id.type))
        .subquery("before")
    )
    moving = JOBS.c.status != target.value
    message = bindparam("message", type_=Text)
    moment = bindparam("moment", type_=UTCDateTime())
    worker = bindparam("worker", type_=String)
    actor = bindparam("actor", type_=String)
    result = bindparam("result", type_=JSONDocument())
    changed_at = strictly_after(moment, JOBS.c.updated_at)
    values: dict[str, Any] = {
        "status": target.value,
        "error_message": message,
        "updated_at": changed_at,
        "finished_at": case(
            (moving, changed_at if finished else null()),
            else_=JOBS.c.finished_at,
        ),
        "version": JOBS.c.version + 1,
        "updated_by": actor,
    }
    if target == JobStatus.PROCESSING:
        values["started_at"] = case((moving, changed_at), else_=JOBS.c.started_at)
        values["attempts"] = JOBS.c.attempts + case((moving, 1), else_=0)
        # Taken by hand rather than claimed: it still gets a lease.
        values["lease_expires_at"] = case(
            (moving, bindparam("lease_until", type_=UTCDateTime())),
            else_=JOBS.c.lease_expires_at,
        )
        values["worker_id"] = case((moving, worker), else_=JOBS.c.worker_id)
    else:
        values["lease_expires_at"] = null()
    if target == JobStatus.COMPLETED:
        values["result"] = (
            result if with_result else case((moving, null()), else_=JOBS.c.result)
        )
    if target == JobStatus.PENDING:
        run_at = bindparam("run_at", type_=UTCDateTime())
        values["run_at"] = (
            run_at if with_retry else case((moving, moment), else_=JOBS.c.run_at)
        )
    something_else = [JOBS.c.error_message.is_distinct_from(message)]
    if with_result:
        something_else.append(JOBS.c.result.is_distinct_from(result))
    same_status = and_(JOBS.c.status == target.value, or_(*something_else))
    condition = [
        JOBS.c.seq == before.c.old_seq,
        JOBS.c.version == before.c.old_version,
        # A retry is a move: never a change within the status.
        JOBS.c.status.in_(allowed)
        if with_retry
        else or_(JOBS.c.status.in_(allowed), same_status),
    ]
    if with_versions and postgres:
        # One array, however many tags If-Match named: the same statement
        # every time, so it can be prepared (BIGINT: a tag beyond INTEGER
        # matches nothing, as with IN).
        versions = bindparam("versions", type_=ARRAY(BigInteger))
        condition.append(JOBS.c.version == any_(versions))
    elif with_versions:
        condition.append(JOBS.c.version.in_(bindparam("versions", expanding=True)))
    if with_worker:
        condition.append(or_(JOBS.c.status != PROCESSING, JOBS.c.worker_id == worker))
    if not postgres:
        # SQLite's RETURNING cannot name the FROM subquery; its caller reads
        # the old status first, under the same write lock.
        return prepared(
            update(JOBS).where(*condition).values(values).returning(*JOBS.c)
        )
    statement = (
        update(JOBS)
        .where(*condition)
        .values(values)
        .returning(*JOBS.c, before.c.old_status)
    )
    changed = statement.cte("changed")
    kind = case(
        (changed.c.old_status == target.value, EventType.UPDATED.value),
        else_=(
            EventType.RETRIED.value
            if target == JobStatus.PENDING
            else EventType.STATUS_CHANGED.value
        ),
    )
    events = (
        insert(EVENTS)
        .from_select(
            EVENT_COLUMNS,
            select(
                changed.c.id,
                changed.c.updated_at,
                kind,
                changed.c.old_status,
                changed.c.status,
                actor,
                func.coalesce(worker, changed.c.worker_id),
                bindparam("detail", type_=JSONDocument()),
            ),
        )
        .returning(EVENTS.c.seq)
        .cte("events")
    )
    return prepared(select(changed).add_cte(events))


def _transition_event(
    row: Any, old_status: str, target: JobStatus, params: dict[str, Any]
) -> dict:
    """The event of a transition, from its RETURNING row (SQLite's path)."""
    if old_status == target.value:
        kind = EventType.UPDATED
    elif target == JobStatus.PENDING:
        kind = EventType.RETRIED
    else:
        kind = EventType.STATUS_CHANGED
    return {
        "job_id": row["id"],
        "at": row["updated_at"],
        "type": kind.value,
        "from_status": old_status,
        "to_status": row["status"],
        "actor": params["actor"],
        "worker_id": params["worker"] or row["worker_id"],
        "detail": params["detail"],
    }


@cache
def _add_with_event() -> Insert:
    """PostgreSQL: the INSERT and its `created` event in one statement."""
    # Creates take their place in line before their `seq`, and keep it until
    # they commit: so `seq` order is commit order, and a cursor walk (a keyset
    # on `seq`) can never pass a job that commits later with a smaller one.
    in_line = select(func.pg_advisory_xact_lock(CREATE_LOCK_ID).label("in_line")).cte(
        "in_line"
    )
    columns = [column for column in JOBS.c if column.name != "seq"]
    new_job = (
        insert(JOBS)
        .from_select(
            [column.name for column in columns],
            select(
                *[bindparam(column.name, type_=column.type) for column in columns]
            ).select_from(in_line),
        )
        .returning(JOBS.c.id, JOBS.c.created_at, JOBS.c.created_by)
        .cte("new_job")
    )
    return prepared(
        insert(EVENTS).from_select(
            EVENT_COLUMNS,
            select(
                new_job.c.id,
                new_job.c.created_at,
                literal(EventType.CREATED.value),
                null(),
                literal(PENDING),
                new_job.c.created_by,
                null(),
                bindparam("detail", type_=JSONDocument()),
            ),
        )
    )


def _heartbeat_update() -> Update:
    return (
        update(JOBS)
        .where(
            JOBS.c.id == bindparam("job_id", type_=JOBS.c.id.type),
            JOBS.c.status == PROCESSING,
            JOBS.c.worker_id == bindparam("worker", type_=String),
        )
        .values(
            lease_expires_at=bindparam("lease_until", type_=UTCDateTime()),
            updated_at=strictly_after(
                bindparam("moment", type_=UTCDateTime()), JOBS.c.updated_at
            ),
            version=JOBS.c.version + 1,
            updated_by=bindparam("actor", type_=String),
        )
        .returning(*JOBS.c)
    )


@cache
def _heartbeat() -> Select:
    """PostgreSQL, one statement: the update, its event, and (from the same
    snapshot, so as it was before) the job when nothing changed."""
    changed = _heartbeat_update().cte("changed")
    events = (
        insert(EVENTS)
        .from_select(
            EVENT_COLUMNS,
            select(
                changed.c.id,
                changed.c.updated_at,
                literal(EventType.HEARTBEAT.value),
                literal(PROCESSING),
                literal(PROCESSING),
                changed.c.updated_by,
                changed.c.worker_id,
                bindparam("detail", type_=JSONDocument()),
            ),
        )
        .returning(EVENTS.c.seq)
        .cte("events")
    )
    before = JOBS.alias("before")
    return prepared(
        select(
            *changed.c,
            *[column.label(f"before_{column.name}") for column in before.c],
        )
        .select_from(before.outerjoin(changed, true()))
        .where(before.c.id == bindparam("job_id", type_=JOBS.c.id.type))
        .add_cte(events)
    )


class IdempotencyKeyTaken(Exception):
    """Another job already holds this caller's idempotency key."""


@dataclass(frozen=True)
class HeartbeatOutcome:
    """`job` after the heartbeat, or (not `extended`) as it was; None: no such job."""

    extended: bool
    job: Job | None


@dataclass(frozen=True)
class ClaimOutcome:
    """The jobs a claim took, and how many expired leases its sweep handled
    (failed for good, or taken again by this claim)."""

    jobs: list[Job]
    leases_expired: int = 0


@dataclass(frozen=True)
class SweepOutcome:
    failed: int = 0
    released: int = 0
    deleted: int = 0


class ExtractionJobRepository:
    def __init__(self, db_url: str | None = None) -> None:
        self.url = db_url or database_url_from_env()
        self.is_postgres = self.url.startswith("postgresql")

    def ping(self) -> None:
        ping(self.url)

    def _one(
        self, statement: Executable, params: dict[str, Any], *, write: bool = False
    ) -> Job | None:
        def one(connection: Connection) -> Job | None:
            row = connection.execute(statement, params).mappings().first()
            return job_from_row(row) if row is not None else None

        return run(self.url, one, write=write)

    def add(
        self,
        job: Job,
        idempotency_key: str | None = None,
        event: NewEvent | None = None,
    ) -> Job:
        """One INSERT (with its `created` event, in the same statement on
        PostgreSQL); a taken idempotency key is `IdempotencyKeyTaken`."""
        values = to_values(job, idempotency_key)

        def add(connection: Connection) -> None:
            if event is None:
                connection.execute(_insert(), values)
            elif self.is_postgres:
                connection.execute(
                    _add_with_event(), {**values, "detail": event.detail}
                )
            else:
                connection.execute(_insert(), values)
                connection.execute(
                    insert(EVENTS), event.values(values["id"], job.created_at)
                )

        try:
            run(self.url, add, write=True)
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
        after_seq: int | None = None,
        with_key: bool = False,
    ) -> tuple[list[Job], int | None, bool, str | None]:
        """A page in creation order: the jobs, the last one's `seq`, whether
        more follow (one row more is read to know), and `with_key` the cursor
        key when there were rows."""
        statement, params = _list_params(
            document_id, status, limit + 1, offset, after_seq, with_key
        )

        def page(connection: Connection) -> list[Any]:
            return connection.execute(statement, params).mappings().all()

        rows = run(self.url, page)
        more = len(rows) > limit
        key = rows[0]["cursor_key"] if with_key and rows else None
        rows = rows[:limit]
        last_seq = rows[-1]["seq"] if rows else None
        return [job_from_row(row) for row in rows], last_seq, more, key

    def cursor_key(self) -> str | None:
        """The stored cursor key (None if the row is gone)."""
        return run(
            self.url, lambda connection: connection.execute(_cursor_key()).scalar()
        )

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
        worker_id: str | None = None,
        result: dict[str, Any] | None = None,
        run_at: datetime | None = None,
        lease_until: datetime | None = None,
        actor: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> tuple[Job, bool] | None:
        """Move the job to `target` along the state machine (see _transition),
        with its event.

        Returns the job after the change and whether its status moved, or None
        when the conditions refused it; the caller re-reads the job to say why.
        """
        params: dict[str, Any] = {
            "job_id": job_id,
            "message": error_message,
            "moment": now,
            "worker": worker_id,
            "actor": actor,
            "detail": detail,
        }
        if versions is not None:
            if not versions:
                return None  # If-Match named no version of ours: nothing matches
            params["versions"] = sorted(versions)
        if target == JobStatus.PROCESSING:
            params["lease_until"] = lease_until
        if result is not None:
            params["result"] = result
        if run_at is not None:
            params["run_at"] = run_at
        statement = _transition(
            target,
            frozenset(sources),
            finished,
            versions is not None,
            worker_id is not None,
            result is not None,
            run_at is not None,
            self.is_postgres,
        )

        def move(connection: Connection) -> tuple[Job, bool] | None:
            if self.is_postgres:
                row = connection.execute(statement, params).mappings().first()
                if row is None:
                    return None
                return job_from_row(row), row["old_status"] != target.value
            old_status = connection.execute(
                select(JOBS.c.status).where(JOBS.c.id == job_id)
            ).scalar()
            row = connection.execute(statement, params).mappings().first()
            if row is None:
                return None
            connection.execute(
                insert(EVENTS), _transition_event(row, old_status, target, params)
            )
            return job_from_row(row), old_status != target.value

        return run(self.url, move, write=True)

    def heartbeat(
        self,
        job_id: uuid.UUID,
        *,
        worker_id: str,
        now: datetime,
        lease_until: datetime,
        actor: str | None,
    ) -> HeartbeatOutcome:
        """Extend the lease of a processing job held by `worker_id`."""
        params = {
            "job_id": job_id,
            "worker": worker_id,
            "moment": now,
            "lease_until": lease_until,
            "actor": actor,
            "detail": {"lease_expires_at": iso(lease_until)},
        }

        def beat(connection: Connection) -> HeartbeatOutcome:
            if self.is_postgres:
                row = connection.execute(_heartbeat(), params).mappings().first()
                if row is None:
                    return HeartbeatOutcome(False, None)
                if row["seq"] is not None:
                    return HeartbeatOutcome(True, job_from_row(row))
                before = {
                    column.name: row[f"before_{column.name}"] for column in JOBS.c
                }
                return HeartbeatOutcome(False, job_from_row(before))
            row = connection.execute(_heartbeat_update(), params).mappings().first()
            if row is not None:
                event = NewEvent(
                    EventType.HEARTBEAT,
                    JobStatus.PROCESSING,
                    JobStatus.PROCESSING,
                    actor,
                    worker_id,
                    params["detail"],
                )
                connection.execute(
                    insert(EVENTS), event.values(job_id, row["updated_at"])
                )
                return HeartbeatOutcome(True, job_from_row(row))
            current = connection.execute(_by_id(), params).mappings().first()
            return HeartbeatOutcome(False, job_from_row(current) if current else None)

        return run(self.url, beat, write=True)

    def claim(
        self,
        *,
        worker_id: str,
        limit: int,
        now: datetime,
        lease_until: datetime,
        actor: str | None = None,
    ) -> ClaimOutcome:
        """Sweep expired leases, then move up to `limit` due jobs to processing.

        On PostgreSQL this is one statement (`claim_statement`), and `FOR
        UPDATE SKIP LOCKED` lets concurrent claimers pass each other's rows
        instead of waiting or double-claiming. SQLite is serialised by its
        write lock and runs the same steps as several statements in one
        `BEGIN IMMEDIATE` transaction.
        """

        def claimed(connection: Connection) -> tuple[list[Any], int]:
            if self.is_postgres:
                params = _claim_params(worker_id, limit, now, lease_until, actor)
                rows = connection.execute(_claim(), params).mappings().all()
                expired = rows[0][LEASES_EXPIRED] if rows else 0
                return [row for row in rows if row["seq"] is not None], expired
            failed = self._fail_exhausted(connection, now)
            rows, reclaimed = self._claim_steps(
                connection, worker_id, limit, now, lease_until, actor
            )
            return rows, failed + reclaimed

        rows, expired = run(self.url, claimed, write=True)
        # RETURNING has no order of its own.
        rows = sorted(rows, key=lambda row: (-row["priority"], row["seq"]))
        return ClaimOutcome([job_from_row(row) for row in rows], expired)

    def _fail_exhausted(self, connection: Connection, now: datetime) -> int:
        rows = connection.execute(_exhausted(now)).all()
        for row in rows:
            connection.execute(
                update(JOBS)
                .where(JOBS.c.seq == row.seq)
                .values(
                    **_failed_values(now), error_message=expiry_message(row.attempts)
                )
            )
        if rows:
            connection.execute(
                insert(EVENTS),
                [
                    _lease_expired(row, JobStatus.FAILED).values(row.id, now)
                    for row in rows
                ],
            )
        return len(rows)

    def _claim_steps(
        self,
        connection: Connection,
        worker_id: str,
        limit: int,
        now: datetime,
        lease_until: datetime,
        actor: str | None,
    ) -> tuple[list[Any], int]:
        """The claimed rows, and how many of them had an expired lease."""
        candidates = [
            *connection.execute(_due(now, limit)).all(),
            *connection.execute(_lapsed(now, limit)).all(),
        ]
        picked = sorted(candidates, key=lambda row: (-row.priority, row.seq))[:limit]
        if not picked:
            return [], 0
        rows = (
            connection.execute(
                update(JOBS)
                .where(JOBS.c.seq.in_([row.seq for row in picked]))
                .values(**_claimed_values(worker_id, now, lease_until, actor))
                .returning(*JOBS.c)
            )
            .mappings()
            .all()
        )
        by_seq = {row["seq"]: row for row in rows}
        events = []
        for row in picked:
            job = by_seq[row.seq]
            if row.status == PROCESSING:
                events.append(
                    _lease_expired(row, JobStatus.PENDING).values(job["id"], now)
                )
            events.append(
                NewEvent(
                    EventType.CLAIMED,
                    JobStatus.PENDING,
                    JobStatus.PROCESSING,
                    actor,
                    worker_id,
                    {"attempt": job["attempts"], "lease_expires_at": iso(lease_until)},
                ).values(job["id"], now)
            )
        connection.execute(insert(EVENTS), events)
        return rows, sum(row.status == PROCESSING for row in picked)

    def _release_lapsed(self, connection: Connection, now: datetime) -> int:
        """Expired leases with attempts left go back to pending (the sweep's
        part; a claim takes such jobs directly)."""
        rows = connection.execute(
            _lapsed(now, SWEEP_BATCH).add_columns(JOBS.c.id)
        ).all()
        if not rows:
            return 0
        connection.execute(
            update(JOBS)
            .where(JOBS.c.seq.in_([row.seq for row in rows]))
            .values(
                status=PENDING,
                lease_expires_at=None,
                run_at=now,
                updated_at=now,
                version=JOBS.c.version + 1,
                updated_by=None,
            )
        )
        connection.execute(
            insert(EVENTS),
            [
                _lease_expired(row, JobStatus.PENDING).values(row.id, now)
                for row in rows
            ],
        )
        return len(rows)

    def sweep_leases(self, now: datetime) -> SweepOutcome:
        """One batch of expired leases: exhausted ones fail, the others go
        back to pending; each with its lease_expired event."""
        with transaction(self.url) as connection:
            failed = self._fail_exhausted(connection, now)
            released = self._release_lapsed(connection, now)
        return SweepOutcome(failed=failed, released=released)

    def delete_finished(self, finished_before: datetime) -> int:
        """One bounded batch of retention: completed/failed jobs finished
        before the cutoff, and their events. Returns how many jobs went."""
        with transaction(self.url) as connection:
            rows = connection.execute(
                select(JOBS.c.seq, JOBS.c.id)
                .where(
                    JOBS.c.status.in_([COMPLETED, FAILED]),
                    JOBS.c.finished_at < finished_before,
                )
                .order_by(JOBS.c.finished_at)
                .limit(RETENTION_BATCH)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return 0
            connection.execute(
                delete(EVENTS).where(EVENTS.c.job_id.in_([row.id for row in rows]))
            )
            connection.execute(
                delete(JOBS).where(JOBS.c.seq.in_([row.seq for row in rows]))
            )
            return len(rows)

    def events(self, job_id: uuid.UUID) -> list[JobEvent] | None:
        """The job's history, oldest first; None when there is no such job.
        One query: the job left-joined to its events."""
        query = (
            select(JOBS.c.id.label("the_job"), *EVENTS.c)
            .select_from(JOBS.outerjoin(EVENTS, EVENTS.c.job_id == JOBS.c.id))
            .where(JOBS.c.id == job_id)
            .order_by(EVENTS.c.seq)
        )
        rows = run(self.url, lambda c: c.execute(query).mappings().all())
        if not rows:
            return None
        return [to_event(row) for row in rows if row["seq"] is not None]

    def stats(self, now: datetime) -> JobStats:
        """Counts per status, the oldest pending job's age and the expired
        leases, in one query of index-served subqueries."""

        def count(*conditions: Any) -> Any:
            return (
                select(func.count())
                .select_from(JOBS)
                .where(*conditions)
                .scalar_subquery()
            )

        statuses = [status.value for status in JobStatus]
        query = select(
            *[count(JOBS.c.status == status) for status in statuses],
            select(JOBS.c.created_at)
            .where(JOBS.c.status == PENDING)
            .order_by(JOBS.c.seq)
            .limit(1)
            .scalar_subquery(),
            count(JOBS.c.status == PROCESSING, JOBS.c.lease_expires_at <= now),
        )
        row = run(self.url, lambda c: c.execute(query).one())
        *counts, oldest, expired = row
        return JobStats(
            counts=StatusCounts(**dict(zip(statuses, counts, strict=True))),
            oldest_pending_age_seconds=None
            if oldest is None
            else max(0.0, (now - oldest).total_seconds()),
            expired_leases=expired,
        )
