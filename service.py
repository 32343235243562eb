"""The rules of a job's life: ids, timestamps, status moves, concurrency.

This module knows nothing of HTTP. Its exceptions are mapped to status
codes in one place, `main.py`.
"""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from models import ClaimRequest, Job, JobCreate, JobStatus, JobUpdate
from repository import ExtractionJobRepository, IdempotencyKeyTaken

# The one state machine: where each status may move next.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset(
        {JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.FAILED}
    ),
    # Back to pending is a worker releasing the job.
    JobStatus.PROCESSING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.PENDING}
    ),
    # A failed job may be retried.
    JobStatus.FAILED: frozenset({JobStatus.PENDING}),
    JobStatus.COMPLETED: frozenset(),
}
FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED})

# Without If-Match, a PATCH that loses a race re-reads and re-checks the
# state machine; this bounds how often before it gives up.
MAX_UPDATE_ATTEMPTS = 10
ONE_MICROSECOND = timedelta(microseconds=1)


class JobNotFound(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"Extraction job {job_id!r} not found")


class InvalidTransition(Exception):
    def __init__(self, current: JobStatus, target: JobStatus) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none, it is final"
        super().__init__(
            f"Cannot move a job from '{current}' to '{target}' (allowed from '{current}': {allowed})"
        )


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


class UpdateContention(Exception):
    def __init__(self) -> None:
        super().__init__("The job is being changed by others right now; retry")


def utc_now() -> datetime:
    return datetime.now(UTC)


def _parse_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise JobNotFound(job_id) from None


def _same_request(job: Job, data: JobCreate) -> bool:
    return (job.document_id, job.priority, job.metadata) == (
        data.document_id,
        data.priority,
        data.metadata,
    )


class JobService:
    def __init__(
        self,
        repository: ExtractionJobRepository,
        clock: Callable[[], datetime] = utc_now,
        on_status_change: Callable[[JobStatus], None] = lambda status: None,
    ) -> None:
        self.repository = repository
        self.clock = clock
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
        """Create a job; returns it and whether it is a replay of an earlier create."""
        if idempotency_key is not None:
            earlier = self.repository.get_by_idempotency_key(
                created_by, idempotency_key
            )
            if earlier is not None:
                return self._replay(earlier, data), True
        now = self.clock()
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
        )
        try:
            return self.repository.add(job, idempotency_key), False
        except IdempotencyKeyTaken:
            # A concurrent request with the same key won the unique constraint.
            winner = self.repository.get_by_idempotency_key(created_by, idempotency_key)
            if winner is None:
                raise
            return self._replay(winner, data), True

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
    ) -> list[Job]:
        return self.repository.list_jobs(
            document_id=document_id, status=status, limit=limit, offset=offset
        )

    def update(
        self, job_id: str, data: JobUpdate, *, if_match: frozenset[int] | None = None
    ) -> Job:
        """Move a job along the state machine.

        `if_match` holds the versions the client accepts (None: any). The write
        is a compare-and-swap on `version`, so a concurrent change is never
        overwritten: with If-Match it is a `VersionMismatch`; without, the
        move is re-checked against the fresh state.
        """
        uid = _parse_id(job_id)
        for _ in range(MAX_UPDATE_ATTEMPTS):
            job = self.repository.get(uid)
            if job is None:
                raise JobNotFound(job_id)
            if if_match is not None and job.version not in if_match:
                raise VersionMismatch(job.version)
            changes = self._changes(job, data)
            if not changes:
                return job
            updated = self.repository.update(uid, job.version, **changes)
            if updated is not None:
                if "status" in changes:
                    self.on_status_change(updated.status)
                return updated
            if if_match is not None:
                latest = self.repository.get(uid)
                if latest is None:
                    raise JobNotFound(job_id)
                raise VersionMismatch(latest.version)
        raise UpdateContention()

    def _changes(self, job: Job, data: JobUpdate) -> dict[str, object]:
        if data.status == job.status:
            if data.error_message == job.error_message:
                return {}
            return {"error_message": data.error_message, "updated_at": self._after(job)}
        if data.status not in TRANSITIONS[job.status]:
            raise InvalidTransition(job.status, data.status)
        now = self._after(job)
        changes: dict[str, object] = {
            "status": data.status.value,
            "error_message": data.error_message,
            "updated_at": now,
            "finished_at": now if data.status in FINISHED else None,
        }
        if data.status == JobStatus.PROCESSING:
            changes |= {"started_at": now, "attempts": job.attempts + 1}
        return changes

    def _after(self, job: Job) -> datetime:
        """Now, but strictly after the job's last change, whatever the clock says."""
        return max(self.clock(), job.updated_at + ONE_MICROSECOND)

    def claim(self, request: ClaimRequest) -> list[Job]:
        return self.repository.claim(
            worker_id=request.worker_id, limit=request.limit, now=self.clock()
        )
