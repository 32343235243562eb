"""The HTTP contract: request and response models and the job status enum.

Everything a client can send is bounded here, so bad input becomes a 422
before it reaches the service or the database. PostgreSQL cannot store a
NUL character in text or JSONB, so NUL is rejected everywhere on every
backend: behaviour must not depend on which database runs underneath.
"""

import math
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    create_model,
    model_validator,
)
from pydantic_core import to_json

MAX_DOCUMENT_ID_LENGTH = 255
MAX_ERROR_MESSAGE_LENGTH = 10_000
MAX_WORKER_ID_LENGTH = 255
MAX_SUBJECT_LENGTH = 255  # a token's `sub`, stored as created_by
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 32
MIN_PRIORITY, MAX_PRIORITY = 0, 10
MAX_CLAIM_LIMIT = 100
MIN_LEASE_SECONDS, MAX_LEASE_SECONDS = 10, 43_200
DEFAULT_LEASE_SECONDS = 300
MIN_MAX_ATTEMPTS, MAX_MAX_ATTEMPTS = 1, 100
DEFAULT_MAX_ATTEMPTS = 3
MAX_RETRY_IN_SECONDS = 86_400
MAX_REASON_LENGTH = 1_000
MAX_BULK_IDS = 1_000


class JobStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Finished: final. Nothing changes such a job but an explicit retry.
FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


def check_text(value: str) -> str:
    """Reject what PostgreSQL cannot store: NUL and lone UTF-16 surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (\\u0000)")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(
            "must be valid Unicode (no lone surrogates such as \\ud800)"
        ) from None
    return value


def check_optional_text(value: str | None) -> str | None:
    return None if value is None else check_text(value)


def _check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Bound depth and size, and reject NUL in keys and string values.

    Walks iteratively so that hostile nesting cannot exhaust the stack.
    """
    if value is None:
        return None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list) and depth > MAX_METADATA_DEPTH:
            raise ValueError(f"must be at most {MAX_METADATA_DEPTH} levels deep")
        if isinstance(node, dict):
            for key, child in node.items():
                check_text(key)
                stack.append((child, depth + 1))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
        elif isinstance(node, str):
            check_text(node)
        elif isinstance(node, float) and not math.isfinite(node):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
    # Measured as responses write it (pydantic's serializer, which FastAPI
    # uses for response models), so the bound holds for what is returned.
    size = len(to_json(value))
    if size > MAX_METADATA_BYTES:
        raise ValueError(
            f"must be at most {MAX_METADATA_BYTES} bytes serialized, got {size}"
        )
    return value


RFC3339_START = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _rfc3339_text(value: Any) -> Any:
    """Only a date-time string such as 2030-01-01T09:00:00Z; pydantic would
    otherwise read numbers and numeric strings as Unix times."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not RFC3339_START.match(value):
        raise ValueError(
            "must be an RFC 3339 date-time with an offset, e.g. 2030-01-01T09:00:00Z"
        )
    return value


def _check_instant(value: datetime | None) -> datetime | None:
    """An aware timestamp both databases can store, normalised to UTC."""
    if value is None:
        return None
    try:
        value = value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError("must be a timestamp between years 1 and 9999 UTC") from None
    return value


def _to_utc_iso(value: datetime) -> str:
    # Rows from PostgreSQL and our own clock are in UTC already (the common
    # case, which skips building a converted copy); the result is the same.
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")


Timestamp = Annotated[datetime, PlainSerializer(_to_utc_iso, return_type=str)]

DocumentId = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=MAX_DOCUMENT_ID_LENGTH),
    AfterValidator(check_text),
]
Priority = Annotated[int, Field(strict=True, ge=MIN_PRIORITY, le=MAX_PRIORITY)]
Metadata = Annotated[dict[str, Any] | None, AfterValidator(_check_metadata)]
ErrorMessage = Annotated[
    str | None,
    StringConstraints(strict=True, max_length=MAX_ERROR_MESSAGE_LENGTH),
    AfterValidator(check_optional_text),
]
WorkerId = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=MAX_WORKER_ID_LENGTH),
    AfterValidator(check_text),
]
LeaseSeconds = Annotated[
    int, Field(strict=True, ge=MIN_LEASE_SECONDS, le=MAX_LEASE_SECONDS)
]
MaxAttempts = Annotated[
    int, Field(strict=True, ge=MIN_MAX_ATTEMPTS, le=MAX_MAX_ATTEMPTS)
]
RetryInSeconds = Annotated[int, Field(strict=True, ge=0, le=MAX_RETRY_IN_SECONDS)]
# An RFC 3339 string with an offset; numbers (epoch seconds) are refused.
Instant = Annotated[
    AwareDatetime, BeforeValidator(_rfc3339_text), AfterValidator(_check_instant)
]


class JobCreate(BaseModel):
    """Body of `POST /extraction-jobs`.

    `priority` must be a JSON integer: booleans, numeric strings and
    floats (even `5.0`) are rejected rather than silently coerced.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "document_id": "invoice-2026-0042.pdf",
                    "priority": 5,
                    "metadata": {
                        "source": "s3://inbox/invoice-2026-0042.pdf",
                        "pages": 3,
                    },
                }
            ]
        },
    )

    document_id: DocumentId = Field(
        description="The document this job extracts; 1..255 characters."
    )
    priority: Priority = Field(
        default=0,
        description="0..10, 10 is most urgent. A JSON integer; no floats, strings or booleans.",
    )
    metadata: Metadata = Field(
        default=None,
        description=f"A JSON object or null; at most {MAX_METADATA_BYTES} bytes serialized "
        f"and {MAX_METADATA_DEPTH} levels deep.",
    )
    max_attempts: MaxAttempts = Field(
        default=DEFAULT_MAX_ATTEMPTS,
        description=f"{MIN_MAX_ATTEMPTS}..{MAX_MAX_ATTEMPTS}: after this many expired "
        "leases the job fails instead of being claimed again.",
    )
    run_at: Instant | None = Field(
        default=None,
        description="Not claimed before this instant (RFC 3339 with an offset); "
        "past or absent means now.",
    )


