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
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
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
    tuple_,
    union_all,
)
from sqlalchemy.exc import IntegrityError

import drivers
from database import database_url_from_env, ping, prepared, run, transaction
from db_models import CURSOR_KEY, EVENTS, JOBS, OUTBOX, JSONDocument, UTCDateTime
from drivers import (
    JOB_ID,
    Change,
    Event,
    ListOf,
    NewJob,
    Pick,
    Row,
    commit_horizon,
    estimated_count,
    greatest,
    one_of,
    strictly_after,
)
from models import (
    EXACT_COUNT_CAP,
    PUBLISHED_EVENTS,
    BulkAction,
    EventType,
    Job,
    JobEvent,
    JobFilter,
    JobStats,
    JobStatus,
    ListOrder,
    StatusCounts,
)
from schemas import job_from_row, to_event, to_values

# Expired leases handled per claim (the rest wait for the next claim or the
# scheduled sweep), so a claim stays O(claimed + this).
SWEEP_BATCH = 100
# Finished jobs deleted per retention transaction, and transactions per sweep.
RETENTION_BATCH = 500
MAX_RETENTION_BATCHES = 20
# Jobs one bulk call changes, in one statement; and how far it counts.
BULK_BATCH = 1_000
MATCH_COUNT_CAP = 100_000
# Counts per status are exact up to this; beyond it, the database's estimate.

PENDING = JobStatus.PENDING.value
PROCESSING = JobStatus.PROCESSING.value
FAILED = JobStatus.FAILED.value
CANCELLED = JobStatus.CANCELLED.value

