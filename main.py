"""HTTP routes, and the one place where domain errors become status codes."""

import asyncio
import contextvars
import functools
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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
from starlette.exceptions import HTTPException as StarletteHTTPException

import observability
from auth import (
    ADMIN_SCOPE,
    READ_SCOPE,
    WRITE_SCOPE,
    Principal,
    RequireScope,
    authenticator_for,
)
from console import install_console
from database import DatabaseUnavailable, SchemaOutOfDate
from http_plumbing import (
    ETAG,
    JSON_BODY,
    RETRY_AFTER,
    BodySizeLimit,
    errors,
    header,
    install_docs,
    parse_if_match,
    validation_error,
    without_default_422,
)
from models import (
    MAX_DOCUMENT_ID_LENGTH,
    MAX_WORKER_ID_LENGTH,
    BulkOutcome,
    BulkRequest,
    CancelRequest,
    ClaimRequest,
    EventType,
    Health,
    HeartbeatRequest,
    Instant,
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
    check_optional_text,
)
from publisher import EventPublisher
from repository import ExtractionJobRepository
from service import (
    Conflict,
    IdempotencyKeyReused,
    InvalidPage,
    JobNotFound,
    JobService,
    VersionMismatch,
)
from settings import ConfigError, exit_on_config_error, load_settings

MAX_OFFSET = 2**63 - 1  # the largest OFFSET both databases accept
DEFAULT_EVENTS_PAGE, MAX_EVENTS_PAGE = 100, 1000
RETRY_AFTER_SECONDS = "5"


# The threads the job routes' blocking service calls run in: as many as
# Starlette's threadpool allows (40), through asyncio's executor, which hands
# a call over in about half the time of anyio's `run_in_threadpool` (claims
# over HTTP in `make bench`: 0.45x of their floor against 0.30-0.33x).
_THREADS = ThreadPoolExecutor(max_workers=40, thread_name_prefix="service")


def in_thread(function, /, *args, **kwargs):
    """`function(*args, **kwargs)` in a worker thread, with the caller's
    context variables (as `run_in_threadpool` does); await the result."""
    call = functools.partial(function, *args, **kwargs)
    context = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(_THREADS, context.run, call)


# Async, so that FastAPI calls it on the event loop rather than in a thread.
async def get_service(request: Request) -> JobService:
    return request.app.state.service


Service = Annotated[JobService, Depends(get_service)]

# The job routes are async and run the (blocking) service call in the
# threadpool themselves: one hop per request, where a sync route takes a
# second one for FastAPI's response validation (claims in `make bench`:
# 0.45x of their floor against 0.29-0.37x as sync routes).
#
# Reader and Writer: one dependency each, which also notes the caller for the request's log line.
Reader = Annotated[
    Principal,
    Security(
        RequireScope(READ_SCOPE, on_admit=observability.note_caller),
        scopes=[READ_SCOPE],
    ),
]
Writer = Annotated[
    Principal,
    Security(
        RequireScope(WRITE_SCOPE, on_admit=observability.note_caller),
        scopes=[WRITE_SCOPE],
    ),
]
Operator = Annotated[
    Principal,
    Security(
        RequireScope(ADMIN_SCOPE, on_admit=observability.note_caller),
        scopes=[ADMIN_SCOPE],
    ),
]

router = APIRouter(prefix="/extraction-jobs", tags=["extraction jobs"])
COMMON_ERRORS = (401, 403, 503)
# The answers of a request that changes one job.
CHANGED_JOB = {
    200: {"headers": ETAG},
    **errors(404, 409, 413, 415, 422, *COMMON_ERRORS),
}


def _etag(response: Response, job: Job) -> Job:
    response.headers["ETag"] = f'"{job.version}"'
    return job


