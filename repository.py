"""Queries over the jobs and their events, on SQLite or PostgreSQL alike.

Every write is described here once, as a `drivers.Change` (the jobs it
picks, their new values, the events it records, each an expression over the
row), and run by the driver of the database in use: one statement on
PostgreSQL, one short transaction on SQLite (drivers.py). Reads are
SQLAlchemy Core statements, the same on both. Every request is one
statement on PostgreSQL: one round trip, in autocommit (database.run).
Concurrency is settled inside each statement (conditions in the WHERE
clause, row locks, `SKIP LOCKED`), never by holding locks across calls.
"""

import uuid
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    Select,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    null,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError

import drivers
from database import database_url_from_env, ping, prepared, run, transaction
from db_models import CURSOR_KEY, EVENTS, JOBS, JSONDocument, UTCDateTime
from drivers import JOB_ID, Change, Event, ListOf, Pick, Row, one_of
from models import EventType, Job, JobEvent, JobStats, JobStatus, StatusCounts
from schemas import job_from_row, to_event, to_values

# Expired leases handled per claim (the rest wait for the next claim or the
# scheduled sweep), so a claim stays O(claimed + this).
SWEEP_BATCH = 100
# Finished jobs deleted per retention transaction, and transactions per sweep.
RETENTION_BATCH = 500
MAX_RETENTION_BATCHES = 20

PENDING = JobStatus.PENDING.value
PROCESSING = JobStatus.PROCESSING.value
COMPLETED = JobStatus.COMPLETED.value
FAILED = JobStatus.FAILED.value

# The parameters of the writes, by name: none is named like a column, which
# an UPDATE would take as one more value to SET.
MOMENT = bindparam("moment", type_=UTCDateTime())
ACTOR = bindparam("actor", type_=String)
WORKER = bindparam("worker", type_=String)
LEASE_UNTIL = bindparam("lease_until", type_=UTCDateTime())
LIMIT = bindparam("limit", type_=Integer)
MESSAGE = bindparam("message", type_=Text)
RESULT = bindparam("new_result", type_=JSONDocument)
RUN_AT = bindparam("new_run_at", type_=UTCDateTime())
VERSIONS = bindparam("versions", type_=ListOf(BigInteger()))


# --- The event kinds -----------------------------------------------------------

CREATED = Event(EventType.CREATED, detail=lambda old, new: {"run_at": new.run_at})
CLAIMED = Event(
    EventType.CLAIMED,
    from_status=PENDING,
    detail=lambda old, new: {
        "attempt": new.attempts,
        "lease_expires_at": new.lease_expires_at,
    },
)
COMPLETED_EVENT = Event(EventType.COMPLETED)
FAILED_EVENT = Event(
    EventType.FAILED,
    detail=lambda old, new: {
        "error_message": new.error_message,
        "attempts": new.attempts,
    },
)
RELEASED = Event(
    EventType.RELEASED,
    detail=lambda old, new: {
        "run_at": new.run_at,
        "attempts": new.attempts,
        "error_message": new.error_message,
    },
)
# A lease that ran out with attempts left: the job is pending again (and,
# in a claim, taken at once by the claimer: a `claimed` event follows).
LEASE_EXPIRED = Event(
    EventType.LEASE_EXPIRED,
    from_status=PROCESSING,
    to_status=PENDING,
    worker=lambda old, new: old.worker_id,
    when=lambda old, new: old.status == PROCESSING,
    detail=lambda old, new: {
        "attempts": old.attempts,
        "max_attempts": old.max_attempts,
        "lease_expires_at": old.lease_expires_at,
    },
)
UPDATED = Event(
    EventType.UPDATED, detail=lambda old, new: {"error_message": new.error_message}
)
# The event a move to each status records.
MOVED_TO = {
    JobStatus.PROCESSING: CLAIMED,
    JobStatus.COMPLETED: COMPLETED_EVENT,
    JobStatus.FAILED: FAILED_EVENT,
    JobStatus.PENDING: RELEASED,
}


# --- The writes ------------------------------------------------------------------


def expiry_message(attempts: Any) -> Any:
    """'lease expired after 1 attempt', '... after 3 attempts', in SQL."""
    unit = case((attempts == 1, " attempt"), else_=" attempts")
    return literal("lease expired after ") + cast(attempts, String) + unit


