"""Queries over the `extraction_job` and `extraction_job_event` tables, on
SQLite or PostgreSQL alike.

Each method is one short transaction. A change and the event that records it
are written together: on PostgreSQL in one statement (data-modifying CTEs),
on SQLite in one `BEGIN IMMEDIATE` transaction. Rows are converted to
contract models before they leave, and concurrency is handled with
compare-and-swap on `version` or `FOR UPDATE SKIP LOCKED`, never by holding
locks across calls.
"""

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Select,
    cast,
    delete,
    func,
    insert,
    literal,
    null,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from database import database_url_from_env, ping, session_scope
from db_models import ExtractionJob, JobEventRow, JSONDocument, UTCDateTime
from models import EventType, Job, JobEvent, JobStats, JobStatus, StatusCounts
from schemas import to_event, to_job, to_row

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

PENDING = JobStatus.PENDING.value
PROCESSING = JobStatus.PROCESSING.value
COMPLETED = JobStatus.COMPLETED.value
FAILED = JobStatus.FAILED.value


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

    def select_from(self, job_id_column: Any, at: datetime) -> Select:
        """This event as a one-row SELECT per row of the CTE `job_id_column` is in."""
        return select(
            job_id_column,
            cast(literal(at, UTCDateTime()), UTCDateTime()),
            literal(self.type.value),
            literal(self.from_status.value if self.from_status else None),
            literal(self.to_status.value if self.to_status else None),
            literal(self.actor),
            literal(self.worker_id),
            literal(self.detail, JSONDocument) if self.detail else null(),
        )


def job_from_mapping(mapping: Any) -> Job:
    """A job from a core result row holding every `extraction_job` column."""
    attributes = {
        prop.key: mapping[prop.columns[0].name]
        for prop in ExtractionJob.__mapper__.column_attrs
    }
    return to_job(ExtractionJob(**attributes))


def list_query(
    document_id: str | None,
    status: JobStatus | None,
    limit: int,
    offset: int,
    after_seq: int | None = None,
) -> Select[tuple[ExtractionJob]]:
    query = (
        select(ExtractionJob).order_by(ExtractionJob.seq).limit(limit).offset(offset)
    )
    if document_id is not None:
        query = query.where(ExtractionJob.document_id == document_id)
    if status is not None:
        query = query.where(ExtractionJob.status == status.value)
    if after_seq is not None:
        query = query.where(ExtractionJob.seq > after_seq)
    return query


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