@router.post(
    "",
    status_code=201,
    response_model=Job,
    summary="Create a job",
    dependencies=JSON_BODY,
    responses={
        201: {
            "description": "Created, or replayed for a repeated Idempotency-Key",
            "headers": {
                "Location": header("/extraction-jobs/{id} of the job."),
                **ETAG,
                "Idempotent-Replayed": header(
                    "`true` when this answers a repeated Idempotency-Key."
                ),
            },
        },
        **errors(413, 415, 422, *COMMON_ERRORS),
    },
)
async def create_job(
    data: JobCreate,
    service: Service,
    http_request: Request,
    response: Response,
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
    job, replayed = await in_thread(
        service.create,
        data,
        created_by=principal.sub,
        idempotency_key=idempotency_key,
    )
    root = http_request.scope.get("root_path", "")
    response.headers["Location"] = f"{root}/extraction-jobs/{job.id}"
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
    dependencies=JSON_BODY,
    responses=errors(413, 415, 422, *COMMON_ERRORS),
)
async def claim_jobs(
    request: ClaimRequest, service: Service, principal: Writer
) -> list[Job]:
    outcome = await in_thread(service.claim, request, actor=principal.sub)
    observability.touched(*(job.id for job in outcome.jobs))
    observability.count("JobsClaimed", len(outcome.jobs))
    # The sweep at the start of every claim: counted like the scheduled one's.
    observability.count("LeasesExpired", outcome.leases_expired)
    return outcome.jobs


@router.get(
    "/stats",
    response_model=JobStats,
    summary="Counts per status, oldest pending age, expired leases",
    responses=errors(*COMMON_ERRORS),
)
async def get_stats(service: Service, _: Reader) -> JobStats:
    return await in_thread(service.stats)


def job_filter(
    status: Annotated[
        list[JobStatus] | None,
        Query(description="Repeat for several: ?status=failed&status=cancelled."),
    ] = None,
    document_id: Annotated[
        str | None,
        Query(
            min_length=1, max_length=MAX_DOCUMENT_ID_LENGTH, description="Exact match."
        ),
        AfterValidator(check_optional_text),
    ] = None,
    created_after: Annotated[
        Instant | None,
        Query(description="Created at or after this instant (RFC 3339, with offset)."),
    ] = None,
    created_before: Annotated[
        Instant | None,
        Query(description="Created before this instant (RFC 3339, with offset)."),
    ] = None,
    worker_id: Annotated[
        str | None,
        Query(
            min_length=1, max_length=MAX_WORKER_ID_LENGTH, description="Exact match."
        ),
        AfterValidator(check_optional_text),
    ] = None,
) -> JobFilter:
    """The list's filters from its query, as bulk actions take them."""
    return JobFilter(
        status=tuple(dict.fromkeys(status)) if status else None,
        document_id=document_id,
        created_after=created_after,
        created_before=created_before,
        worker_id=worker_id,
    )


@router.get(
    "",
    response_model=list[Job],
    summary="List jobs in creation order, or newest first",
    responses=errors(422, *COMMON_ERRORS),
)
async def list_jobs(
    request: Request,
    service: Service,
    response: Response,
    _: Reader,
    selection: Annotated[JobFilter, Depends(job_filter)],
    order: Annotated[
        ListOrder, Query(description="asc: oldest first; desc: newest first.")
    ] = ListOrder.ASC,
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
    page = await in_thread(
        service.list_jobs,
        selection,
        order=order,
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


@router.post(
    "/bulk",
    response_model=BulkOutcome,
    summary="Cancel or retry every job a filter matches, 1000 a call",
    dependencies=JSON_BODY,
    responses=errors(413, 415, 422, *COMMON_ERRORS),
)
async def bulk_action(
    data: BulkRequest, service: Service, principal: Operator
) -> BulkOutcome:
    return await in_thread(service.bulk, data, actor=principal.sub)


@router.get(
    "/events",
    response_model=list[JobEvent],
    summary="Every job's events in commit order: a feed to follow",
    responses={
        200: {
            "headers": {
                "Link": header(
                    'The next page, rel="next", on every page (the last too): '
                    "store it and resume from it for newer events."
                )
            }
        },
        **errors(422, *COMMON_ERRORS),
    },
)
async def list_events(
    request: Request,
    service: Service,
    response: Response,
    _: Reader,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PAGE)] = DEFAULT_EVENTS_PAGE,
    type_: Annotated[
        list[EventType] | None,
        Query(alias="type", description="Only these types; repeat for several."),
    ] = None,
    cursor: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=512,
            description='Opaque: from the Link header (rel="next") of the previous page.',
        ),
    ] = None,
) -> list[JobEvent]:
    page = await in_thread(
        service.feed, cursor=cursor, types=set(type_ or ()), limit=limit
    )
    following = request.url.include_query_params(cursor=page.next_cursor)
    response.headers["Link"] = f'<{following}>; rel="next"'
    return page.events