def held_by_caller(job: Row, with_worker: bool) -> Any:
    """The caller holds the job's lease: the same token subject that took it
    (with auth off, every caller is the same one), and, when the request
    names a worker, that worker."""
    owner = job.lease_owner.is_not_distinct_from(ACTOR)
    return and_(owner, job.worker_id == WORKER) if with_worker else owner


def _lapsed(job: Row) -> list[Any]:
    """Processing jobs whose lease ran out and that may be tried again."""
    return [
        job.status == PROCESSING,
        job.lease_expires_at <= MOMENT,
        job.attempts < job.max_attempts,
    ]


def _exhausted(job: Row) -> list[Any]:
    """Processing jobs whose lease ran out with no attempts left."""
    return [
        job.status == PROCESSING,
        job.lease_expires_at <= MOMENT,
        job.attempts >= job.max_attempts,
    ]


def _by_lease_expiry(job: Row) -> list[Any]:
    return [job.lease_expires_at]


# Exhausted leases fail, with their `failed` event (the sweep's part of a claim).
FAIL_EXHAUSTED = Change(
    picks=(
        Pick(
            _exhausted, order_by=_by_lease_expiry, limit=SWEEP_BATCH, skip_locked=True
        ),
    ),
    values=lambda job: {
        "status": FAILED,
        "error_message": expiry_message(job.attempts),
        "finished_at": MOMENT,
        "updated_at": MOMENT,
        "lease_expires_at": null(),
        "version": job.version + 1,
        "updated_by": null(),
    },
    actor=null(),
    events=(FAILED_EVENT,),
)

# Lapsed leases go back to pending (the sweep's; a claim takes them directly).
RELEASE_LAPSED = Change(
    picks=(
        Pick(_lapsed, order_by=_by_lease_expiry, limit=SWEEP_BATCH, skip_locked=True),
    ),
    values=lambda job: {
        "status": PENDING,
        "lease_expires_at": null(),
        "run_at": MOMENT,
        "updated_at": MOMENT,
        "version": job.version + 1,
        "updated_by": null(),
    },
    actor=null(),
    events=(LEASE_EXPIRED,),
)


def _claimed_values(job: Row) -> dict[str, Any]:
    """A job taken by the caller, with a lease: by a claim, or by a PATCH."""
    return {
        "status": PROCESSING,
        "worker_id": WORKER,
        "lease_owner": ACTOR,
        "lease_expires_at": LEASE_UNTIL,
        "heartbeat_at": null(),
        "started_at": MOMENT,
        "finished_at": null(),
        "attempts": job.attempts + 1,
    }


def _most_urgent(job: Row) -> list[Any]:
    return [job.priority.desc(), job.seq]


# Due pending jobs and lapsed leases alike, each through its partial index,
# then the most urgent `limit` of them; the lapsed get a lease_expired event.
CLAIM = Change(
    picks=(
        Pick(
            lambda job: [job.status == PENDING, job.run_at <= MOMENT],
            order_by=_most_urgent,
            limit=LIMIT,
            skip_locked=True,
        ),
        Pick(_lapsed, order_by=_by_lease_expiry, limit=LIMIT, skip_locked=True),
    ),
    order_by=_most_urgent,
    limit=LIMIT,
    values=lambda job: {
        **_claimed_values(job),
        "updated_at": MOMENT,
        "version": job.version + 1,
        "updated_by": ACTOR,
    },
    actor=ACTOR,
    events=(LEASE_EXPIRED, CLAIMED),
)

HEARTBEAT = Change(
    picks=(Pick(lambda job: [job.status == PROCESSING, held_by_caller(job, True)]),),
    values=lambda job: {
        "lease_expires_at": LEASE_UNTIL,
        "heartbeat_at": MOMENT,
        "updated_at": drivers.strictly_after(MOMENT, job.updated_at),
        "version": job.version + 1,
        "updated_by": ACTOR,
    },
    actor=ACTOR,
    one_job=True,
)


