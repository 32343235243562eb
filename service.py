"""The rules of a job's life: ids, timestamps, status moves, concurrency.

This module knows nothing of HTTP. Its exceptions are mapped to status
codes in one place, `main.py`.
"""

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from models import (
    DEFAULT_LEASE_SECONDS,
    FINISHED,
    BulkOutcome,
    BulkRequest,
    CancelRequest,
    ClaimRequest,
    EventType,
    HeartbeatRequest,
    Job,
    JobCreate,
    JobEvent,
    JobFilter,
    JobStats,
    JobStatus,
    JobUpdate,
    ListOrder,
    ReleaseRequest,
    RetryRequest,
)
from repository import (
    BULK_BATCH,
    MAX_RETENTION_BATCHES,
    ClaimOutcome,
    EventsPage,
    ExtractionJobRepository,
    IdempotencyKeyTaken,
    Moved,
    SweepOutcome,
)

# The one state machine: where a PATCH may move each status. Finished
# statuses move nowhere: a finished job is final.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset(
        {JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.FAILED}
    ),
    # Back to pending is the holder releasing the job (spending the attempt);
    # to cancelled, the holder honouring a cancel request.
    JobStatus.PROCESSING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.PENDING, JobStatus.CANCELLED}
    ),
    **{status: frozenset() for status in FINISHED},
}
# The same machine read backwards: from where each status may be reached.
SOURCES: dict[JobStatus, frozenset[JobStatus]] = {
    target: frozenset(
        source for source, targets in TRANSITIONS.items() if target in targets
    )
    for target in JobStatus
}

# A change refused by its conditional UPDATE is explained from the job as it
# stood; if that shows nothing to refuse (the job changed in between), the
# change is tried again. This bounds how often.
MAX_UPDATE_ATTEMPTS = 10
# Deeper than this, an offset scan costs too much: pages go on with `cursor`.
MAX_LIST_OFFSET = 10_000
# Who holds a job taken by a PATCH that names no worker, with auth off.
ANONYMOUS_HOLDER = "anonymous"
# Retry is for these; any other status is 409.
RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})
# The cancel reason of a job whose holder gave it back after the request.
RELEASED_ON_CANCEL = "released by its holder after the cancel request"


class JobNotFound(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"Extraction job {job_id!r} not found")


class Conflict(Exception):
    """The job's state refuses the request (409)."""


class InvalidTransition(Conflict):
    def __init__(self, current: JobStatus, target: JobStatus) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none, it is final"
        super().__init__(
            f"Cannot move a job from '{current}' to '{target}' (allowed from '{current}': {allowed})"
        )


class JobFinished(Conflict):
    def __init__(self, current: JobStatus) -> None:
        super().__init__(
            f"The job is finished ('{current}'): a finished job is final. Only the "
            "same finishing request, repeated, answers 200"
        )


class RetryNotAllowed(Conflict):
    """`retry_in_seconds` on a job that is not processing."""

    def __init__(self, current: JobStatus) -> None:
        super().__init__(
            f"retry_in_seconds releases a processing job; this job is '{current}'"
        )


class NotRetryable(Conflict):
    def __init__(self, current: JobStatus) -> None:
        hint = (
            "; to extract a completed document again, create a new job"
            if current == JobStatus.COMPLETED
            else ""
        )
        super().__init__(
            f"Only a failed or cancelled job can be retried; this job is "
            f"'{current}'{hint}"
        )


class NotLeaseHolder(Conflict):
    """The caller acted on a job it does not hold (any more)."""


class UpdateContention(Conflict):
    def __init__(self) -> None:
        super().__init__("The job is being changed by others right now; retry")


class VersionMismatch(Exception):
    """If-Match named a version the job no longer has."""

    def __init__(self, current_version: int) -> None:
        super().__init__(
            f"The job has changed: its current version is {current_version}; "
            "fetch it again and retry with the new ETag"
        )


class IdempotencyKeyReused(Exception):
    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was already used for a different request body; "
            "use a new key for a new job"
        )