# The parameters of the writes, by name: none is named like a column, which
# an UPDATE would take as one more value to SET.
MOMENT = bindparam("moment", type_=UTCDateTime())
ACTOR = bindparam("actor", type_=String)
WORKER = bindparam("worker", type_=String)
LEASE_UNTIL = bindparam("lease_until", type_=UTCDateTime())
LIMIT = bindparam("limit", type_=Integer)
MESSAGE = bindparam("message", type_=Text)
REASON = bindparam("reason", type_=Text)
RESULT = bindparam("new_result", type_=JSONDocument)
RUN_AT = bindparam("new_run_at", type_=UTCDateTime())
PRIORITY = bindparam("new_priority", type_=Integer)
VERSIONS = bindparam("versions", type_=ListOf(BigInteger()))
IDS = bindparam("ids", type_=ListOf(JOBS.c.id.type))
# The cancel reason the sweep (or a claim) records when a lease runs out on
# a job whose cancel was requested.
LAPSED_ON_CANCEL = "the lease ran out after the cancel request"


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
CANCELLED_EVENT = Event(EventType.CANCELLED, detail=lambda old, new: {"reason": REASON})
RETRIED_EVENT = Event(
    EventType.RETRIED,
    detail=lambda old, new: {"run_at": new.run_at, "priority": new.priority},
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
# The event a PATCH's move to each status records.
MOVED_TO = {
    JobStatus.PROCESSING: CLAIMED,
    JobStatus.COMPLETED: COMPLETED_EVENT,
    JobStatus.FAILED: FAILED_EVENT,
    JobStatus.CANCELLED: CANCELLED_EVENT,
    JobStatus.PENDING: RELEASED,
}


# --- Conditions ------------------------------------------------------------------


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


def _cancel_requested(job: Row) -> Any:
    return job.cancel_requested_at.is_not(None)


def _lease_ran_out(job: Row) -> list[Any]:
    return [job.status == PROCESSING, job.lease_expires_at <= MOMENT]


def _lapsed(job: Row) -> list[Any]:
    """Expired leases that may be tried again."""
    return [
        *_lease_ran_out(job),
        job.attempts < job.max_attempts,
        job.cancel_requested_at.is_(None),
    ]


def _exhausted(job: Row) -> list[Any]:
    """Expired leases with no attempts left."""
    return [
        *_lease_ran_out(job),
        job.attempts >= job.max_attempts,
        job.cancel_requested_at.is_(None),
    ]


def _lapsed_on_cancel(job: Row) -> list[Any]:
    """Expired leases of jobs whose cancel was requested."""
    return [*_lease_ran_out(job), _cancel_requested(job)]


def _by_lease_expiry(job: Row) -> list[Any]:
    return [job.lease_expires_at]


def _most_urgent(job: Row) -> list[Any]:
    return [job.priority.desc(), job.seq]


def _in_creation_order(job: Row) -> list[Any]:
    return [job.seq]


def _due(job: Row) -> Any:
    """Its run_at has come, written so that no index on run_at can serve it
    (coalesce of a NOT NULL column changes nothing): a claim reads the claim
    index in its own order and stops at `limit`. Given the choice, with
    statistics that lag a burst of new jobs, PostgreSQL fetched every due
    job through /stats' run_at index and sorted them: 38 ms a claim with
    30,000 pending, against 0.3 ms (tests/test_persistence.py)."""
    return func.coalesce(job.run_at, MOMENT) <= MOMENT


def _lapsed_leases(where: Callable[[Row], list[Any]], limit: Any) -> Pick:
    return Pick(where, order_by=_by_lease_expiry, limit=limit, skip_locked=True)


def _finished(job: Row, status: str, at: Any) -> dict[str, Any]:
    """A job reaching a finished status at `at`: its lease gone."""
    return {"status": status, "finished_at": at, "lease_expires_at": null()}


def _changed(job: Row, at: Any, actor: Any = ACTOR) -> dict[str, Any]:
    """What every change to a job sets: when, a new version, by whom."""
    return {"updated_at": at, "version": job.version + 1, "updated_by": actor}


def _unless_cancel_requested(job: Row, values: dict[str, Any], at: Any) -> dict:
    """`values` send the job back to pending, its lease gone; a job whose
    cancel was requested never runs again, so it is cancelled instead."""
    requested = _cancel_requested(job)
    return {
        **values,
        "status": case((requested, CANCELLED), else_=values["status"]),
        "finished_at": case((requested, at), else_=values.get("finished_at", null())),
    }


def _back_or_cancelled(back: Event) -> tuple[Event, Event]:
    """The events of a job sent back to pending by `back`, or cancelled."""
    return (
        replace(back, when=lambda old, new: old.cancel_requested_at.is_(None)),
        replace(CANCELLED_EVENT, when=lambda old, new: _cancel_requested(old)),
    )


# --- The writes ------------------------------------------------------------------

# The sweep's part of a claim (and the sweep itself): expired leases with no
# attempts left fail; those of jobs whose cancel was requested are cancelled.
FAIL_EXHAUSTED = Change(
    picks=(_lapsed_leases(_exhausted, SWEEP_BATCH),),
    values=lambda job: {
        **_finished(job, FAILED, MOMENT),
        **_changed(job, MOMENT, null()),
        "error_message": expiry_message(job.attempts),
    },
    actor=null(),
    events=(FAILED_EVENT,),
)
CANCEL_LAPSED = Change(
    picks=(_lapsed_leases(_lapsed_on_cancel, SWEEP_BATCH),),
    values=lambda job: {
        **_finished(job, CANCELLED, MOMENT),
        **_changed(job, MOMENT, null()),
    },
    actor=null(),
    events=(CANCELLED_EVENT,),
)
# Lapsed leases go back to pending (the sweep's; a claim takes them directly).
RELEASE_LAPSED = Change(
    picks=(_lapsed_leases(_lapsed, SWEEP_BATCH),),
    values=lambda job: {
        "status": PENDING,
        "lease_expires_at": null(),
        "run_at": MOMENT,
        **_changed(job, MOMENT, null()),
    },
    actor=null(),
    events=(LEASE_EXPIRED,),
)


def _taken(job: Row, at: Any) -> dict[str, Any]:
    """A job taken by the caller, with a lease: by a claim, or by a PATCH."""
    return {
        "status": PROCESSING,
        "worker_id": WORKER,
        "lease_owner": ACTOR,
        "lease_expires_at": LEASE_UNTIL,
        "heartbeat_at": null(),
        "started_at": at,
        "finished_at": null(),
        "attempts": job.attempts + 1,
    }


# Due pending jobs and lapsed leases alike, each through its partial index,
# then the most urgent `limit` of them; the lapsed get a lease_expired event.
CLAIM = Change(
    picks=(
        Pick(
            lambda job: [job.status == PENDING, _due(job)],
            order_by=_most_urgent,
            limit=LIMIT,
            skip_locked=True,
        ),
        _lapsed_leases(_lapsed, LIMIT),
    ),
    order_by=_most_urgent,
    limit=LIMIT,
    values=lambda job: {**_taken(job, MOMENT), **_changed(job, MOMENT)},
    actor=ACTOR,
    events=(LEASE_EXPIRED, CLAIMED),
)
# What a claim and a sweep batch run, in this order.
CLAIM_CHANGES = (FAIL_EXHAUSTED, CANCEL_LAPSED, CLAIM)
SWEEP_CHANGES = (FAIL_EXHAUSTED, CANCEL_LAPSED, RELEASE_LAPSED)

HEARTBEAT = Change(
    picks=(Pick(lambda job: [job.status == PROCESSING, held_by_caller(job, True)]),),
    values=lambda job: {
        "lease_expires_at": LEASE_UNTIL,
        "heartbeat_at": MOMENT,
        **_changed(job, strictly_after(MOMENT, job.updated_at)),
    },
    actor=ACTOR,
    one_job=True,
)

# The holder gives its job back: pending again, the attempt given back (or
# cancelled, when its cancel was requested).
RELEASE = Change(
    picks=(Pick(lambda job: [job.status == PROCESSING, held_by_caller(job, True)]),),
    values=lambda job: _unless_cancel_requested(
        job,
        {
            "status": PENDING,
            "attempts": job.attempts - 1,
            "run_at": RUN_AT,
            "lease_expires_at": null(),
            "heartbeat_at": null(),
            **_changed(job, strictly_after(MOMENT, job.updated_at)),
        },
        strictly_after(MOMENT, job.updated_at),
    ),
    actor=ACTOR,
    events=_back_or_cancelled(RELEASED),
    one_job=True,
)


@cache
def _transition(
    target: JobStatus,
    sources: frozenset[JobStatus],
    finished: bool,
    with_versions: bool,
    with_worker: bool,
    override: bool,
    with_result: bool,
    with_run_at: bool,
) -> Change:
    """A PATCH: move one job to `target` from one of `sources`, or change
    its error message within a status that is not finished. A processing
    job changes only for its holder (`held_by_caller`), unless `override`
    (an admin naming no worker); `with_versions`, only at a version
    If-Match named."""
    allowed = sorted(source.value for source in sources)

    def where(job: Row) -> list[Any]:
        moves = job.status.in_(allowed)
        if not (finished or with_run_at):  # a release is a move, never a change within
            same = and_(
                job.status == target.value,
                job.error_message.is_distinct_from(MESSAGE),
            )
            moves = or_(moves, same)
        conditions = [moves]
        if not override:
            conditions.append(
                or_(job.status != PROCESSING, held_by_caller(job, with_worker))
            )
        if with_versions:
            conditions.append(one_of(job.version, VERSIONS))
        return conditions

    def values(job: Row) -> dict[str, Any]:
        moving = job.status != target.value
        at = strictly_after(MOMENT, job.updated_at)
        new: dict[str, Any] = {
            "status": target.value,
            "error_message": MESSAGE,
            "finished_at": at if finished else null(),
            "lease_expires_at": null(),
            **_changed(job, at),
        }
        if target == JobStatus.PROCESSING:
            # Taken by hand rather than claimed: the caller holds it, leased.
            for name, value in _taken(job, at).items():
                if name != "status":
                    new[name] = case((moving, value), else_=getattr(job, name))
        if target == JobStatus.COMPLETED:
            new["result"] = RESULT if with_result else null()
        if target == JobStatus.PENDING:
            new["run_at"] = (
                RUN_AT if with_run_at else case((moving, MOMENT), else_=job.run_at)
            )
            new = _unless_cancel_requested(job, new, at)
        return new

    def moving(old: Row, new: Row) -> Any:
        return old.status != target.value

    events = (replace(MOVED_TO[target], when=moving),)
    if target == JobStatus.PENDING:
        released, cancelled = _back_or_cancelled(RELEASED)
        events = (
            replace(
                released,
                when=lambda old, new: and_(released.when(old, new), moving(old, new)),
            ),
            cancelled,
        )
    return Change(
        picks=(Pick(where),),
        values=values,
        actor=ACTOR,
        events=(
            *events,
            replace(UPDATED, when=lambda old, new: old.status == target.value),
        ),
        one_job=True,
    )


# --- Operators' actions: one job, or every job a filter matches ----------------


def _cancellable(job: Row) -> list[Any]:
    return [job.status.in_([PENDING, PROCESSING]), job.cancel_requested_at.is_(None)]


def _cancel_values(job: Row) -> dict[str, Any]:
    """A pending job is cancelled at once; a processing one keeps running
    with the request noted, for its holder to honour."""
    at = strictly_after(MOMENT, job.updated_at)
    pending = job.status == PENDING
    return {
        "status": case((pending, CANCELLED), else_=job.status),
        "finished_at": case((pending, at), else_=job.finished_at),
        "cancel_requested_at": at,
        **_changed(job, at),
    }


def _retryable(job: Row) -> list[Any]:
    return [job.status.in_([FAILED, CANCELLED])]


def _retry_values(with_run_at: bool, with_priority: bool) -> Callable[[Row], dict]:
    """Pending again with a fresh allowance of attempts, the failure and any
    cancel request cleared."""

    def values(job: Row) -> dict[str, Any]:
        at = strictly_after(MOMENT, job.updated_at)
        return {
            "status": PENDING,
            "attempts": 0,
            "error_message": null(),
            "cancel_requested_at": null(),
            "finished_at": null(),
            "lease_expires_at": null(),
            "heartbeat_at": null(),
            "run_at": greatest(RUN_AT, at) if with_run_at else at,
            "priority": PRIORITY if with_priority else job.priority,
            **_changed(job, at),
        }

    return values


@dataclass(frozen=True)
class Action:
    """An operator's action: which jobs it applies to, what it does to each."""

    applies: Callable[[Row], list[Any]]
    values: Callable[[Row], dict[str, Any]]
    events: tuple[Event, ...]

    def one(self) -> Change:
        return Change(
            picks=(Pick(self.applies),),
            values=self.values,
            actor=ACTOR,
            events=self.events,
            one_job=True,
        )

    def matching(self, shape: "FilterShape") -> Change:
        """The same change to up to BULK_BATCH jobs the filter matches, in
        creation order, passing those another writer holds right now."""
        return Change(
            picks=(
                Pick(
                    lambda job: [*self.applies(job), *shape.conditions(job)],
                    order_by=_in_creation_order,
                    limit=BULK_BATCH,
                    skip_locked=True,
                ),
            ),
            values=self.values,
            actor=ACTOR,
            events=self.events,
        )


CANCEL = Action(_cancellable, _cancel_values, (CANCELLED_EVENT,))


@cache
def _retry(with_run_at: bool, with_priority: bool) -> Action:
    return Action(
        _retryable, _retry_values(with_run_at, with_priority), (RETRIED_EVENT,)
    )


@cache
def _one(action: Action) -> Change:
    return action.one()


@cache
def _matching(action: Action, shape: "FilterShape") -> Change:
    return action.matching(shape)


# --- Reads -----------------------------------------------------------------------

# Statements are built once and run with bound parameters: SQLAlchemy then
# reuses not only the compiled SQL but also what it derives from the
# statement object itself (the result columns), per request.


@dataclass(frozen=True)
class FilterShape:
    """Which of a `JobFilter`'s fields are given (a statement per shape);
    the values are bound as parameters (`params`)."""

    statuses: int
    document_id: bool
    created_after: bool
    created_before: bool
    worker_id: bool
    ids: bool = False

    @staticmethod
    def of(
        selection: JobFilter, ids: Collection[uuid.UUID] | None = None
    ) -> "FilterShape":
        return FilterShape(
            len(selection.status or ()),
            selection.document_id is not None,
            selection.created_after is not None,
            selection.created_before is not None,
            selection.worker_id is not None,
            bool(ids),
        )

    @staticmethod
    def params(selection: JobFilter, ids: Collection[uuid.UUID] | None = None) -> dict:
        params: dict[str, Any] = {
            f"filter_status_{n}": status.value
            for n, status in enumerate(selection.status or ())
        }
        for name in ("document_id", "created_after", "created_before", "worker_id"):
            if getattr(selection, name) is not None:
                params[f"filter_{name}"] = getattr(selection, name)
        if ids:
            params["ids"] = sorted(ids)
        return params

    def conditions(self, job: Row, *, statuses: bool = True) -> list[Any]:
        """The filter over the table. A time range is also a range of `seq`
        (created_at never goes back: db_models.CREATE_CLOCK), which the
        `seq` order of every list and pick can then use."""
        conditions = []
        if statuses and self.statuses:
            conditions.append(
                job.status.in_([_status(n) for n in range(self.statuses)])
            )
        if self.document_id:
            conditions.append(job.document_id == bindparam("filter_document_id"))
        if self.worker_id:
            conditions.append(job.worker_id == bindparam("filter_worker_id"))
        if self.created_after:
            after = bindparam("filter_created_after", type_=UTCDateTime())
            conditions += [job.created_at >= after, job.seq >= _first_created(after)]
        if self.created_before:
            before = bindparam("filter_created_before", type_=UTCDateTime())
            conditions += [
                job.created_at < before,
                job.seq < func.coalesce(_first_created(before), 2**63 - 1),
            ]
        if self.ids:
            conditions.append(one_of(job.id, IDS))
        return conditions


def _status(n: int) -> Any:
    return bindparam(f"filter_status_{n}", type_=String)


def _first_created(at: Any) -> Any:
    """The `seq` of the first job created at or after `at` (an index probe)."""
    return (
        select(JOBS.c.seq)
        .where(JOBS.c.created_at >= at)
        .order_by(JOBS.c.created_at, JOBS.c.seq)
        .limit(1)
        .scalar_subquery()
    )


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
def _list(shape: FilterShape, order: ListOrder, after: bool, with_key: bool) -> Select:
    """A page of jobs in `seq` order, ascending or descending. With several
    statuses, each is read through its own (status, seq) index range and
    the pages merged: one range scan per status, however large the table."""
    desc = order == ListOrder.DESC
    limit = bindparam("limit", type_=Integer)
    offset = bindparam("offset", type_=BigInteger)
    job = Row(JOBS.c)
    conditions = shape.conditions(job, statuses=shape.statuses < 2)
    if after:
        position = bindparam("after_seq", type_=BigInteger)
        conditions.append(JOBS.c.seq < position if desc else JOBS.c.seq > position)
    ordered = JOBS.c.seq.desc() if desc else JOBS.c.seq
    if shape.statuses < 2:
        query = select(JOBS).where(*conditions).order_by(ordered)
    else:
        parts = [
            select(JOBS)
            .where(JOBS.c.status == _status(n), *conditions)
            .order_by(ordered)
            .limit(limit + offset)
            for n in range(shape.statuses)
        ]
        merged = union_all(*(select(part.subquery()) for part in parts)).subquery()
        query = select(merged).order_by(merged.c.seq.desc() if desc else merged.c.seq)
    query = query.limit(limit).offset(offset)
    if with_key:
        # The cursor key rides along the first page a process serves, so
        # loading it costs no round trip of its own.
        query = query.add_columns(_cursor_key().scalar_subquery().label("cursor_key"))
    # Planned per call when filtered by status: statuses are skewed (a long
    # pending queue, a few failed jobs), and only a plan that sees which one
    # is asked for reads the status index rather than every job in `seq` order.
    return query if shape.statuses else prepared(query)


def list_query(
    selection: JobFilter,
    order: ListOrder,
    limit: int,
    offset: int,
    after_seq: int | None = None,
    with_key: bool = False,
) -> tuple[Select, dict[str, Any]]:
    """The list statement and its parameters."""
    params = {"limit": limit, "offset": offset, **FilterShape.params(selection)}
    if after_seq is not None:
        params["after_seq"] = after_seq
    statement = _list(FilterShape.of(selection), order, after_seq is not None, with_key)
    return statement, params


@cache
def _matched(action: Action, shape: FilterShape) -> Select:
    """How many jobs the filter matches and the action applies to, counted
    up to MATCH_COUNT_CAP."""
    job = Row(JOBS.c)
    matching = (
        select(JOBS.c.seq)
        .where(*action.applies(job), *shape.conditions(job))
        .limit(MATCH_COUNT_CAP)
    )
    return select(func.count()).select_from(matching.subquery())


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


@cache
def _feed(types: int, after: bool) -> Select:
    """Events of every job in (xid, seq) order, only those written by
    transactions older than the oldest one still running: a transaction
    that commits later can never add an event before a page already read,
    so a walk sees each event once, with no gaps (commit order, as the job
    list's create clock gives it)."""
    conditions = [EVENTS.c.xid < commit_horizon()]
    if after:
        position = (
            bindparam("after_xid", type_=BigInteger),
            bindparam("after_seq", type_=BigInteger),
        )
        conditions.append(tuple_(EVENTS.c.xid, EVENTS.c.seq) > tuple_(*position))
    if types:
        kinds = [bindparam(f"type_{n}", type_=String) for n in range(types)]
        conditions.append(EVENTS.c.type.in_(kinds))
    query = (
        select(EVENTS)
        .where(*conditions)
        .order_by(EVENTS.c.xid, EVENTS.c.seq)
        .limit(bindparam("limit", type_=Integer))
    )
    return prepared(query)


def queued_for_publishing(event: Any) -> Any:
    """The events the outbox keeps: published types that moved a job."""
    return and_(
        event.type.in_(sorted(kind.value for kind in PUBLISHED_EVENTS)),
        event.from_status.is_distinct_from(event.to_status),
    )


@cache
def _outbox(for_jobs: bool) -> Select:
    """Queued events, oldest first, with what a published one tells of its
    job (the job may be gone, by retention)."""
    query = (
        select(
            EVENTS.c.seq,
            EVENTS.c.job_id,
            EVENTS.c.type,
            EVENTS.c.to_status,
            EVENTS.c.worker_id,
            EVENTS.c.at,
            JOBS.c.document_id,
            JOBS.c.attempts,
        )
        .select_from(
            OUTBOX.join(EVENTS, EVENTS.c.seq == OUTBOX.c.event_seq).outerjoin(
                JOBS, JOBS.c.id == EVENTS.c.job_id
            )
        )
        .order_by(OUTBOX.c.event_seq)
        .limit(bindparam("limit", type_=Integer))
    )
    if for_jobs:
        query = query.where(one_of(EVENTS.c.job_id, IDS))
    return prepared(query)


@cache
def _unqueue() -> Any:
    published = bindparam("published", type_=ListOf(BigInteger()))
    return delete(OUTBOX).where(one_of(OUTBOX.c.event_seq, published))


def _capped_count(*conditions: Any) -> Any:
    """count(*) of the jobs that meet `conditions`, counting at most one
    beyond EXACT_COUNT_CAP (an index range of bounded length)."""
    few = select(literal(1)).select_from(JOBS).where(*conditions)
    return (
        select(func.count())
        .select_from(few.limit(EXACT_COUNT_CAP + 1).subquery())
        .scalar_subquery()
    )


@cache
def _stats() -> Select:
    """Per status: a count exact up to EXACT_COUNT_CAP, else the database's
    estimate (where it has one), and which it is; the due pending job that
    waited longest (by run_at); the expired leases. One query, each part an
    index range of bounded length or an index probe, each measured once (a
    MATERIALIZED CTE: inlined, every use of a count would count again)."""
    now = bindparam("now", type_=UTCDateTime())
    measures = []
    for status in JobStatus:
        measures += [
            _capped_count(JOBS.c.status == status.value).label(f"{status}_capped"),
            estimated_count(JOBS.c.status, status.value).label(f"{status}_estimate"),
        ]
    oldest_due = (
        select(func.min(JOBS.c.run_at))
        .where(JOBS.c.status == PENDING, JOBS.c.run_at <= now)
        .scalar_subquery()
    )
    expired = (
        select(func.count())
        .where(JOBS.c.status == PROCESSING, JOBS.c.lease_expires_at <= now)
        .scalar_subquery()
    )
    measured = (
        select(*measures, oldest_due.label("oldest_due"), expired.label("expired"))
        .cte("measured")
        .prefix_with("MATERIALIZED")
    )
    columns = []
    for status in JobStatus:
        capped = measured.c[f"{status}_capped"]
        estimate = measured.c[f"{status}_estimate"]
        over = capped > EXACT_COUNT_CAP
        estimated = and_(over, estimate.is_not(None))
        # Beyond the cap with no estimate (never analyzed): counted in full.
        exact = select(func.count()).where(JOBS.c.status == status.value)
        count = case(
            (estimated, estimate), (over, exact.scalar_subquery()), else_=capped
        )
        columns += [
            count.label(status.value),
            estimated.label(f"{status}_estimated"),
        ]
    # Prepared: planning this statement costs more than running it.
    return prepared(
        select(
            *columns,
            measured.c.oldest_due.label("oldest_due"),
            measured.c.expired.label("expired_leases"),
        )
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
    """The jobs a claim took, how many expired leases its sweep handled
    (failed or cancelled for good, or taken again by this claim), and the
    ids of the jobs it failed or cancelled."""

    jobs: list[Job]
    leases_expired: int = 0
    settled: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SweepOutcome:
    failed: int = 0
    cancelled: int = 0
    released: int = 0
    deleted: int = 0


@dataclass(frozen=True)
class EventsPage:
    events: list[JobEvent]
    more: bool


@dataclass(frozen=True)
class BulkChange:
    """How many jobs matched; each changed one with the status it left."""

    matched: int
    changed: list[tuple[JobStatus, Job]]


NEW_JOB = NewJob(
    # Created (and last changed) when the create clock says, never before the
    # job before it; due no earlier than that.
    stamped=lambda given, created_at: {
        "created_at": created_at,
        "updated_at": created_at,
        "run_at": greatest(given.run_at, created_at),
    },
    events=(CREATED,),
)


@dataclass(frozen=True)
class QueuedEvent:
    """An event waiting in the outbox, with its job's document and attempts."""

    seq: int
    job_id: str
    type: str
    status: str | None
    worker_id: str | None
    at: datetime
    document_id: str | None
    attempts: int | None


class ExtractionJobRepository:
    def __init__(self, db_url: str | None = None, *, outbox: bool = False) -> None:
        """`outbox`: queue the events to publish (publisher.py), in the same
        statement as each write."""
        self.url = db_url or database_url_from_env()
        self.driver = drivers.driver_for(
            self.url, queued_for_publishing if outbox else None
        )

    def ping(self) -> None:
        ping(self.url)

    def _read(self, statement: Select, params: dict[str, Any]) -> list[Any]:
        return run(
            self.url,
            lambda connection: connection.execute(statement, params).mappings().all(),
        )

    def _one(self, statement: Select, params: dict[str, Any]) -> Job | None:
        rows = self._read(statement, params)
        return job_from_row(rows[0]) if rows else None

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
        """One INSERT with its `created` event; returns the job as stored (its
        times from the create clock). A taken idempotency key is
        `IdempotencyKeyTaken`."""
        values = to_values(job, idempotency_key)
        try:
            row = run(
                self.url,
                lambda connection: self.driver.insert(connection, NEW_JOB, values),
                write=True,
            )
        except IntegrityError:
            if idempotency_key is None:
                raise
            raise IdempotencyKeyTaken(idempotency_key) from None
        return job_from_row(row)

    def get(self, job_id: uuid.UUID) -> Job | None:
        return self._one(_by_id(), {"job_id": job_id})

    def get_by_idempotency_key(self, created_by: str | None, key: str) -> Job | None:
        params = {"created_by": created_by or "", "key": key}
        return self._one(_by_idempotency_key(), params)

    def list_jobs(
        self,
        selection: JobFilter,
        *,
        order: ListOrder,
        limit: int,
        offset: int,
        after_seq: int | None = None,
        with_key: bool = False,
    ) -> tuple[list[Job], int | None, bool, str | None]:
        """A page in `seq` order: the jobs, the last one's `seq`, whether more
        follow (one row more is read to know), and `with_key` the cursor key
        when there were rows."""
        statement, params = list_query(
            selection, order, limit + 1, offset, after_seq, with_key
        )
        rows = self._read(statement, params)
        more = len(rows) > limit
        key = rows[0]["cursor_key"] if with_key and rows else None
        rows = rows[:limit]
        last_seq = rows[-1]["seq"] if rows else None
        return [job_from_row(row) for row in rows], last_seq, more, key

    def cursor_key(self) -> str | None:
        """The stored cursor key (None if the row is gone)."""
        rows = self._read(_cursor_key(), {})
        return rows[0]["key"] if rows else None

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
        override: bool,
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
            override,
            result is not None,
            run_at is not None,
        )
        params = {
            "job_id": job_id,
            "moment": now,
            "message": error_message,
            "reason": error_message,
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

    def release(
        self,
        job_id: uuid.UUID,
        *,
        worker_id: str,
        now: datetime,
        run_at: datetime,
        actor: str | None,
        reason: str,
    ) -> Moved:
        """The holder gives a processing job back, with its attempt."""
        params = {
            "job_id": job_id,
            "worker": worker_id,
            "moment": now,
            "new_run_at": run_at,
            "actor": actor,
            "reason": reason,
        }
        return self._change_one(RELEASE, params)

    def cancel(
        self, job_id: uuid.UUID, *, now: datetime, actor: str | None, reason: str | None
    ) -> Moved:
        params = {"job_id": job_id, "moment": now, "actor": actor, "reason": reason}
        return self._change_one(_one(CANCEL), params)

    def retry(
        self,
        job_id: uuid.UUID,
        *,
        now: datetime,
        actor: str | None,
        run_at: datetime | None,
        priority: int | None,
    ) -> Moved:
        action = _retry(run_at is not None, priority is not None)
        params = {
            "job_id": job_id,
            "moment": now,
            "actor": actor,
            "new_run_at": run_at,
            "new_priority": priority,
        }
        return self._change_one(_one(action), params)

    def bulk(
        self,
        action: BulkAction,
        selection: JobFilter,
        ids: Collection[uuid.UUID] | None,
        *,
        dry_run: bool,
        now: datetime,
        actor: str | None,
        reason: str | None,
    ) -> BulkChange:
        """The action on up to BULK_BATCH jobs that match (none on a dry run),
        and how many matched before (counted up to MATCH_COUNT_CAP)."""
        chosen = CANCEL if action == BulkAction.CANCEL else _retry(False, False)
        shape = FilterShape.of(selection, ids)
        params = {
            **FilterShape.params(selection, ids),
            "moment": now,
            "actor": actor,
            "reason": reason,
        }
        matched = self._read(_matched(chosen, shape), params)[0]["count_1"]
        if dry_run or not matched:
            return BulkChange(matched, [])
        (changed,) = self._change((_matching(chosen, shape),), params).changed
        return BulkChange(
            matched,
            [(JobStatus(row["old_status"]), job_from_row(row)) for row in changed],
        )

    def claim(
        self,
        *,
        worker_id: str,
        limit: int,
        now: datetime,
        lease_until: datetime,
        actor: str | None = None,
    ) -> ClaimOutcome:
        """Settle expired leases, then move up to `limit` due jobs (and lapsed
        leases) to processing. `SKIP LOCKED` lets concurrent claimers pass
        each other's rows instead of waiting or double-claiming."""
        params = {
            "worker": worker_id,
            "limit": limit,
            "moment": now,
            "lease_until": lease_until,
            "actor": actor,
            "reason": LAPSED_ON_CANCEL,
        }
        failed, cancelled, claimed = self._change(CLAIM_CHANGES, params).changed
        lapsed = sum(row["old_status"] == PROCESSING for row in claimed)
        return ClaimOutcome(
            [job_from_row(row) for row in claimed],
            len(failed) + len(cancelled) + lapsed,
            [str(row["id"]) for row in (*failed, *cancelled)],
        )

    def sweep_leases(self, now: datetime) -> SweepOutcome:
        """One batch of expired leases: exhausted ones fail, those of jobs
        whose cancel was requested are cancelled, the others go back to
        pending; each with its event."""
        params = {"moment": now, "reason": LAPSED_ON_CANCEL}
        failed, cancelled, released = self._change(SWEEP_CHANGES, params).changed
        return SweepOutcome(
            failed=len(failed), cancelled=len(cancelled), released=len(released)
        )

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
        rows = self._read(_events_page(), params)
        if not rows:
            return None
        events = [to_event(row) for row in rows if row["seq"] is not None]
        return EventsPage(events[:limit], len(events) > limit)

    def feed(
        self, *, after: tuple[int, int] | None, types: Collection[str], limit: int
    ) -> tuple[list[JobEvent], tuple[int, int] | None]:
        """Up to `limit` events of every job after position `after` (an
        event's xid and id), in commit order (see `_feed`), and the last
        one's position."""
        params: dict[str, Any] = {"limit": limit}
        params |= {f"type_{n}": kind for n, kind in enumerate(sorted(types))}
        if after is not None:
            params["after_xid"], params["after_seq"] = after
        rows = self._read(_feed(len(types), after is not None), params)
        last = (rows[-1]["xid"], rows[-1]["seq"]) if rows else None
        return [to_event(row) for row in rows], last

    def queued(self, job_ids: Collection[str] | None, limit: int) -> list[QueuedEvent]:
        """Events waiting to be published: of these jobs, or the oldest."""
        params: dict[str, Any] = {"limit": limit}
        if job_ids is not None:
            params["ids"] = sorted(uuid.UUID(job_id) for job_id in job_ids)
        rows = self._read(_outbox(job_ids is not None), params)
        return [
            QueuedEvent(
                row["seq"],
                str(row["job_id"]),
                row["type"],
                row["to_status"],
                row["worker_id"],
                row["at"],
                row["document_id"],
                row["attempts"],
            )
            for row in rows
        ]

    def unqueue(self, seqs: Collection[int]) -> None:
        """Published: out of the outbox."""
        run(
            self.url,
            lambda connection: connection.execute(
                _unqueue(), {"published": sorted(seqs)}
            ),
            write=True,
        )

    def stats(self, now: datetime) -> JobStats:
        (row,) = self._read(_stats(), {"now": now})
        oldest = row["oldest_due"]
        return JobStats(
            counts=StatusCounts(
                **{status.value: row[status.value] for status in JobStatus}
            ),
            estimated=[
                status for status in JobStatus if row[f"{status.value}_estimated"]
            ],
            oldest_pending_age_seconds=None
            if oldest is None
            else max(0.0, (now - oldest).total_seconds()),
            expired_leases=row["expired_leases"],
        )