@router.get(
    "/{job_id}",
    response_model=Job,
    summary="Get one job",
    responses={200: {"headers": ETAG}, **errors(404, *COMMON_ERRORS)},
)
async def get_job(job_id: str, service: Service, response: Response, _: Reader) -> Job:
    job = await in_thread(service.get, job_id)
    return _etag(response, job)


@router.post(
    "/{job_id}/heartbeat",
    response_model=Job,
    summary="Extend the lease of a job this worker holds",
    dependencies=JSON_BODY,
    responses=CHANGED_JOB,
)
async def heartbeat_job(
    job_id: str,
    data: HeartbeatRequest,
    service: Service,
    response: Response,
    principal: Writer,
) -> Job:
    job = await in_thread(service.heartbeat, job_id, data, actor=principal.sub)
    return _etag(response, job)


@router.get(
    "/{job_id}/events",
    response_model=list[JobEvent],
    summary="The job's history, oldest first, a page at a time",
    responses={
        200: {
            "headers": {"Link": header('The next page, rel="next", when more follow.')}
        },
        **errors(404, 422, *COMMON_ERRORS),
    },
)
async def list_job_events(
    job_id: str,
    request: Request,
    service: Service,
    response: Response,
    _: Reader,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PAGE)] = DEFAULT_EVENTS_PAGE,
    after: Annotated[
        int,
        Query(ge=0, le=MAX_OFFSET, description="Events after this event id."),
    ] = 0,
) -> list[JobEvent]:
    found = await in_thread(service.events, job_id, after=after, limit=limit)
    if found.next_after is not None:
        following = request.url.include_query_params(after=found.next_after)
        response.headers["Link"] = f'<{following}>; rel="next"'
    return found.page.events


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    summary="Cancel a job: pending at once, processing by asking its holder",
    dependencies=JSON_BODY,
    responses=CHANGED_JOB,
)
async def cancel_job(
    job_id: str,
    data: CancelRequest,
    service: Service,
    response: Response,
    principal: Operator,
) -> Job:
    job = await in_thread(service.cancel, job_id, data, actor=principal.sub)
    return _etag(response, job)


@router.post(
    "/{job_id}/retry",
    response_model=Job,
    summary="Run a failed or cancelled job again, with a fresh allowance of attempts",
    dependencies=JSON_BODY,
    responses=CHANGED_JOB,
)
async def retry_job(
    job_id: str,
    data: RetryRequest,
    service: Service,
    response: Response,
    principal: Operator,
) -> Job:
    job = await in_thread(service.retry, job_id, data, actor=principal.sub)
    return _etag(response, job)


@router.post(
    "/{job_id}/release",
    response_model=Job,
    summary="Give a held job back, and its attempt with it",
    dependencies=JSON_BODY,
    responses=CHANGED_JOB,
)
async def release_job(
    job_id: str,
    data: ReleaseRequest,
    service: Service,
    response: Response,
    principal: Writer,
) -> Job:
    job = await in_thread(service.release, job_id, data, actor=principal.sub)
    return _etag(response, job)


@router.patch(
    "/{job_id}",
    response_model=Job,
    summary="Change a job's status",
    description="A processing job changes only for its lease holder; a token with "
    f"`{ADMIN_SCOPE}` that names no `worker_id` may change a job another subject "
    "holds (the override, recorded as its actor).",
    dependencies=JSON_BODY,
    responses={
        200: {"headers": ETAG},
        **errors(404, 409, 412, 413, 415, 422, *COMMON_ERRORS),
    },
)
async def update_job(
    job_id: str,
    data: JobUpdate,
    request: Request,
    service: Service,
    response: Response,
    principal: Writer,
    if_match: Annotated[
        str | None,
        Header(
            alias="If-Match",
            description='Only change the job if its ETag is this, e.g. "3".',
        ),
    ] = None,
) -> Job:
    # `if_match` declares the header for the OpenAPI document; the parse reads
    # every If-Match field line, not only the first one that `if_match` holds.
    versions = parse_if_match(request.headers.getlist("If-Match"))
    job = await in_thread(
        service.update,
        job_id,
        data,
        if_match=versions,
        actor=principal.sub,
        admin=principal.admin,
    )
    return _etag(response, job)