class JobUpdate(BaseModel):
    """Body of `PATCH /extraction-jobs/{id}`. An absent `error_message` stores null."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"status": "failed", "error_message": "OCR engine timed out"}]
        },
    )

    status: JobStatus = Field(
        description="The target status; moves follow the job state machine."
    )
    error_message: ErrorMessage = Field(
        default=None,
        description=f"Stored as sent; at most {MAX_ERROR_MESSAGE_LENGTH} characters.",
    )
    worker_id: WorkerId | None = Field(
        default=None,
        description="The worker sending this; for a processing job it must be the "
        "lease holder's (409 otherwise).",
    )
    retry_in_seconds: RetryInSeconds | None = Field(
        default=None,
        description=f"With status pending only: not claimed again for 0..{MAX_RETRY_IN_SECONDS} "
        "seconds (a release or retry with backoff).",
    )
    result: Metadata = Field(
        default=None,
        description="With status completed only: a JSON object, the same limits as metadata.",
    )

    @model_validator(mode="after")
    def _fields_fit_the_status(self) -> "JobUpdate":
        if self.retry_in_seconds is not None and self.status != JobStatus.PENDING:
            raise ValueError("retry_in_seconds is only allowed with status 'pending'")
        if self.result is not None and self.status != JobStatus.COMPLETED:
            raise ValueError("result is only allowed with status 'completed'")
        return self


class ClaimRequest(BaseModel):
    """Body of `POST /extraction-jobs/claim`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"worker_id": "ocr-worker-7", "limit": 5}]},
    )

    worker_id: WorkerId = Field(description="Who claims the jobs; 1..255 characters.")
    limit: int = Field(
        default=1,
        strict=True,
        ge=1,
        le=MAX_CLAIM_LIMIT,
        description="How many jobs to claim at most.",
    )
    lease_seconds: LeaseSeconds = Field(
        default=DEFAULT_LEASE_SECONDS,
        description=f"{MIN_LEASE_SECONDS}..{MAX_LEASE_SECONDS}: each claimed job is "
        "claimable again by others once this runs out without a heartbeat.",
    )


class HeartbeatRequest(BaseModel):
    """Body of `POST /extraction-jobs/{id}/heartbeat`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"worker_id": "ocr-worker-7", "lease_seconds": 300}]
        },
    )

    worker_id: WorkerId = Field(description="The lease holder.")
    lease_seconds: LeaseSeconds = Field(
        default=DEFAULT_LEASE_SECONDS,
        description="The new lease, counted from now.",
    )


Reason = Annotated[
    str | None,
    StringConstraints(strict=True, max_length=MAX_REASON_LENGTH),
    AfterValidator(check_optional_text),
]


class CancelRequest(BaseModel):
    """Body of `POST /extraction-jobs/{id}/cancel`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"reason": "uploaded the wrong file"}]},
    )

    reason: Reason = Field(
        default=None,
        description=f"Why, at most {MAX_REASON_LENGTH} characters; kept in the history.",
    )


