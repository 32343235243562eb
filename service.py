"""The rules of a job's life: ids, timestamps, status moves, concurrency.

This module knows nothing of HTTP. Its exceptions are mapped to status
codes in one place, `main.py`.
"""

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from models import (
    DEFAULT_LEASE_SECONDS,
    FINISHED,
    ClaimRequest,
    HeartbeatRequest,
    Job,
    JobCreate,
    JobStats,
    JobStatus,
    JobUpdate,
)
from repository import (
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
    # Back to pending is the holder releasing the job (spending the attempt).
    JobStatus.PROCESSING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.PENDING}
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
class ParsedCursor:
    after_seq: int
    payload: bytes
    signature: bytes


class CursorCodec:
    """Opaque, tamper-evident list cursors: the position and the filters,
    HMAC-SHA256-signed, base64url. A cursor from another filter, deployment
    or hand is refused (`InvalidPage`), never trusted.

    The key is `CURSOR_SECRET` when set; otherwise the random key revision
    0002 stored in the database, read once per process (it rides along the
    first list query), so every instance on one database signs alike.
    """

    SIGNATURE_BYTES = 16
    INVALID = (
        "Invalid cursor: use the Link header of the previous page unchanged, "
        "with the same document_id and status filters"
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

    def encode(self, after_seq: int, filters: list[str | None]) -> str:
        payload = json.dumps([1, after_seq, filters], separators=(",", ":")).encode()
        token = payload + self._sign(payload)
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode()

    def parse(self, cursor: str, filters: list[str | None]) -> ParsedCursor:
        """The cursor's position, not yet trusted: `verify` says if it is ours."""
        try:
            token = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            payload = token[: -self.SIGNATURE_BYTES]
            version, after_seq, signed_filters = json.loads(payload)
        except (ValueError, TypeError, UnicodeError):
            raise InvalidPage(self.INVALID) from None
        if (
            len(token) <= self.SIGNATURE_BYTES
            or version != 1
            or signed_filters != filters
            or not isinstance(after_seq, int)
            or isinstance(after_seq, bool)
            or not 0 <= after_seq < 2**63
        ):
            raise InvalidPage(self.INVALID)
        return ParsedCursor(after_seq, payload, token[-self.SIGNATURE_BYTES :])

    def verify(self, cursor: ParsedCursor) -> None:
        if not hmac.compare_digest(cursor.signature, self._sign(cursor.payload)):
            raise InvalidPage(self.INVALID)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _parse_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise JobNotFound(job_id) from None


def _same_request(job: Job, data: JobCreate) -> bool:
    # run_at was stored as max(requested, created_at): absent or past is "now".
    requested_run_at = (
        job.created_at
        if data.run_at is None or data.run_at <= job.created_at
        else data.run_at
    )
    return (
        job.document_id,
        job.priority,
        job.metadata,
        job.max_attempts,
        job.run_at,
    ) == (
        data.document_id,
        data.priority,
        data.metadata,
        data.max_attempts,
        requested_run_at,
    )


def _same_finish(job: Job, data: JobUpdate) -> bool:
    """`data` is the request that finished `job`, repeated."""
    return (data.status, data.result, data.error_message) == (
        job.status,
        job.result,
        job.error_message,
    )


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
    ) -> None:
        self.repository = repository
        self.clock = clock
        self.cursors = CursorCodec(
            CursorCodec.derive(cursor_secret) if cursor_secret else None
        )
        self.retention_days = retention_days
        # A hook for metrics: called with the new status after each PATCH move.
        self.on_status_change = on_status_change

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
        *,
        document_id: str | None,
        status: JobStatus | None,
        limit: int,
        offset: int,
        cursor: str | None = None,
    ) -> Page:
        """A page in creation order, and the cursor of the next when more follow.

        A cursor is a position (keyset on the creation counter), so a page
        deep in a million rows costs what the first does, and jobs created
        while walking are neither skipped nor repeated.
        """
        filters = [document_id, status.value if status else None]
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
            document_id=document_id,
            status=status,
            limit=limit,
            offset=offset,
            after_seq=parsed.after_seq if parsed else None,
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
        next_cursor = (
            self.cursors.encode(last_seq, filters)
            if more and last_seq is not None
            else None
        )
        return Page(jobs, next_cursor)

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
        uid = _parse_id(job_id)
        for _ in range(MAX_UPDATE_ATTEMPTS):
            now = self.clock()
            moved = self.repository.heartbeat(
                uid,
                worker_id=request.worker_id,
                now=now,
                lease_until=now + timedelta(seconds=request.lease_seconds),
                actor=actor,
            )
            job = moved.job
            if moved.changed:
                return job
            if job is None:
                raise JobNotFound(job_id)
            if job.status != JobStatus.PROCESSING:
                raise NotLeaseHolder(
                    f"The job is {job.status.value}, not processing: there is no lease "
                    "to extend"
                )
            refusal = _not_held(job, moved, request.worker_id, actor)
            if refusal is not None:
                raise refusal
        raise UpdateContention()

    def sweep(self) -> SweepOutcome:
        """Apply lease expiry to every expired lease, then retention, in
        bounded batches (each its own short statement or transaction)."""
        failed = released = deleted = 0
        for _ in range(MAX_RETENTION_BATCHES):
            outcome = self.repository.sweep_leases(self.clock())
            failed, released = failed + outcome.failed, released + outcome.released
            if not (outcome.failed or outcome.released):
                break
        if self.retention_days is not None:
            cutoff = self.clock() - timedelta(days=self.retention_days)
            for _ in range(MAX_RETENTION_BATCHES):
                batch = self.repository.delete_finished(cutoff, FINISHED)
                deleted += batch
                if not batch:
                    break
        return SweepOutcome(failed=failed, released=released, deleted=deleted)

    def update(
        self,
        job_id: str,
        data: JobUpdate,
        *,
        if_match: frozenset[int] | None = None,
        actor: str | None = None,
    ) -> Job:
        """Move a job along the state machine.

        `if_match` holds the versions the client accepts (None: any). The move
        is one conditional UPDATE whose WHERE clause is the state machine, the
        lease's holder and If-Match, so a concurrent change is never
        overwritten. When it changes nothing, the job as it stood says why:
        404, 412, 409, or nothing to change (the finishing request repeated);
        if it changed in between, the move is tried again against its new state.
        """
        uid = _parse_id(job_id)
        target = data.status
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
                lease_until=now + timedelta(seconds=DEFAULT_LEASE_SECONDS),
                result=data.result,
                run_at=run_at,
                actor=actor,
            )
            if moved.changed:
                if moved.old_status != target:
                    self.on_status_change(target)
                return moved.job
            unchanged = self._unchanged(job_id, moved, data, if_match, actor)
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
        if job.status == JobStatus.PROCESSING:
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

    def claim(self, request: ClaimRequest, *, actor: str | None = None) -> ClaimOutcome:
        """Claim up to `limit` due jobs, each with a lease of `lease_seconds`;
        expired leases are swept first, in the same statement. The outcome
        says how many leases that sweep expired (for the LeasesExpired metric)."""
        now = self.clock()
        return self.repository.claim(
            worker_id=request.worker_id,
            limit=request.limit,
            now=now,
            lease_until=now + timedelta(seconds=request.lease_seconds),
            actor=actor,
        )
