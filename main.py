"""HTTP routes, and the one place where domain errors become status codes."""

from typing import Annotated

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    Query,
    Request,
    Response,
    Security,
)
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator
from sqlalchemy.exc import StatementError
from starlette.exceptions import HTTPException as StarletteHTTPException

import observability
from auth import (
    READ_SCOPE,
    WRITE_SCOPE,
    Principal,
    authenticator_from_env,
    require_scope,
)
from database import DatabaseUnavailable, SchemaOutOfDate, database_url_from_env
from models import (
    MAX_DOCUMENT_ID_LENGTH,
    ClaimRequest,
    ErrorBody,
    Health,
    Job,
    JobCreate,
    JobStatus,
    JobUpdate,
    check_optional_text,
)
from repository import ExtractionJobRepository
from service import (
    IdempotencyKeyReused,
    InvalidTransition,
    JobNotFound,
    JobService,
    UpdateContention,
    VersionMismatch,
)

MAX_BODY_BYTES = 1024 * 1024
MAX_OFFSET = 2**63 - 1  # the largest OFFSET both databases accept
RETRY_AFTER_SECONDS = "5"


def _errors(*codes: int) -> dict[int | str, dict]:
    descriptions = {
        401: "Missing or invalid bearer token",
        403: "The token lacks the needed permission",
        404: "No job with this id",
        409: "The status move is not allowed from the job's current status",
        412: "If-Match does not match the job's current version (ETag)",
        413: "Request body larger than 1 MiB",
        422: "Invalid request",
        503: "Database or token signing keys unavailable; see Retry-After",
    }
    return {
        code: {"model": ErrorBody, "description": descriptions[code]} for code in codes
    }


def get_service(request: Request) -> JobService:
    return request.app.state.service


def _logged(dependency):
    """`dependency`, and the caller it admits noted for the request's log line."""

    async def caller(principal: Annotated[Principal, Depends(dependency)]) -> Principal:
        observability.note_caller(principal.sub, principal.azp)
        return principal

    return caller


Service = Annotated[JobService, Depends(get_service)]
Reader = Annotated[
    Principal, Security(_logged(require_scope(READ_SCOPE)), scopes=[READ_SCOPE])
]
Writer = Annotated[
    Principal, Security(_logged(require_scope(WRITE_SCOPE)), scopes=[WRITE_SCOPE])
]

router = APIRouter(prefix="/extraction-jobs", tags=["extraction jobs"])
COMMON_ERRORS = (401, 403, 503)


def _etag(response: Response, job: Job) -> Job:
    response.headers["ETag"] = f'"{job.version}"'
    return job


def _parse_if_match(value: str | None) -> frozenset[int] | None:
    """The versions an If-Match header accepts; None means any (absent or `*`).

    Weak tags never match (RFC 9110 compares If-Match strongly), and a tag
    that is not one of ours matches nothing.
    """
    if value is None or value.strip() == "*":
        return None
    versions = set()
    for tag in value.split(","):
        tag = tag.strip()
        if len(tag) >= 2 and tag[0] == tag[-1] == '"' and tag[1:-1].isdigit():
            versions.add(int(tag[1:-1]))
    return frozenset(versions)


@router.post(
    "",
    status_code=201,
    response_model=Job,
    summary="Create a job",
    responses=_errors(413, 422, *COMMON_ERRORS),
)
def create_job(
    data: JobCreate,
    response: Response,
    service: Service,
    principal: Writer,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            pattern=r"^[\x20-\x7e]+$",
            description="Makes a retried create safe: the same key and body return the same job.",
        ),
    ] = None,
) -> Job:
    job, replayed = service.create(
        data, created_by=principal.sub, idempotency_key=idempotency_key
    )
    response.headers["Location"] = f"/extraction-jobs/{job.id}"
    observability.touched(job.id)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        observability.count("JobsCreated")
    return _etag(response, job)


@router.post(
    "/claim",
    response_model=list[Job],
    summary="Claim the next pending jobs, most urgent first",
    responses=_errors(413, 422, *COMMON_ERRORS),
)
def claim_jobs(request: ClaimRequest, service: Service, _: Writer) -> list[Job]:
    jobs = service.claim(request)
    observability.touched(*(job.id for job in jobs))
    observability.count("JobsClaimed", len(jobs))
    return jobs