@cache
def _transition(
    target: JobStatus,
    sources: frozenset[JobStatus],
    finished: bool,
    with_versions: bool,
    with_worker: bool,
    with_result: bool,
    with_run_at: bool,
) -> Change:
    """A PATCH: move one job to `target` from one of `sources`, or change
    its error message within a status that is not finished. A processing
    job changes only for its holder (`held_by_caller`); `with_versions`,
    only at a version If-Match named."""
    allowed = sorted(source.value for source in sources)

    def where(job: Row) -> list[Any]:
        moves = job.status.in_(allowed)
        if not (finished or with_run_at):  # a release is a move, never a change within
            same = and_(
                job.status == target.value,
                job.error_message.is_distinct_from(MESSAGE),
            )
            moves = or_(moves, same)
        held = or_(job.status != PROCESSING, held_by_caller(job, with_worker))
        conditions = [moves, held]
        if with_versions:
            conditions.append(one_of(job.version, VERSIONS))
        return conditions

    def values(job: Row) -> dict[str, Any]:
        moving = job.status != target.value
        changed_at = drivers.strictly_after(MOMENT, job.updated_at)
        new: dict[str, Any] = {
            "status": target.value,
            "error_message": MESSAGE,
            "updated_at": changed_at,
            "finished_at": changed_at if finished else null(),
            "lease_expires_at": null(),
            "version": job.version + 1,
            "updated_by": ACTOR,
        }
        if target == JobStatus.PROCESSING:
            # Taken by hand rather than claimed: the caller holds it, leased.
            taken = {**_claimed_values(job), "started_at": changed_at}
            del taken["status"]
            for name, value in taken.items():
                new[name] = case((moving, value), else_=getattr(job, name))
        if target == JobStatus.COMPLETED:
            new["result"] = RESULT if with_result else null()
        if target == JobStatus.PENDING:
            new["run_at"] = (
                RUN_AT if with_run_at else case((moving, MOMENT), else_=job.run_at)
            )
        return new

    def moving(old: Row, new: Row) -> Any:
        return old.status != target.value

    return Change(
        picks=(Pick(where),),
        values=values,
        actor=ACTOR,
        events=(
            replace(MOVED_TO[target], when=moving),
            replace(UPDATED, when=lambda old, new: old.status == target.value),
        ),
        one_job=True,
    )


# --- Reads -----------------------------------------------------------------------

# Statements are built once and run with bound parameters: SQLAlchemy then
# reuses not only the compiled SQL but also what it derives from the
# statement object itself (the result columns), per request.


@cache
def _by_id() -> Select:
    return prepared(select(JOBS).where(JOBS.c.id == JOB_ID))


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
def _cursor_key() -> Select:
    return prepared(select(CURSOR_KEY.c.key).order_by(CURSOR_KEY.c.id).limit(1))


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


def list_query(
    document_id: str | None,
    status: JobStatus | None,
    limit: int,
    offset: int,
    after_seq: int | None = None,
    with_key: bool = False,
) -> tuple[Select, dict[str, Any]]:
    """The list statement and its parameters."""
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


@cache
def _events_page() -> Select:
    """A page of a job's history after an event, and whether the job exists:
    the job left-joined to its events, so a job with none left is one row."""
    after = bindparam("after", type_=BigInteger)
    return prepared(
        select(JOBS.c.id.label("the_job"), *EVENTS.c)
        .select_from(
            JOBS.outerjoin(
                EVENTS, and_(EVENTS.c.job_id == JOBS.c.id, EVENTS.c.seq > after)
            )
        )
        .where(JOBS.c.id == JOB_ID)
        .order_by(EVENTS.c.seq)
        .limit(bindparam("limit", type_=Integer))
    )


# --- The repository ---------------------------------------------------------------


class IdempotencyKeyTaken(Exception):
    """Another job already holds this caller's idempotency key."""


@dataclass(frozen=True)
class Moved:
    """A change to one job: the job after it and the status it moved from;
    or, refused, the job as it stood (`job` None: no such job), with the
    token subject that holds its lease."""

    job: Job | None
    changed: bool
    old_status: JobStatus | None = None
    lease_owner: str | None = None


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


@dataclass(frozen=True)
class EventsPage:
    events: list[JobEvent]
    more: bool