def _lapsed(now: datetime, limit: int) -> Select:
    """Processing jobs whose lease ran out and that may be tried again."""
    return (
        select(
            JOBS.c.seq,
            JOBS.c.priority,
            JOBS.c.status,
            JOBS.c.worker_id,
            JOBS.c.attempts,
            JOBS.c.max_attempts,
            JOBS.c.lease_expires_at,
        )
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
        select(
            JOBS.c.seq,
            JOBS.c.priority,
            JOBS.c.status,
            JOBS.c.worker_id,
            JOBS.c.attempts,
            JOBS.c.max_attempts,
            JOBS.c.lease_expires_at,
        )
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


def claim_statement(
    worker_id: str,
    limit: int,
    now: datetime,
    lease_until: datetime,
    actor: str | None,
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
    (attempts >= max_attempts vs <), so no row is updated twice.
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
    at = cast(literal(now, UTCDateTime()), UTCDateTime())

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
        literal(actor),
        literal(worker_id),
        func.jsonb_build_object(
            "attempt", claimed.c.attempts, "lease_expires_at", iso(lease_until)
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
        .returning(EVENTS.c.seq)
        .cte("events")
    )
    return select(claimed).add_cte(events)


class IdempotencyKeyTaken(Exception):
    """Another job already holds this caller's idempotency key."""


@dataclass(frozen=True)
class HeartbeatOutcome:
    """`job` after the heartbeat, or (not `extended`) as it was; None: no such job."""

    extended: bool
    job: Job | None


@dataclass(frozen=True)
class SweepOutcome:
    failed: int = 0
    released: int = 0
    deleted: int = 0


class ExtractionJobRepository:
    def __init__(self, db_url: str | None = None) -> None:
        self.url = db_url or database_url_from_env()

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith("postgresql")

    def ping(self) -> None:
        ping(self.url)

    def add(
        self,
        job: Job,
        idempotency_key: str | None = None,
        event: NewEvent | None = None,
    ) -> Job:
        try:
            with session_scope(self.url, write=True) as session:
                row = to_row(job, idempotency_key)
                session.add(row)
                if event is not None:
                    session.add(JobEventRow(**event.values(row.id, job.created_at)))
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
        after_seq: int | None = None,
    ) -> tuple[list[Job], int | None, bool]:
        """A page in creation order: the jobs, the last one's `seq`, and
        whether more follow (one row more is read to know)."""
        query = list_query(document_id, status, limit + 1, offset, after_seq)
        with session_scope(self.url) as session:
            rows = list(session.scalars(query))
        more = len(rows) > limit
        rows = rows[:limit]
        return [to_job(row) for row in rows], (rows[-1].seq if rows else None), more

    def update(
        self,
        job_id: uuid.UUID,
        expected_version: int,
        event: NewEvent | None = None,
        **changes: Any,
    ) -> Job | None:
        """Apply `changes` only if the job is still at `expected_version`,
        writing `event` with them.

        Returns the updated job, or None when the job changed (or vanished)
        in between, so the caller can decide between retrying and a 412.
        """
        statement = (
            update(JOBS)
            .where(JOBS.c.id == job_id, JOBS.c.version == expected_version)
            .values(**changes, version=expected_version + 1)
            .returning(*JOBS.c)
        )
        at = changes.get("updated_at")
        with session_scope(self.url, write=True) as session:
            if self.is_postgres and event is not None:
                changed = statement.cte("changed")
                events = (
                    insert(EVENTS)
                    .from_select(EVENT_COLUMNS, event.select_from(changed.c.id, at))
                    .returning(EVENTS.c.seq)
                    .cte("events")
                )
                row = session.execute(select(changed).add_cte(events)).first()
            else:
                row = session.execute(statement).first()
                if row is not None and event is not None:
                    session.execute(insert(EVENTS).values(event.values(job_id, at)))
            return job_from_mapping(row._mapping) if row else None

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
        statement = (
            update(JOBS)
            .where(
                JOBS.c.id == job_id,
                JOBS.c.status == PROCESSING,
                JOBS.c.worker_id == worker_id,
            )
            .values(
                lease_expires_at=lease_until,
                updated_at=now,
                version=JOBS.c.version + 1,
                updated_by=actor,
            )
            .returning(*JOBS.c)
        )
        event = NewEvent(
            EventType.HEARTBEAT,
            JobStatus.PROCESSING,
            JobStatus.PROCESSING,
            actor,
            worker_id,
            {"lease_expires_at": iso(lease_until)},
        )
        with session_scope(self.url, write=True) as session:
            if self.is_postgres:
                # One statement: the update, its event, and (from the same
                # snapshot, so as it was before) the job when nothing changed.
                changed = statement.cte("changed")
                events = (
                    insert(EVENTS)
                    .from_select(EVENT_COLUMNS, event.select_from(changed.c.id, now))
                    .returning(EVENTS.c.seq)
                    .cte("events")
                )
                before = aliased(JOBS, name="before")
                query = (
                    select(
                        *changed.c,
                        *[column.label(f"before_{column.name}") for column in before.c],
                    )
                    .select_from(before.outerjoin(changed, true()))
                    .where(before.c.id == job_id)
                    .add_cte(events)
                )
                row = session.execute(query).first()
                if row is None:
                    return HeartbeatOutcome(False, None)
                if row._mapping["seq"] is not None:
                    return HeartbeatOutcome(True, job_from_mapping(row._mapping))
                unprefixed = {
                    column.name: row._mapping[f"before_{column.name}"]
                    for column in before.c
                }
                return HeartbeatOutcome(False, job_from_mapping(unprefixed))
            row = session.execute(statement).first()
            if row is not None:
                session.execute(insert(EVENTS).values(event.values(job_id, now)))
                return HeartbeatOutcome(True, job_from_mapping(row._mapping))
            current = session.scalar(
                select(ExtractionJob).where(ExtractionJob.id == job_id)
            )
            return HeartbeatOutcome(False, to_job(current) if current else None)

    def claim(
        self,
        *,
        worker_id: str,
        limit: int,
        now: datetime,
        lease_until: datetime,
        actor: str | None = None,
    ) -> list[Job]:
        """Sweep expired leases, then move up to `limit` due jobs to processing.

        On PostgreSQL this is one statement (`claim_statement`), and `FOR
        UPDATE SKIP LOCKED` lets concurrent claimers pass each other's rows
        instead of waiting or double-claiming. SQLite is serialised by its
        write lock and runs the same steps as several statements in one
        `BEGIN IMMEDIATE` transaction.
        """
        with session_scope(self.url, write=True) as session:
            if self.is_postgres:
                statement = claim_statement(worker_id, limit, now, lease_until, actor)
                jobs = [
                    job_from_mapping(row._mapping) for row in session.execute(statement)
                ]
            else:
                self._fail_exhausted(session, now)
                jobs = self._claim_steps(
                    session, worker_id, limit, now, lease_until, actor
                )
        # RETURNING has no order of its own.
        order = {job.id: (-job.priority, job.created_at) for job in jobs}
        return sorted(jobs, key=lambda job: order[job.id])

    def _fail_exhausted(self, session: Session, now: datetime) -> int:
        rows = session.execute(_exhausted(now)).all()
        for row in rows:
            session.execute(
                update(JOBS)
                .where(JOBS.c.seq == row.seq)
                .values(
                    **_failed_values(now), error_message=expiry_message(row.attempts)
                )
            )
        if rows:
            session.execute(
                insert(EVENTS),
                [
                    NewEvent(
                        EventType.LEASE_EXPIRED,
                        JobStatus.PROCESSING,
                        JobStatus.FAILED,
                        None,
                        row.worker_id,
                        _expiry_detail(
                            row.attempts, row.max_attempts, iso(row.lease_expires_at)
                        ),
                    ).values(row.id, now)
                    for row in rows
                ],
            )
        return len(rows)

    def _claim_steps(
        self,
        session: Session,
        worker_id: str,
        limit: int,
        now: datetime,
        lease_until: datetime,
        actor: str | None,
    ) -> list[Job]:
        candidates = [
            *session.execute(_due(now, limit)).all(),
            *session.execute(_lapsed(now, limit)).all(),
        ]
        picked = sorted(candidates, key=lambda row: (-row.priority, row.seq))[:limit]
        if not picked:
            return []
        rows = session.execute(
            update(JOBS)
            .where(JOBS.c.seq.in_([row.seq for row in picked]))
            .values(**_claimed_values(worker_id, now, lease_until, actor))
            .returning(*JOBS.c)
        ).all()
        jobs = {row.seq: job_from_mapping(row._mapping) for row in rows}
        events = []
        for row in picked:
            job = jobs[row.seq]
            if row.status == PROCESSING:
                events.append(
                    NewEvent(
                        EventType.LEASE_EXPIRED,
                        JobStatus.PROCESSING,
                        JobStatus.PENDING,
                        None,
                        row.worker_id,
                        _expiry_detail(
                            row.attempts, row.max_attempts, iso(row.lease_expires_at)
                        ),
                    ).values(uuid.UUID(job.id), now)
                )
            events.append(
                NewEvent(
                    EventType.CLAIMED,
                    JobStatus.PENDING,
                    JobStatus.PROCESSING,
                    actor,
                    worker_id,
                    {"attempt": job.attempts, "lease_expires_at": iso(lease_until)},
                ).values(uuid.UUID(job.id), now)
            )
        session.execute(insert(EVENTS), events)
        return list(jobs.values())

    def _release_lapsed(self, session: Session, now: datetime) -> int:
        """Expired leases with attempts left go back to pending (the sweep's
        part; a claim takes such jobs directly)."""
        rows = session.execute(_lapsed(now, SWEEP_BATCH)).all()
        if not rows:
            return 0
        session.execute(
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
        ids = dict(
            session.execute(
                select(JOBS.c.seq, JOBS.c.id).where(
                    JOBS.c.seq.in_([row.seq for row in rows])
                )
            ).all()
        )
        session.execute(
            insert(EVENTS),
            [
                NewEvent(
                    EventType.LEASE_EXPIRED,
                    JobStatus.PROCESSING,
                    JobStatus.PENDING,
                    None,
                    row.worker_id,
                    _expiry_detail(
                        row.attempts, row.max_attempts, iso(row.lease_expires_at)
                    ),
                ).values(ids[row.seq], now)
                for row in rows
            ],
        )
        return len(rows)

    def sweep_leases(self, now: datetime) -> SweepOutcome:
        """One batch of expired leases: exhausted ones fail, the others go
        back to pending; each with its lease_expired event."""
        with session_scope(self.url, write=True) as session:
            failed = self._fail_exhausted(session, now)
            released = self._release_lapsed(session, now)
        return SweepOutcome(failed=failed, released=released)

    def delete_finished(self, finished_before: datetime) -> int:
        """One bounded batch of retention: completed/failed jobs finished
        before the cutoff, and their events. Returns how many jobs went."""
        with session_scope(self.url, write=True) as session:
            rows = session.execute(
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
            session.execute(
                delete(EVENTS).where(EVENTS.c.job_id.in_([row.id for row in rows]))
            )
            session.execute(
                delete(JOBS).where(JOBS.c.seq.in_([row.seq for row in rows]))
            )
            return len(rows)

    def events(self, job_id: uuid.UUID) -> list[JobEvent] | None:
        """The job's history, oldest first; None when there is no such job.
        One query: the job left-joined to its events."""
        query = (
            select(JOBS.c.id, JobEventRow)
            .select_from(JOBS)
            .outerjoin(JobEventRow, JobEventRow.job_id == JOBS.c.id)
            .where(JOBS.c.id == job_id)
            .order_by(JobEventRow.seq)
        )
        with session_scope(self.url) as session:
            rows = session.execute(query).all()
        if not rows:
            return None
        return [to_event(row[1]) for row in rows if row[1] is not None]

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
        with session_scope(self.url) as session:
            row = session.execute(query).one()
        *counts, oldest, expired = row
        return JobStats(
            counts=StatusCounts(**dict(zip(statuses, counts, strict=True))),
            oldest_pending_age_seconds=None
            if oldest is None
            else max(0.0, (now - oldest).total_seconds()),
            expired_leases=expired,
        )