class RetryRequest(BaseModel):
    """Body of `POST /extraction-jobs/{id}/retry`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"run_at": "2030-01-01T09:00:00Z"}]},
    )

    run_at: Instant | None = Field(
        default=None, description="Not claimed before this instant; absent means now."
    )
    priority: Priority | None = Field(
        default=None, description="A new priority, 0..10; absent keeps the job's."
    )


class ReleaseRequest(BaseModel):
    """Body of `POST /extraction-jobs/{id}/release`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"worker_id": "ocr-worker-7"}]},
    )

    worker_id: WorkerId = Field(description="The lease holder giving the job back.")
    retry_in_seconds: RetryInSeconds | None = Field(
        default=None,
        description=f"Not claimed again for 0..{MAX_RETRY_IN_SECONDS} seconds; "
        "absent means at once.",
    )


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ListOrder(StrEnum):
    ASC = "asc"
    DESC = "desc"


class JobFilter(BaseModel):
    """Which jobs: the list's filters, shared by `GET /extraction-jobs` and
    bulk actions. Every filter given must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Annotated[tuple[JobStatus, ...] | None, BeforeValidator(_one_or_many)] = (
        Field(default=None, description="Any of these statuses (one, or a list).")
    )
    document_id: DocumentId | None = Field(default=None, description="Exact match.")
    created_after: Instant | None = Field(
        default=None, description="Created at or after this instant."
    )
    created_before: Instant | None = Field(
        default=None, description="Created before this instant."
    )
    worker_id: WorkerId | None = Field(
        default=None, description="Held, or last held, by this worker."
    )

    def is_empty(self) -> bool:
        return not any(self.model_dump().values())  # None, or an empty status list


class BulkAction(StrEnum):
    CANCEL = "cancel"
    RETRY = "retry"


class BulkRequest(BaseModel):
    """Body of `POST /extraction-jobs/bulk`: an action on every job that
    matches `filter` and `ids` (both optional, not both empty)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "action": "retry",
                    "filter": {"status": ["failed"], "document_id": "batch-7.pdf"},
                    "dry_run": True,
                }
            ]
        },
    )

    action: BulkAction = Field(description="What to do to each matching job.")
    filter: JobFilter = Field(default_factory=JobFilter)
    ids: Annotated[list[uuid.UUID] | None, Field(max_length=MAX_BULK_IDS)] = Field(
        default=None, description=f"At most {MAX_BULK_IDS} job ids."
    )
    dry_run: bool = Field(
        default=False,
        strict=True,
        description="Count what would change; change nothing.",
    )
    reason: Reason = Field(
        default=None, description="With action cancel: kept in each job's history."
    )

    @model_validator(mode="after")
    def _selects_something(self) -> "BulkRequest":
        if self.filter.is_empty() and not self.ids:
            raise ValueError(
                "give a filter or ids: an empty selection would act on every job"
            )
        if self.reason is not None and self.action != BulkAction.CANCEL:
            raise ValueError("reason is only allowed with action 'cancel'")
        return self


class BulkOutcome(BaseModel):
    matched: int = Field(
        description="Jobs that match and the action applies to, before this call "
        "(counted up to 100000)."
    )
    changed: int = Field(description="Jobs this call changed (none on a dry run).")
    dry_run: bool
    more: bool = Field(
        description="Matching jobs remain unchanged: send the same request again."
    )


# A failed job: every field has a value (FastAPI drops nulls from examples).
JOB_EXAMPLE = {
    "id": "0b7c3a52-8a1e-4a53-9d38-6f0a3c0d2b11",
    "document_id": "invoice-2026-0042.pdf",
    "status": "failed",
    "priority": 5,
    "metadata": {"source": "s3://inbox/invoice-2026-0042.pdf", "pages": 3},
    "error_message": "OCR engine timed out",
    "created_at": "2026-11-27T04:11:59.123456+00:00",
    "updated_at": "2026-11-27T04:12:41.020000+00:00",
    "created_by": "auth0|5f7c8ec7c33c6c004bbafe82",
    "attempts": 1,
    "worker_id": "ocr-worker-7",
    "started_at": "2026-11-27T04:12:03.500000+00:00",
    "finished_at": "2026-11-27T04:12:41.020000+00:00",
    "version": 4,
    "max_attempts": 3,
    "run_at": "2026-11-27T04:11:59.123456+00:00",
    "lease_expires_at": "2026-11-27T04:17:33.500000+00:00",
    "heartbeat_at": "2026-11-27T04:12:33.500000+00:00",
    "cancel_requested_at": "2026-11-27T04:12:40.000000+00:00",
    "result": {"pages_read": 2},
    "updated_by": "auth0|5f7c8ec7c33c6c004bbafe82",
}