def run_sweep(app: FastAPI) -> dict[str, int]:
    """The sweep outside HTTP (the schedule, `make sweep`): one JSON log line
    with what it did, and the same counts returned. Then the queue gauges
    (PendingJobs, ProcessingJobs, OldestPendingAgeSeconds) as they stand after
    it, from the one query of GET /extraction-jobs/stats."""
    service = app.state.service
    outcome = service.sweep()
    counts = {
        "leases_failed": outcome.failed,
        "leases_cancelled": outcome.cancelled,
        "leases_released": outcome.released,
        "jobs_deleted": outcome.deleted,
    }
    if app.state.publisher is not None:
        counts["events_published"] = app.state.publisher.publish_outstanding()
    observability.logger.info("sweep", extra=counts)
    observability.count(
        "LeasesExpired", outcome.failed + outcome.cancelled + outcome.released
    )
    stats = service.stats()
    oldest_age = stats.oldest_pending_age_seconds
    observability.publish_job_gauges(
        observability.JobGauges(
            stats.counts.pending,
            stats.counts.processing,
            None if oldest_age is None else round(oldest_age, 3),
        )
    )
    return counts


def get_health(
    service: Service,
    deep: bool = Query(
        False,
        description="`1`: also a round trip to the database, at the schema this "
        "code needs (503 when it fails). Without it the answer costs the database "
        "nothing, for load balancers and uptime probes.",
    ),
) -> JSONResponse:
    """Public: the app answers; with `deep=1`, the database too."""
    if not deep:
        return JSONResponse(Health(status="ok", database="not_checked").model_dump())
    try:
        service.database_ok()
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
            # The type and where it was raised, never the message: a
            # database error's message can carry the row it refused.
            "error": type(error).__name__,
            "at": _raised_at(error),
        },
    )


def _raised_at(error: Exception) -> str | None:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return None
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


def _register_error_handlers(app: FastAPI) -> None:
    def detail(status: int, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status)

    handlers = {
        JobNotFound: lambda _, e: detail(404, e),
        Conflict: lambda _, e: detail(409, e),
        InvalidPage: lambda _, e: detail(422, e),
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
    JobStatus.CANCELLED: "JobsCancelled",
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
    """Build the app from the environment. Refuses to start on bad config
    (settings.ConfigError); connects to nothing (engines, tables and keys are
    made on first use)."""
    settings = load_settings()
    app = ObservedFastAPI(
        title="Extraction Job API",
        version="1.0.0",
        description=(
            "The system of record for document-extraction jobs: "
            "pending → processing → completed | failed."
        ),
        docs_url=None,
        redoc_url=None,
        # Logs, metrics and traces are Powertools' and X-Ray's
        # (observability.py); FastAPI's OpenTelemetry hooks would otherwise
        # look up three global providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # operationId = the route function's name (create_job, claim_jobs,
        # ...), so generated clients read well.
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.authenticator = authenticator_for(settings)
    repository = ExtractionJobRepository(
        settings.resolved_database_url, outbox=settings.event_bus_name is not None
    )
    app.state.publisher = (
        EventPublisher(
            settings.event_bus_name,
            repository,
            endpoint_url=settings.aws_endpoint_url_events,
        )
        if settings.event_bus_name
        else None
    )
    app.state.service = JobService(
        repository,
        cursor_secret=settings.cursor_secret,
        retention_days=settings.retention_days,
        on_status_change=_count_status_change,
        on_outcome=app.state.publisher.publish_for if app.state.publisher else None,
    )
    app.add_middleware(BodySizeLimit)
    _register_error_handlers(app)
    app.include_router(router)
    app.add_api_route(
        "/health",
        get_health,
        methods=["GET"],
        response_model=Health,
        tags=["health"],
        responses={
            **errors(422),
            503: {
                "model": Health,
                "description": "The database is unavailable",
                "headers": RETRY_AFTER,
            },
        },
    )
    install_docs(app)
    install_console(app, settings)
    without_default_422(app)
    return app


def _app_or_exit() -> FastAPI:
    """The module's app; a configuration error stops the start (uvicorn, the
    Lambda import) with one line per problem and no traceback."""
    try:
        app = create_app()
        observability.adopt_uvicorn_logs()
        return app
    except ConfigError as error:
        exit_on_config_error(error)
        raise  # not reached: exit_on_config_error exits


app = _app_or_exit()
