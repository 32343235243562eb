"""HTTP routes, and the one place where domain errors become status codes."""

import json
import logging
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
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    HeartbeatRequest,
    Job,
    JobCreate,
    JobEvent,
    JobStats,
    JobStatus,
    JobUpdate,
    check_optional_text,
)
from repository import ExtractionJobRepository
from service import (
    IdempotencyKeyReused,
    InvalidPage,
    InvalidTransition,
    JobNotFound,
    JobService,
    NotLeaseHolder,
    UpdateContention,
    VersionMismatch,
    retention_days_from_env,
)

logger = logging.getLogger("extraction_jobs")

MAX_BODY_BYTES = 1024 * 1024
MAX_OFFSET = 2**63 - 1  # the largest OFFSET both databases accept
RETRY_AFTER_SECONDS = "5"


def _errors(*codes: int) -> dict[int | str, dict]:
    descriptions = {
        401: "Missing or invalid bearer token",
        403: "The token lacks the needed permission",
        404: "No job with this id",
        409: "The status move is not allowed from the job's current status, "
        "or the worker does not hold the job's lease",
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


async def _service(request: Request) -> JobService:
    # Async: a sync dependency costs every request a hop to the threadpool.
    return request.app.state.service


# The job routes are async and run the (blocking) service call in the
# threadpool themselves: one hop per request, where a sync route takes a
# second one for FastAPI's response validation.
Service = Annotated[JobService, Depends(_service)]
Reader = Annotated[Principal, Security(require_scope(READ_SCOPE), scopes=[READ_SCOPE])]
Writer = Annotated[
    Principal, Security(require_scope(WRITE_SCOPE), scopes=[WRITE_SCOPE])
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
async def create_job(
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
    job, replayed = await run_in_threadpool(
        service.create, data, created_by=principal.sub, idempotency_key=idempotency_key
    )
    response.headers["Location"] = f"/extraction-jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return _etag(response, job)


@router.post(
    "/claim",
    response_model=list[Job],
    summary="Claim the next pending jobs, most urgent first",
    responses=_errors(413, 422, *COMMON_ERRORS),
)
async def claim_jobs(
    request: ClaimRequest, service: Service, principal: Writer
) -> list[Job]:
    return await run_in_threadpool(service.claim, request, actor=principal.sub)


@router.get(
    "/stats",
    response_model=JobStats,
    summary="Counts per status, oldest pending age, expired leases",
    responses=_errors(*COMMON_ERRORS),
)
async def job_stats(service: Service, _: Reader) -> JobStats:
    return await run_in_threadpool(service.stats)


@router.get(
    "",
    response_model=list[Job],
    summary="List jobs in creation order",
    responses=_errors(422, *COMMON_ERRORS),
)
async def list_jobs(
    request: Request,
    response: Response,
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
    offset: Annotated[
        int, Query(ge=0, le=MAX_OFFSET, description="At most 10000; then use cursor.")
    ] = 0,
    cursor: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=512,
            description='Opaque: from the Link header (rel="next") of the previous page.',
        ),
    ] = None,
) -> list[Job]:
    page = await run_in_threadpool(
        service.list_jobs,
        document_id=document_id,
        status=status,
        limit=limit,
        offset=offset,
        cursor=cursor,
    )
    if page.next_cursor is not None:
        following = request.url.remove_query_params("offset").include_query_params(
            cursor=page.next_cursor
        )
        response.headers["Link"] = f'<{following}>; rel="next"'
    return page.jobs


@router.get(
    "/{job_id}",
    response_model=Job,
    summary="Get one job",
    responses=_errors(404, *COMMON_ERRORS),
)
async def get_job(job_id: str, response: Response, service: Service, _: Reader) -> Job:
    return _etag(response, await run_in_threadpool(service.get, job_id))


@router.post(
    "/{job_id}/heartbeat",
    response_model=Job,
    summary="Extend the lease of a job this worker holds",
    responses=_errors(404, 409, 413, 422, *COMMON_ERRORS),
)
async def heartbeat(
    job_id: str,
    data: HeartbeatRequest,
    response: Response,
    service: Service,
    principal: Writer,
) -> Job:
    job = await run_in_threadpool(service.heartbeat, job_id, data, actor=principal.sub)
    return _etag(response, job)


@router.get(
    "/{job_id}/events",
    response_model=list[JobEvent],
    summary="The job's history, oldest first",
    responses=_errors(404, *COMMON_ERRORS),
)
async def job_events(job_id: str, service: Service, _: Reader) -> list[JobEvent]:
    return await run_in_threadpool(service.events, job_id)


@router.patch(
    "/{job_id}",
    response_model=Job,
    summary="Change a job's status",
    responses=_errors(404, 409, 412, 413, 422, *COMMON_ERRORS),
)
async def update_job(
    job_id: str,
    data: JobUpdate,
    response: Response,
    service: Service,
    principal: Writer,
    if_match: Annotated[
        str | None,
        Header(
            alias="If-Match",
            description='Only change the job if its ETag is this, e.g. "3".',
        ),
    ] = None,
) -> Job:
    job = await run_in_threadpool(
        service.update,
        job_id,
        data,
        if_match=_parse_if_match(if_match),
        actor=principal.sub,
    )
    return _etag(response, job)


def run_sweep(app: FastAPI) -> dict[str, int]:
    """The sweep outside HTTP (the schedule, `make sweep`): one JSON log line
    with what it did, and the same counts returned."""
    outcome = app.state.service.sweep()
    counts = {
        "leases_failed": outcome.failed,
        "leases_released": outcome.released,
        "jobs_deleted": outcome.deleted,
    }
    logger.info(json.dumps({"message": "sweep", **counts}))
    return counts


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
    """One JSON log line per unhandled error, with the API Gateway request id."""
    request_context = (scope.get("aws.event") or {}).get("requestContext") or {}
    logger.error(
        json.dumps(
            {
                "message": "unhandled exception",
                "request_id": request_context.get("requestId"),
                "method": scope.get("method"),
                "path": scope.get("path"),
                "error": f"{type(error).__name__}: {error}",
            }
        )
    )


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
        NotLeaseHolder: lambda _, e: detail(409, e),
        InvalidPage: lambda _, e: detail(422, e),
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


def create_app() -> FastAPI:
    """Build the app from the environment. Refuses to start on bad config;
    connects to nothing (engines, tables and keys are made on first use)."""
    app = FastAPI(
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
        retention_days=retention_days_from_env(),
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