class Job(BaseModel):
    """A job as the API returns it."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str = Field(description="UUID4.")
    document_id: str
    status: JobStatus
    priority: int
    metadata: dict[str, Any] | None
    error_message: str | None
    created_at: Timestamp
    updated_at: Timestamp
    created_by: str | None = Field(
        description="The token's `sub`; null when auth is disabled."
    )
    attempts: int = Field(description="How many times the job entered processing.")
    worker_id: str | None = Field(
        description="The worker that holds it (while processing) or held it last."
    )
    started_at: Timestamp | None = Field(description="When it last entered processing.")
    finished_at: Timestamp | None = Field(
        description="When it finished: completed, failed or cancelled."
    )
    version: int = Field(description="Incremented on every change; sent as the ETag.")
    max_attempts: int = Field(description="Expired leases allowed before it fails.")
    run_at: Timestamp = Field(description="Not claimed before this instant.")
    lease_expires_at: Timestamp | None = Field(
        description="While processing: when the holder's lease runs out."
    )
    heartbeat_at: Timestamp | None = Field(
        description="The holder's last heartbeat in this lease; null before the first."
    )
    cancel_requested_at: Timestamp | None = Field(
        description="When an operator asked to cancel it: a processing job's holder "
        "learns it from its heartbeat answer and should stop."
    )
    result: dict[str, Any] | None = Field(description="What a completed job produced.")
    updated_by: str | None = Field(
        description="The token's `sub` behind the last change; null when auth is "
        "disabled or the change was the sweep's."
    )


class EventType(StrEnum):
    CREATED = "created"
    CLAIMED = "claimed"
    COMPLETED = "completed"
    FAILED = "failed"
    # An operator's cancel: of a pending job at once, of a processing one as
    # a request its holder honours (from processing to processing), and the
    # holder's own move to cancelled.
    CANCELLED = "cancelled"
    RETRIED = "retried"
    RELEASED = "released"
    LEASE_EXPIRED = "lease_expired"
    UPDATED = "updated"
    # Written by earlier releases only: one per heartbeat, and every other
    # status move.
    HEARTBEAT = "heartbeat"
    STATUS_CHANGED = "status_changed"


# The events published to EventBridge (as detail-type `job.<type>`) when
# they move a job to a new status: the outcomes downstream systems act on.
PUBLISHED_EVENTS = frozenset(
    {EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED, EventType.RETRIED}
)


class JobEvent(BaseModel):
    """One entry of a job's append-only history."""

    id: int = Field(description="Stable and unique; increases in commit order per job.")
    job_id: str
    at: Timestamp
    type: EventType
    from_status: JobStatus | None
    to_status: JobStatus | None
    actor: str | None = Field(description="The token's `sub`; null for the sweep.")
    worker_id: str | None
    detail: dict[str, Any] | None


# One count per status, derived from the enum.
StatusCounts = create_model(
    "StatusCounts",
    __base__=BaseModel,
    **{status.value: (int, ...) for status in JobStatus},
)


# /stats counts each status exactly up to here (an index range of bounded
# length); past it, the database's estimate where it has one.
EXACT_COUNT_CAP = 5_000


class JobStats(BaseModel):
    counts: StatusCounts
    estimated: list[JobStatus] = Field(
        description="The statuses whose count is the database's estimate (over "
        f"{EXACT_COUNT_CAP} jobs); every other count is exact."
    )
    oldest_pending_age_seconds: float | None = Field(
        description="Seconds the longest-waiting due job has waited, counted from "
        "its run_at; null when no pending job is due."
    )
    expired_leases: int = Field(
        description="Processing jobs whose lease has run out, not yet swept or claimed."
    )


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    database: str = Field(examples=["ok"])


class ErrorBody(BaseModel):
    detail: str = Field(
        description="What went wrong, in words.",
        examples=["Extraction job '0b7c3a52-8a1e-4a53-9d38-6f0a3c0d2b11' not found"],
    )


class ValidationProblem(BaseModel):
    """One problem with the request; the offending input is never echoed."""

    type: str = Field(examples=["less_than_equal"])
    loc: list[str | int] = Field(
        description="Where: body, query or header, then the field path.",
        examples=[["body", "priority"]],
    )
    msg: str = Field(examples=["Input should be less than or equal to 10"])


class ValidationErrorBody(BaseModel):
    """A 422. For a reused Idempotency-Key (create only), `detail` is a sentence."""

    detail: list[ValidationProblem] | str = Field(
        description="One entry per problem; a sentence for a reused Idempotency-Key."
    )
