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
# The same machine read backwards: from where each status may be reached.
SOURCES: dict[JobStatus, frozenset[JobStatus]] = {
    target: frozenset(
        source for source, targets in TRANSITIONS.items() if target in targets
    )
    for target in JobStatus
}

# A PATCH refused by its conditional UPDATE re-reads the job; if the job
# changed in between, it tries again. This bounds how often.
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


def _moved(job: Job, target: JobStatus) -> bool:
    """Whether a transition that succeeded changed the status, told from the
    row it returned: a move to completed or failed stamps `finished_at`, a
    move to processing `started_at`, with the same instant as `updated_at`; a
    change of the error message alone leaves them older. On a pending job the
    two look alike, and count as a move."""
    if target in FINISHED:
        return job.finished_at == job.updated_at
    if target == JobStatus.PROCESSING:
        return job.started_at == job.updated_at
    return True


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
        """Create a job; returns it and whether it is a replay of an earlier create.

        The INSERT comes first, so a create is one round trip unless the key
        was used before; the unique index on (caller, key) decides, also
        between concurrent requests with the same key.
        """
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
        for last_try in (False, True):
            try:
                return self.repository.add(job, idempotency_key), False
            except IdempotencyKeyTaken:
                earlier = self.repository.get_by_idempotency_key(
                    created_by, idempotency_key
                )
                if earlier is not None:
                    return self._replay(earlier, data), True
                if last_try:
                    raise
                # The key's holder could not be read: insert and look once more.
        raise UpdateContention()  # not reached: the last try returns or raises

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

        `if_match` holds the versions the client accepts (None: any). The move
        is one conditional UPDATE whose WHERE clause is the state machine (and
        If-Match), so a concurrent change is never overwritten. Only when it
        changes nothing is the job read again, to say why: 404, 412, 409, or
        nothing to change; if it changed in between, the move is tried again
        against its new state.
        """
        uid = _parse_id(job_id)
        target = data.status
        for _ in range(MAX_UPDATE_ATTEMPTS):
            updated = self.repository.transition(
                uid,
                target=target,
                error_message=data.error_message,
                sources=SOURCES[target],
                versions=if_match,
                finished=target in FINISHED,
                now=self.clock(),
            )
            if updated is not None:
                if _moved(updated, target):
                    self.on_status_change(updated.status)
                return updated
            job = self.repository.get(uid)
            if job is None:
                raise JobNotFound(job_id)
            if if_match is not None and job.version not in if_match:
                raise VersionMismatch(job.version)
            if target == job.status:
                if data.error_message == job.error_message:
                    return job  # nothing to change
            elif target not in TRANSITIONS[job.status]:
                raise InvalidTransition(job.status, target)
        raise UpdateContention()

    def _after(self, job: Job) -> datetime:
        """Now, but strictly after the job's last change, whatever the clock says."""
        return max(self.clock(), job.updated_at + ONE_MICROSECOND)

    def claim(self, request: ClaimRequest) -> list[Job]:
        return self.repository.claim(
            worker_id=request.worker_id, limit=request.limit, now=self.clock()
        )