@router.get(
    "",
    response_model=list[Job],
    summary="List jobs in creation order",
    responses=_errors(422, *COMMON_ERRORS),
)
def list_jobs(
    service: Service,
    _: Reader,
    document_id: Annotated[
        str | None,
        Query(
            min_length=1, max_length=MAX_DOCUMENT_ID_LENGTH, description="Exact match."
        ),
        AfterValidator(check_optional_text),
    ] = None,
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=0, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[Job]:
    return service.list_jobs(
        document_id=document_id, status=status, limit=limit, offset=offset
    )


@router.get(
    "/{job_id}",
    response_model=Job,
    summary="Get one job",
    responses=_errors(404, *COMMON_ERRORS),
)
def get_job(job_id: str, response: Response, service: Service, _: Reader) -> Job:
    return _etag(response, service.get(job_id))


@router.patch(
    "/{job_id}",
    response_model=Job,
    summary="Change a job's status",
    responses=_errors(404, 409, 412, 413, 422, *COMMON_ERRORS),
)
def update_job(
    job_id: str,
    data: JobUpdate,
    response: Response,
    service: Service,
    _: Writer,
    if_match: Annotated[
        str | None,
        Header(
            alias="If-Match",
            description='Only change the job if its ETag is this, e.g. "3".',
        ),
    ] = None,
) -> Job:
    job = service.update(job_id, data, if_match=_parse_if_match(if_match))
    return _etag(response, job)


def health(request: Request) -> JSONResponse:
    """Public: a real round trip to the database, at the schema this code needs."""
    try:
        get_service(request).database_ok()
    except DatabaseUnavailable as error:
        state = (
            "schema_out_of_date"
            if isinstance(error, SchemaOutOfDate)
            else "unavailable"
        )
        return JSONResponse(
            Health(status="unavailable", database=state).model_dump(),
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    return JSONResponse(Health(status="ok", database="ok").model_dump())


class BodySizeLimit:
    """Answer 413 to request bodies over `max_bytes`, declared or streamed.

    The body is buffered (at most `max_bytes`) before the app sees it, so an
    oversized upload is refused without reaching validation or the database.
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body: bytes | None = b"".join(chunks)

        async def replay() -> dict:
            # The buffered body once; then the real channel, which reports a
            # disconnect instead of an endless stream of empty bodies.
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body}, None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        detail = f"Request body must be at most {self.max_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def log_unhandled(scope: dict, error: Exception) -> None:
    """One JSON log line per unhandled error, with the request id (no traceback)."""
    request_context = (scope.get("aws.event") or {}).get("requestContext") or {}
    route = scope.get("route")
    observability.logger.error(
        "unhandled exception",
        extra={
            "request_id": observability.current_request_id()
            or request_context.get("requestId"),
            "method": scope.get("method"),
            "route": getattr(route, "path", None) or observability.UNMATCHED_ROUTE,
            "error": _describe_error(error),
        },
    )


def _describe_error(error: Exception) -> str:
    """The error for the log, without a failed statement's SQL parameters
    (they would carry a job's metadata or error message)."""
    if isinstance(error, StatementError):
        cause = error.orig
        return (
            f"{type(error).__name__} ({type(cause).__name__ if cause else 'no cause'})"
        )
    return f"{type(error).__name__}: {error}"


def _printable(text: str) -> str:
    """Text that is always encodable, even from lone surrogates in the input."""
    return text.encode("utf-8", "backslashreplace").decode()


async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 shape, without echoing the input back.

    The echo could be up to a mebibyte, and values such as NaN or a lone
    surrogate cannot even be encoded in a JSON response.
    """
    detail = [
        {
            "type": item["type"],
            "loc": [
                _printable(part) if isinstance(part, str) else part
                for part in item["loc"]
            ],
            "msg": _printable(item["msg"]),
        }
        for item in error.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def _register_error_handlers(app: FastAPI) -> None:
    def detail(status: int, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status)

    handlers = {
        JobNotFound: lambda _, e: detail(404, e),
        InvalidTransition: lambda _, e: detail(409, e),
        UpdateContention: lambda _, e: detail(409, e),
        VersionMismatch: lambda _, e: detail(412, e),
        IdempotencyKeyReused: lambda _, e: detail(422, e),
        DatabaseUnavailable: lambda _, e: JSONResponse(
            {"detail": "The database is unavailable; retry later"},
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        ),
        SchemaOutOfDate: lambda _, e: JSONResponse(
            {"detail": "The database schema is being upgraded; retry later"},
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        ),
    }
    for error_class, handler in handlers.items():
        app.add_exception_handler(error_class, handler)

    def unhandled(request: Request, error: Exception) -> JSONResponse:
        log_unhandled(request.scope, error)
        return JSONResponse({"detail": "Internal Server Error"}, status_code=500)

    app.add_exception_handler(Exception, unhandled)

    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        # FastAPI answers 400 when the body parser itself fails (nesting too
        # deep for the parser, bytes that are not UTF-8); that is malformed
        # JSON too, and malformed JSON is a 422 everywhere else.
        if error.status_code == 400 and error.__cause__ is not None:
            return JSONResponse(
                {
                    "detail": [
                        {
                            "type": "json_invalid",
                            "loc": ["body"],
                            "msg": "Malformed JSON body",
                        }
                    ]
                },
                status_code=422,
            )
        return await http_exception_handler(request, error)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


FINISHED_COUNTERS = {
    JobStatus.COMPLETED: "JobsCompleted",
    JobStatus.FAILED: "JobsFailed",
}


def _count_status_change(status: JobStatus) -> None:
    if status in FINISHED_COUNTERS:
        observability.count(FINISHED_COUNTERS[status])


class ObservedFastAPI(FastAPI):
    """FastAPI wrapped, outermost, in the request observer, so that even the
    500 answered by Starlette's error middleware is logged and counted."""

    def build_middleware_stack(self):
        return observability.RequestObserver(super().build_middleware_stack())


def create_app() -> FastAPI:
    """Build the app from the environment. Refuses to start on bad config;
    connects to nothing (engines, tables and keys are made on first use)."""
    app = ObservedFastAPI(
        title="Extraction Job API",
        version="1.0.0",
        description=(
            "The system of record for document-extraction jobs: "
            "pending → processing → completed | failed."
        ),
    )
    app.state.authenticator = authenticator_from_env()
    app.state.service = JobService(
        ExtractionJobRepository(database_url_from_env()),
        on_status_change=_count_status_change,
    )
    app.add_middleware(BodySizeLimit)
    _register_error_handlers(app)
    app.include_router(router)
    app.add_api_route(
        "/health",
        health,
        methods=["GET"],
        response_model=Health,
        tags=["health"],
        responses={
            503: {"model": Health, "description": "The database is unavailable"}
        },
    )
    return app


app = create_app()
