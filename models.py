"""The HTTP contract: request and response models and the job status enum.

Everything a client can send is bounded here, so bad input becomes a 422
before it reaches the service or the database. PostgreSQL cannot store a
NUL character in text or JSONB, so NUL is rejected everywhere on every
backend: behaviour must not depend on which database runs underneath.
"""

import json
import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
)

MAX_DOCUMENT_ID_LENGTH = 255
MAX_ERROR_MESSAGE_LENGTH = 10_000
MAX_WORKER_ID_LENGTH = 255
MAX_SUBJECT_LENGTH = 255  # a token's `sub`, stored as created_by
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 32
MIN_PRIORITY, MAX_PRIORITY = 0, 10
MAX_CLAIM_LIMIT = 100


class JobStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


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
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(
            f"must be at most {MAX_METADATA_BYTES} bytes serialized, got {size}"
        )
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
    "version": 3,
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
    worker_id: str | None = Field(description="The worker that claimed it last.")
    started_at: Timestamp | None = Field(description="When it last entered processing.")
    finished_at: Timestamp | None = Field(
        description="When it reached completed or failed."
    )
    version: int = Field(description="Incremented on every change; sent as the ETag.")


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