class InvalidPage(Exception):
    """A cursor that is not ours, or an offset too deep to scan."""


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    next_cursor: str | None


@dataclass(frozen=True)
class FeedPage:
    events: list[JobEvent]
    next_cursor: str


@dataclass(frozen=True)
class ParsedCursor:
    position: tuple[int, ...]
    payload: bytes
    signature: bytes


class CursorCodec:
    """Opaque, tamper-evident list cursors: the position and a digest of the
    filters and order it was made for, HMAC-SHA256-signed, base64url (about
    80 characters, whatever the filters). A cursor from another filter,
    deployment or hand is refused (`InvalidPage`), never trusted.

    The key is `CURSOR_SECRET` when set; otherwise the random key revision
    0002 stored in the database, read once per process (it rides along the
    first list query), so every instance on one database signs alike.
    """

    SIGNATURE_BYTES = 16
    INVALID = (
        "Invalid cursor: use the Link header of the previous page unchanged, "
        "with the same filters and order"
    )

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key

    @staticmethod
    def derive(material: str) -> bytes:
        return hashlib.sha256(
            b"extraction-jobs cursor v1\x00" + material.encode()
        ).digest()

    def _sign(self, payload: bytes) -> bytes:
        assert self.key is not None
        return hmac.new(self.key, payload, hashlib.sha256).digest()[
            : self.SIGNATURE_BYTES
        ]

    @staticmethod
    def _digest(filters: list) -> str:
        text = json.dumps(filters, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def encode(self, position: tuple[int, ...], filters: list) -> str:
        payload = [2, list(position), self._digest(filters)]
        payload = json.dumps(payload, separators=(",", ":")).encode()
        token = payload + self._sign(payload)
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode()

    def parse(self, cursor: str, filters: list) -> ParsedCursor:
        """The cursor's position, not yet trusted: `verify` says if it is ours."""
        try:
            token = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            payload = token[: -self.SIGNATURE_BYTES]
            version, position, signed_filters = json.loads(payload)
        except (ValueError, TypeError, UnicodeError):
            raise InvalidPage(self.INVALID) from None
        if (
            len(token) <= self.SIGNATURE_BYTES
            or version != 2
            or signed_filters != self._digest(filters)
            or not isinstance(position, list)
            or not all(_is_position(value) for value in position)
        ):
            raise InvalidPage(self.INVALID)
        signature = token[-self.SIGNATURE_BYTES :]
        return ParsedCursor(tuple(position), payload, signature)

    def verify(self, cursor: ParsedCursor) -> None:
        if not hmac.compare_digest(cursor.signature, self._sign(cursor.payload)):
            raise InvalidPage(self.INVALID)


def _is_position(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def utc_now() -> datetime:
    return datetime.now(UTC)


def _parse_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise JobNotFound(job_id) from None


def _same_json(a: object, b: object) -> bool:
    """The same JSON: numbers type for type (true is not 1, 1.0 is not 1,
    -0.0 is not 0, as they are kept as sent), key order aside."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _same_request(job: Job, data: JobCreate) -> bool:
    # run_at was stored as max(requested, created_at): absent or past is "now".
    requested_run_at = (
        job.created_at
        if data.run_at is None or data.run_at <= job.created_at
        else data.run_at
    )
    return _same_json(job.metadata, data.metadata) and (
        job.document_id,
        job.priority,
        job.max_attempts,
        job.run_at,
    ) == (
        data.document_id,
        data.priority,
        data.max_attempts,
        requested_run_at,
    )


def _same_finish(job: Job, data: JobUpdate) -> bool:
    """`data` is the request that finished `job`, repeated."""
    return (data.status, data.error_message) == (
        job.status,
        job.error_message,
    ) and _same_json(data.result, job.result)


def _not_held(job: Job, moved: Moved, worker_id: str | None, actor: str | None):
    """Why a processing job refused the caller, or None if it holds the job."""
    if worker_id is not None and job.worker_id != worker_id:
        return NotLeaseHolder(
            f"The job's lease is held by another worker, not {worker_id!r}"
        )
    if moved.lease_owner != actor:
        return NotLeaseHolder(
            "The job's lease was taken with another token subject: only its "
            "holder may change it"
        )
    return None


@dataclass(frozen=True)
class EventsSlice:
    page: EventsPage
    next_after: int | None


class JobService:
    def __init__(
        self,
        repository: ExtractionJobRepository,
        clock: Callable[[], datetime] = utc_now,
        *,
        cursor_secret: str | None = None,
        retention_days: int | None = None,
        on_status_change: Callable[[JobStatus], None] = lambda status: None,
        on_outcome: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.repository = repository
        self.clock = clock
        self.cursors = CursorCodec(
            CursorCodec.derive(cursor_secret) if cursor_secret else None
        )
        self.retention_days = retention_days
        # Hooks: for metrics, the new status of each job a request moved; for
        # publishing, the ids of jobs that reached or left a finished status.
        self.on_status_change = on_status_change
        self.on_outcome = on_outcome or (lambda job_ids: None)

    def database_ok(self) -> None:
        """Raises `DatabaseUnavailable` when the database cannot be reached."""
        self.repository.ping()

    def create(
        self,
        data: JobCreate,
        *,
        created_by: str | None,
        idempotency_key: str | None = None,
    ) -> tuple[Job, bool]:
        """Create a job; returns it and whether it is a replay of an earlier create.

        The INSERT comes first, so a create is one round trip unless the key
        was used before; the unique index on (caller, key) decides, also
        between concurrent requests with the same key.
        """
        now = self.clock()
        run_at = now if data.run_at is None or data.run_at <= now else data.run_at
        job = Job(
            id=str(uuid.uuid4()),
            document_id=data.document_id,
            status=JobStatus.PENDING,
            priority=data.priority,
            metadata=data.metadata,
            error_message=None,
            created_at=now,
            updated_at=now,
            created_by=created_by,
            attempts=0,
            worker_id=None,
            started_at=None,
            finished_at=None,
            version=1,
            max_attempts=data.max_attempts,
            run_at=run_at,
            lease_expires_at=None,
            heartbeat_at=None,
            cancel_requested_at=None,
            result=None,
            updated_by=created_by,
        )
        for _ in range(MAX_UPDATE_ATTEMPTS):
            try:
                return self.repository.add(job, idempotency_key), False
            except IdempotencyKeyTaken:
                earlier = self.repository.get_by_idempotency_key(
                    created_by, idempotency_key
                )
                if earlier is not None:
                    return self._replay(earlier, data), True
                # The key's holder is not visible (gone, or not yet): try again.
        raise UpdateContention()

    @staticmethod
    def _replay(earlier: Job, data: JobCreate) -> Job:
        if not _same_request(earlier, data):
            raise IdempotencyKeyReused()
        return earlier

    def get(self, job_id: str) -> Job:
        job = self.repository.get(_parse_id(job_id))
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list_jobs(
        self,
        selection: JobFilter,
        *,
        order: ListOrder = ListOrder.ASC,
        limit: int,
        offset: int,
        cursor: str | None = None,
    ) -> Page:
        """A page in creation order (or newest first), and the cursor of the
        next when more follow.

        A cursor is a position (keyset on the creation counter), so a page
        deep in a million rows costs what the first does, and jobs created
        while walking are neither skipped nor repeated. It is signed with
        the filters and the order it was made for.
        """
        filters = [selection.model_dump(mode="json"), order.value]
        parsed = None
        if cursor is not None:
            if offset:
                raise InvalidPage("Use either cursor or offset, not both")
            parsed = self.cursors.parse(cursor, filters)
        elif offset > MAX_LIST_OFFSET:
            raise InvalidPage(
                f"offset must be at most {MAX_LIST_OFFSET}; to page further, follow "
                'the `cursor` in the Link header (rel="next") of each page'
            )
        need_key = self.cursors.key is None
        jobs, last_seq, more, key = self.repository.list_jobs(
            selection,
            order=order,
            limit=limit,
            offset=offset,
            after_seq=parsed.position[0]
            if parsed and len(parsed.position) == 1
            else None,
            with_key=need_key,
        )
        if need_key and (key is not None or parsed is not None or more):
            key = key or self.repository.cursor_key()
            # Without the stored row (deleted by hand) the URL still signs
            # alike across instances; `make migrate` never loses it.
            self.cursors.key = CursorCodec.derive(key or self.repository.url)
        if parsed is not None:
            # Checked after the query, which only read a position; a cursor
            # that is not ours answers 422 and its page is never shown.
            self.cursors.verify(parsed)
        if parsed is not None and len(parsed.position) != 1:
            raise InvalidPage(CursorCodec.INVALID)  # a feed's cursor
        next_cursor = (
            self.cursors.encode((last_seq,), filters)
            if more and last_seq is not None
            else None
        )
        return Page(jobs, next_cursor)

    def feed(
        self, *, cursor: str | None, types: Collection[EventType], limit: int
    ) -> FeedPage:
        """Events of every job in commit order after the cursor's position,
        and the cursor of the next page: always, also after the last event,
        so a consumer resumes from it later and sees only newer events."""
        filters = ["feed", sorted(kind.value for kind in types)]
        if self.cursors.key is None:
            # Once per process, as the list would (which carries it along).
            key = self.repository.cursor_key()
            self.cursors.key = CursorCodec.derive(key or self.repository.url)
        after = None
        if cursor is not None:
            parsed = self.cursors.parse(cursor, filters)
            self.cursors.verify(parsed)
            if len(parsed.position) != 2:
                raise InvalidPage(CursorCodec.INVALID)  # a list's cursor
            after = (parsed.position[0], parsed.position[1])
        events, last = self.repository.feed(
            after=after, types={kind.value for kind in types}, limit=limit
        )
        position = last or after or (0, 0)
        return FeedPage(events, self.cursors.encode(position, filters))

    def events(self, job_id: str, *, after: int, limit: int) -> EventsSlice:
        """Up to `limit` of the job's events after event `after`, oldest
        first, and where the next page starts when more follow."""
        page = self.repository.events(_parse_id(job_id), after=after, limit=limit)
        if page is None:
            raise JobNotFound(job_id)
        next_after = page.events[-1].id if page.more else None
        return EventsSlice(page, next_after)

    def stats(self) -> JobStats:
        return self.repository.stats(self.clock())

    def heartbeat(
        self, job_id: str, request: HeartbeatRequest, *, actor: str | None = None
    ) -> Job:
        """Extend the holder's lease from now (409 unless it holds the job)."""
        return self._by_holder(
            job_id,
            request.worker_id,
            actor,
            "lease to extend",
            lambda uid, now: self.repository.heartbeat(
                uid,
                worker_id=request.worker_id,
                now=now,
                lease_until=now + timedelta(seconds=request.lease_seconds),
                actor=actor,
            ),
        )

    def _by_holder(
        self,
        job_id: str,
        worker_id: str,
        actor: str | None,
        nothing: str,
        change: Callable[[uuid.UUID, datetime], Moved],
    ) -> Job:
        """`change(uid, now)`, which only the lease's holder may make: the
        job after it, or the refusal (409: `nothing` when not processing)."""
        uid = _parse_id(job_id)
        for _ in range(MAX_UPDATE_ATTEMPTS):
            moved = change(uid, self.clock())
            job = self._found(job_id, moved)
            if moved.changed:
                self._moved([(moved.old_status, job)])
                return job
            if job.status != JobStatus.PROCESSING:
                raise NotLeaseHolder(
                    f"The job is {job.status.value}, not processing: there is no "
                    f"{nothing}"
                )
            refusal = _not_held(job, moved, worker_id, actor)
            if refusal is not None:
                raise refusal
        raise UpdateContention()

    def sweep(self) -> SweepOutcome:
        """Apply lease expiry to every expired lease, then retention, in
        bounded batches (each its own short statement or transaction)."""
        failed = cancelled = released = deleted = 0
        for _ in range(MAX_RETENTION_BATCHES):
            outcome = self.repository.sweep_leases(self.clock())
            failed += outcome.failed
            cancelled += outcome.cancelled
            released += outcome.released
            if not (outcome.failed or outcome.cancelled or outcome.released):
                break
        if self.retention_days is not None:
            cutoff = self.clock() - timedelta(days=self.retention_days)
            for _ in range(MAX_RETENTION_BATCHES):
                batch = self.repository.delete_finished(cutoff, FINISHED)
                deleted += batch
                if not batch:
                    break
        return SweepOutcome(
            failed=failed, cancelled=cancelled, released=released, deleted=deleted
        )

    def update(
        self,
        job_id: str,
        data: JobUpdate,
        *,
        if_match: frozenset[int] | None = None,
        actor: str | None = None,
        admin: bool = False,
    ) -> Job:
        """Move a job along the state machine.

        `if_match` holds the versions the client accepts (None: any). The move
        is one conditional UPDATE whose WHERE clause is the state machine, the
        lease's holder (unless an admin names no worker: the override) and
        If-Match, so a concurrent change is never overwritten. When it changes nothing, the job as it stood says why:
        404, 412, 409, or nothing to change (the finishing request repeated);
        if it changed in between, the move is tried again against its new state.
        """
        uid = _parse_id(job_id)
        target = data.status
        override = admin and data.worker_id is None
        for _ in range(MAX_UPDATE_ATTEMPTS):
            now = self.clock()
            run_at = (
                None
                if data.retry_in_seconds is None
                else now + timedelta(seconds=data.retry_in_seconds)
            )
            moved = self.repository.transition(
                uid,
                target=target,
                sources=SOURCES[target],
                finished=target in FINISHED,
                now=now,
                error_message=data.error_message,
                versions=if_match,
                # A move to processing makes the caller the holder, as a claim would.
                worker_id=data.worker_id or actor or ANONYMOUS_HOLDER,
                check_worker=data.worker_id is not None,
                override=override,
                lease_until=now + timedelta(seconds=DEFAULT_LEASE_SECONDS),
                result=data.result,
                run_at=run_at,
                actor=actor,
            )
            if moved.changed:
                self._moved([(moved.old_status, moved.job)])
                return moved.job
            unchanged = self._unchanged(job_id, moved, data, if_match, actor, override)
            if unchanged is not None:
                return unchanged
        raise UpdateContention()

    @staticmethod
    def _unchanged(
        job_id: str,
        moved: Moved,
        data: JobUpdate,
        if_match: frozenset[int] | None,
        actor: str | None,
        override: bool,
    ) -> Job | None:
        """Why a PATCH changed nothing: raises the refusal, or returns the job
        when there was nothing to change; None: nothing refuses it now."""
        job = moved.job
        if job is None:
            raise JobNotFound(job_id)
        target = data.status
        if job.status in FINISHED:
            if _same_finish(job, data):
                return job
            raise JobFinished(job.status)
        if if_match is not None and job.version not in if_match:
            raise VersionMismatch(job.version)
        if job.status == JobStatus.PROCESSING and not override:
            refusal = _not_held(job, moved, data.worker_id, actor)
            if refusal is not None:
                raise refusal
        if target == job.status:
            if data.retry_in_seconds is not None:
                raise RetryNotAllowed(job.status)
            if data.error_message == job.error_message:
                return job
        elif target not in TRANSITIONS[job.status]:
            raise InvalidTransition(job.status, target)
        return None

    def _moved(self, jobs: list[tuple[JobStatus | None, Job]]) -> None:
        """Tell the hooks of the jobs a request moved (old status, job)."""
        outcomes = []
        for old_status, job in jobs:
            if old_status == job.status:
                continue
            self.on_status_change(job.status)
            if job.status in FINISHED or old_status in FINISHED:
                outcomes.append(job.id)
        if outcomes:
            self.on_outcome(outcomes)

    def cancel(
        self, job_id: str, request: CancelRequest, *, actor: str | None = None
    ) -> Job:
        """Cancel a pending job at once; ask a processing job's holder to stop
        (it learns so from its heartbeat answer). A finished job is 409, a
        cancelled one (or one already asked) answers as it is."""
        uid = _parse_id(job_id)
        for _ in range(MAX_UPDATE_ATTEMPTS):
            moved = self.repository.cancel(
                uid, now=self.clock(), actor=actor, reason=request.reason
            )
            job = self._found(job_id, moved)
            if moved.changed:
                self._moved([(moved.old_status, moved.job)])
                return job
            if job.status == JobStatus.CANCELLED or (
                job.status == JobStatus.PROCESSING and job.cancel_requested_at
            ):
                return job
            if job.status in FINISHED:
                raise JobFinished(job.status)
        raise UpdateContention()

    def retry(
        self, job_id: str, request: RetryRequest, *, actor: str | None = None
    ) -> Job:
        """A failed or cancelled job runs again, with a fresh allowance of
        attempts; any other status is 409."""
        uid = _parse_id(job_id)
        for _ in range(MAX_UPDATE_ATTEMPTS):
            moved = self.repository.retry(
                uid,
                now=self.clock(),
                actor=actor,
                run_at=request.run_at,
                priority=request.priority,
            )
            job = self._found(job_id, moved)
            if moved.changed:
                self._moved([(moved.old_status, job)])
                return job
            if job.status not in RETRYABLE:
                raise NotRetryable(job.status)
        raise UpdateContention()

    def release(
        self, job_id: str, request: ReleaseRequest, *, actor: str | None = None
    ) -> Job:
        """The holder gives its processing job back, and the attempt with it
        (the next claim's `attempts` is this one's): for a graceful shutdown."""
        delay = timedelta(seconds=request.retry_in_seconds or 0)
        return self._by_holder(
            job_id,
            request.worker_id,
            actor,
            "lease to give back",
            lambda uid, now: self.repository.release(
                uid,
                worker_id=request.worker_id,
                now=now,
                run_at=now + delay,
                actor=actor,
                reason=RELEASED_ON_CANCEL,
            ),
        )

    def bulk(self, request: BulkRequest, *, actor: str | None = None) -> BulkOutcome:
        """The action on every job the filter and ids match, BULK_BATCH jobs
        a call: each changed job gets the event the single action writes.
        The same request again goes on with the rest (changed jobs no longer
        match: a cancelled job is not cancellable, a retried one not failed)."""
        outcome = self.repository.bulk(
            request.action,
            request.filter,
            request.ids,
            dry_run=request.dry_run,
            now=self.clock(),
            actor=actor,
            reason=request.reason,
        )
        self._moved(outcome.changed)
        remaining = BULK_BATCH if request.dry_run else len(outcome.changed)
        return BulkOutcome(
            matched=outcome.matched,
            changed=len(outcome.changed),
            dry_run=request.dry_run,
            more=outcome.matched > remaining,
        )

    @staticmethod
    def _found(job_id: str, moved: Moved) -> Job:
        if moved.job is None:
            raise JobNotFound(job_id)
        return moved.job

    def claim(self, request: ClaimRequest, *, actor: str | None = None) -> ClaimOutcome:
        """Claim up to `limit` due jobs, each with a lease of `lease_seconds`;
        expired leases are swept first, in the same statement. The outcome
        says how many leases that sweep expired (for the LeasesExpired metric)."""
        now = self.clock()
        outcome = self.repository.claim(
            worker_id=request.worker_id,
            limit=request.limit,
            now=now,
            lease_until=now + timedelta(seconds=request.lease_seconds),
            actor=actor,
        )
        if outcome.settled:
            self.on_outcome(outcome.settled)
        return outcome