class ExtractionJobRepository:
    def __init__(self, db_url: str | None = None) -> None:
        self.url = db_url or database_url_from_env()
        self.driver = drivers.driver_for(self.url)

    def ping(self) -> None:
        ping(self.url)

    def _one(self, statement: Select, params: dict[str, Any]) -> Job | None:
        def one(connection: Connection) -> Job | None:
            row = connection.execute(statement, params).mappings().first()
            return job_from_row(row) if row is not None else None

        return run(self.url, one)

    def _change(
        self, changes: tuple[Change, ...], params: dict[str, Any]
    ) -> drivers.Outcome:
        return run(
            self.url,
            lambda connection: self.driver.run(connection, changes, params),
            write=True,
        )

    def _change_one(self, change: Change, params: dict[str, Any]) -> Moved:
        outcome = self._change((change,), params)
        if outcome.changed[0]:
            row = outcome.changed[0][0]
            return Moved(job_from_row(row), True, JobStatus(row["old_status"]))
        current = outcome.current
        if current is None:
            return Moved(None, False)
        return Moved(job_from_row(current), False, lease_owner=current["lease_owner"])

    def add(self, job: Job, idempotency_key: str | None = None) -> Job:
        """One INSERT with its `created` event; a taken idempotency key is
        `IdempotencyKeyTaken`."""
        values = to_values(job, idempotency_key)
        try:
            run(
                self.url,
                lambda connection: self.driver.insert(connection, (CREATED,), values),
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
        after_seq: int | None = None,
        with_key: bool = False,
    ) -> tuple[list[Job], int | None, bool, str | None]:
        """A page in creation order: the jobs, the last one's `seq`, whether
        more follow (one row more is read to know), and `with_key` the cursor
        key when there were rows."""
        statement, params = list_query(
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
        sources: Collection[JobStatus],
        finished: bool,
        now: datetime,
        error_message: str | None,
        versions: Collection[int] | None,
        worker_id: str,
        check_worker: bool,
        lease_until: datetime,
        result: dict[str, Any] | None = None,
        run_at: datetime | None = None,
        actor: str | None = None,
    ) -> Moved:
        """Move the job to `target` (see `_transition`), with its event.
        `worker_id` is the holder a move to processing makes; `check_worker`,
        the worker a processing job must be held by."""
        change = _transition(
            target,
            frozenset(sources),
            finished,
            versions is not None,
            check_worker,
            result is not None,
            run_at is not None,
        )
        params = {
            "job_id": job_id,
            "moment": now,
            "message": error_message,
            "worker": worker_id,
            "actor": actor,
            "lease_until": lease_until,
            "versions": sorted(versions or ()),
            "new_result": result,
            "new_run_at": run_at,
        }
        return self._change_one(change, params)

    def heartbeat(
        self,
        job_id: uuid.UUID,
        *,
        worker_id: str,
        now: datetime,
        lease_until: datetime,
        actor: str | None,
    ) -> Moved:
        """Extend the lease of a processing job the caller holds."""
        params = {
            "job_id": job_id,
            "worker": worker_id,
            "moment": now,
            "lease_until": lease_until,
            "actor": actor,
        }
        return self._change_one(HEARTBEAT, params)

    def claim(
        self,
        *,
        worker_id: str,
        limit: int,
        now: datetime,
        lease_until: datetime,
        actor: str | None = None,
    ) -> ClaimOutcome:
        """Fail exhausted leases, then move up to `limit` due jobs (and lapsed
        leases) to processing. `SKIP LOCKED` lets concurrent claimers pass
        each other's rows instead of waiting or double-claiming."""
        params = {
            "worker": worker_id,
            "limit": limit,
            "moment": now,
            "lease_until": lease_until,
            "actor": actor,
        }
        failed, claimed = self._change((FAIL_EXHAUSTED, CLAIM), params).changed
        lapsed = sum(row["old_status"] == PROCESSING for row in claimed)
        return ClaimOutcome(
            [job_from_row(row) for row in claimed], len(failed) + lapsed
        )

    def sweep_leases(self, now: datetime) -> SweepOutcome:
        """One batch of expired leases: exhausted ones fail, the others go
        back to pending; each with its event."""
        failed, released = self._change(
            (FAIL_EXHAUSTED, RELEASE_LAPSED), {"moment": now}
        ).changed
        return SweepOutcome(failed=len(failed), released=len(released))

    def delete_finished(
        self, finished_before: datetime, statuses: Collection[JobStatus]
    ) -> int:
        """One bounded batch of retention: jobs in `statuses` finished before
        the cutoff, and their events. Returns how many jobs went."""
        with transaction(self.url) as connection:
            rows = connection.execute(
                select(JOBS.c.seq, JOBS.c.id)
                .where(
                    JOBS.c.status.in_(sorted(status.value for status in statuses)),
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

    def events(self, job_id: uuid.UUID, *, after: int, limit: int) -> EventsPage | None:
        """Up to `limit` events of the job after event `after`, oldest
        first; None when there is no such job. One query."""
        params = {"job_id": job_id, "after": after, "limit": limit + 1}
        rows = run(
            self.url,
            lambda connection: (
                connection.execute(_events_page(), params).mappings().all()
            ),
        )
        if not rows:
            return None
        events = [to_event(row) for row in rows if row["seq"] is not None]
        return EventsPage(events[:limit], len(events) > limit)

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
