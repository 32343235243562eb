"""HTTP routes, and the one place where domain errors become status codes."""

import asyncio
import contextvars
import functools
import importlib.util
import json
import re
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
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.openapi.models import Schema as OpenAPISchema
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import AfterValidator
from pydantic.json_schema import GenerateJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException

import observability
from auth import (
    READ_SCOPE,
    WRITE_SCOPE,
    Principal,
    RequireScope,
    authenticator_for,
)
from database import DatabaseUnavailable, SchemaOutOfDate
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
    ValidationErrorBody,
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
)
from settings import ConfigError, exit_on_config_error, load_settings

MAX_BODY_BYTES = 1024 * 1024
MAX_OFFSET = 2**63 - 1  # the largest OFFSET both databases accept
RETRY_AFTER_SECONDS = "5"


def _header(description: str) -> dict:
    return {"description": description, "schema": {"type": "string"}}


RETRY_AFTER = {"Retry-After": _header("Seconds to wait before retrying.")}
WWW_AUTHENTICATE = {
    "WWW-Authenticate": _header(
        'The RFC 6750 challenge, e.g. Bearer realm="extraction-jobs", '
        'error="invalid_token".'
    )
}
ETAG = {"ETag": _header('The job\'s version in quotes, e.g. "3"; send it as If-Match.')}


# The error bodies are documented by reference, their schemas added to the
# document when it is first generated (`_openapi_overrides`): declared as
# response models, FastAPI would build a validator for each of the ~30 uses
# at import, for a document that is built later, if ever (a cold start cost).
ERROR_MODELS = (ErrorBody, ValidationErrorBody)


def _ref(code: int) -> dict:
    model = ValidationErrorBody if code == 422 else ErrorBody
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(*codes: int) -> dict[int | str, dict]:
    """The error answers of a route, as the API really sends them."""
    descriptions = {
        401: "Missing or invalid bearer token",
        403: "The token lacks the needed permission",
        404: "No job with this id",
        409: "The status move is not allowed from the job's current status, "
        "or the worker does not hold the job's lease",
        412: "If-Match does not match the job's current version (ETag)",
        413: "Request body larger than 1 MiB",
        415: "The body is not sent as Content-Type: application/json",
        422: "Invalid request: one entry per problem, the input not echoed",
        503: "Database or token signing keys unavailable; see Retry-After",
    }
    headers = {401: WWW_AUTHENTICATE, 403: WWW_AUTHENTICATE, 503: RETRY_AFTER}
    return {
        code: {
            "description": descriptions[code],
            **({"headers": headers[code]} if code in headers else {}),
            "content": {"application/json": {"schema": _ref(code)}},
        }
        for code in codes
    }


async def require_json(request: Request) -> None:
    """415 unless the body is declared JSON; FastAPI would otherwise treat it
    as text and answer a puzzling "Input should be a valid dictionary".
    Async: it only reads a header, so it costs no hop to the threadpool."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    got = f"got {content_type!r}" if content_type else "no Content-Type was sent"
    raise HTTPException(
        status_code=415,
        detail=f"The request body must be JSON, sent with "
        f"'Content-Type: application/json' ({got}).",
    )


JSON_BODY = [Depends(require_json)]


# The threads the job routes' blocking service calls run in: as many as
# Starlette's threadpool allows (40), through asyncio's executor, which hands
# a call over in about half the time of anyio's `run_in_threadpool`.
_THREADS = ThreadPoolExecutor(max_workers=40, thread_name_prefix="service")


def in_thread(function, /, *args, **kwargs):
    """`function(*args, **kwargs)` in a worker thread, with the caller's
    context variables (as `run_in_threadpool` does); await the result."""
    call = functools.partial(function, *args, **kwargs)
    context = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(_THREADS, context.run, call)


def get_service(request: Request) -> JobService:
    return request.app.state.service


# The job routes are async and run the (blocking) service call in the
# threadpool themselves: one hop per request, where a sync route takes a
# second one for FastAPI's response validation. They take the service from
# the Request (`get_service`) rather than from a dependency: FastAPI's work
# per dependency is a measurable part of a request.
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

router = APIRouter(prefix="/extraction-jobs", tags=["extraction jobs"])
COMMON_ERRORS = (401, 403, 503)


def _etag(response: Response, job: Job) -> Job:
    response.headers["ETag"] = f'"{job.version}"'
    return job


# RFC 9110 section 13.1.1: If-Match = "*" / #entity-tag, where
#   entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE
#   etagc      = "!" / %x23-7E / obs-text (%x80-FF)
# Header values arrive as bytes decoded as Latin-1, so a UTF-8 character
# such as "²" is two obs-text characters: well-formed, and never one of ours.
# etagc is written as its complement (not CTLs, SP, DQUOTE or DEL): the same
# set, but `[!\x23-\x7e\x80-\U0010ffff]` takes ~4 ms to compile at import.
_ENTITY_TAG = re.compile(r'(W/)?"([^\x00-\x20"\x7f]*)"')
_LIST_GAP = re.compile(r"[ \t,]*")  # OWS and empty list elements
_AFTER_TAG = re.compile(r"[ \t]*(?:,|\Z)")
# Our tags are the version in ASCII decimal, no leading zero; 19 digits
# bound the number (and int() never sees a Unicode digit or 5,000 digits).
_OUR_OPAQUE_TAG = re.compile(r"[1-9][0-9]{0,18}")
# The largest version a BIGINT holds: a larger tag is never ours (and the
# database driver could not even bind it: SQLite raised OverflowError, a 500).
_MAX_VERSION = 2**63 - 1
IF_MATCH_EXAMPLE = '"3"'


def _invalid_if_match(reason: str) -> RequestValidationError:
    return RequestValidationError(
        [
            {
                "type": "if_match_invalid",
                "loc": ("header", "If-Match"),
                "msg": (
                    f"{reason}: send * or the job's ETag in double quotes, "
                    f"e.g. If-Match: {IF_MATCH_EXAMPLE} (several tags "
                    'separated by commas: "2", "3")'
                ),
            }
        ]
    )


def _parse_if_match(values: list[str]) -> frozenset[int] | None:
    """The versions the If-Match field lines accept; None means any (absent or `*`).

    Raises RequestValidationError (422) when the field is not `*` or a list of
    entity tags. A well-formed tag that is not one of ours matches nothing, so
    it ends in 412; so do weak tags (If-Match compares strongly). Several field
    lines are one comma-separated list (RFC 9110 section 5.3).
    """
    if not values:
        return None
    text = ", ".join(values)
    if text.strip(" \t") == "*":
        return None
    versions: set[int] = set()
    tags = 0
    position = _LIST_GAP.match(text).end()
    while position < len(text):
        tag = _ENTITY_TAG.match(text, position)
        after = tag and _AFTER_TAG.match(text, tag.end())
        if not after:
            raise _invalid_if_match(
                "If-Match must be * or a list of quoted entity tags"
            )
        tags += 1
        weak, opaque = tag.groups()
        if (
            not weak
            and _OUR_OPAQUE_TAG.fullmatch(opaque)
            and int(opaque) <= _MAX_VERSION
        ):
            versions.add(int(opaque))
        position = _LIST_GAP.match(text, after.end()).end()
    if not tags:
        raise _invalid_if_match("If-Match is empty")
    return frozenset(versions)


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
                "Location": _header("/extraction-jobs/{id} of the job."),
                **ETAG,
                "Idempotent-Replayed": _header(
                    "`true` when this answers a repeated Idempotency-Key."
                ),
            },
        },
        **_errors(413, 415, 422, *COMMON_ERRORS),
    },
)
async def create_job(
    data: JobCreate,
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
        get_service(http_request).create,
        data,
        created_by=principal.sub,
        idempotency_key=idempotency_key,
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
    dependencies=JSON_BODY,
    responses=_errors(413, 415, 422, *COMMON_ERRORS),
)
async def claim_jobs(
    request: ClaimRequest, http_request: Request, principal: Writer
) -> list[Job]:
    outcome = await in_thread(
        get_service(http_request).claim, request, actor=principal.sub
    )
    observability.touched(*(job.id for job in outcome.jobs))
    observability.count("JobsClaimed", len(outcome.jobs))
    # The sweep at the start of every claim: counted like the scheduled one's.
    observability.count("LeasesExpired", outcome.leases_expired)
    return outcome.jobs


@router.get(
    "/stats",
    response_model=JobStats,
    summary="Counts per status, oldest pending age, expired leases",
    responses=_errors(*COMMON_ERRORS),
)
async def job_stats(request: Request, _: Reader) -> JobStats:
    return await in_thread(get_service(request).stats)


@router.get(
    "",
    response_model=list[Job],
    summary="List jobs in creation order",
    responses=_errors(422, *COMMON_ERRORS),
)
async def list_jobs(
    request: Request,
    response: Response,
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
    page = await in_thread(
        get_service(request).list_jobs,
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
    responses={200: {"headers": ETAG}, **_errors(404, *COMMON_ERRORS)},
)
async def get_job(job_id: str, request: Request, response: Response, _: Reader) -> Job:
    job = await in_thread(get_service(request).get, job_id)
    return _etag(response, job)


@router.post(
    "/{job_id}/heartbeat",
    response_model=Job,
    summary="Extend the lease of a job this worker holds",
    dependencies=JSON_BODY,
    responses=_errors(404, 409, 413, 415, 422, *COMMON_ERRORS),
)
async def heartbeat(
    job_id: str,
    data: HeartbeatRequest,
    request: Request,
    response: Response,
    principal: Writer,
) -> Job:
    job = await in_thread(
        get_service(request).heartbeat, job_id, data, actor=principal.sub
    )
    return _etag(response, job)


@router.get(
    "/{job_id}/events",
    response_model=list[JobEvent],
    summary="The job's history, oldest first",
    responses=_errors(404, *COMMON_ERRORS),
)
async def job_events(job_id: str, request: Request, _: Reader) -> list[JobEvent]:
    return await in_thread(get_service(request).events, job_id)


@router.patch(
    "/{job_id}",
    response_model=Job,
    summary="Change a job's status",
    dependencies=JSON_BODY,
    responses={
        200: {"headers": ETAG},
        **_errors(404, 409, 412, 413, 415, 422, *COMMON_ERRORS),
    },
)
async def update_job(
    job_id: str,
    data: JobUpdate,
    request: Request,
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
    versions = _parse_if_match(request.headers.getlist("If-Match"))
    job = await in_thread(
        get_service(request).update,
        job_id,
        data,
        if_match=versions,
        actor=principal.sub,
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
        "leases_released": outcome.released,
        "jobs_deleted": outcome.deleted,
    }
    observability.logger.info("sweep", extra=counts)
    observability.count("LeasesExpired", outcome.failed + outcome.released)
    stats = service.stats()
    oldest_age = round(stats.oldest_pending_age_seconds or 0.0, 3)
    observability.publish_job_gauges(
        observability.JobGauges(
            stats.counts.pending, stats.counts.processing, oldest_age
        )
    )
    return counts


def health(
    request: Request,
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


# Swagger UI and ReDoc come from the fastapi-offline package, served by the
# app itself, so /docs works without reaching a CDN. A package built without
# them (scripts/build_lambda.py leaves them out when they cost too much)
# falls back to the CDN FastAPI uses by default.
DOCS_ASSETS_URL = "/docs-assets"
CDN_ASSETS = {
    "swagger-ui-bundle.js": "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js",
    "swagger-ui.css": "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css",
    "redoc.standalone.js": "https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js",
    "favicon.png": "https://fastapi.tiangolo.com/img/favicon.png",
}


def docs_assets_dir() -> Path | None:
    """The packaged Swagger UI / ReDoc files, or None when they are not installed.

    Located without importing the package (nothing to pay at cold start).
    """
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / name).is_file() for name in CDN_ASSETS) else None


def _install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI with Authorize), /redoc, and their assets."""
    assets = docs_assets_dir()
    if assets is not None:
        from fastapi.staticfiles import StaticFiles

        app.mount(DOCS_ASSETS_URL, StaticFiles(directory=assets), name="docs-assets")

    def asset(request: Request, name: str) -> str:
        if assets is None:
            return CDN_ASSETS[name]
        return f"{request.scope.get('root_path', '')}{DOCS_ASSETS_URL}/{name}"

    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=asset(request, "swagger-ui-bundle.js"),
            swagger_css_url=asset(request, "swagger-ui.css"),
            swagger_favicon_url=asset(request, "favicon.png"),
        )

    def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=asset(request, "redoc.standalone.js"),
            redoc_favicon_url=asset(request, "favicon.png"),
            with_google_fonts=False,
        )

    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    for path, endpoint in (
        ("/docs", swagger_ui),
        ("/docs/oauth2-redirect", oauth2_redirect),
        ("/redoc", redoc),
    ):
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)


def _without_default_422(app: FastAPI) -> None:
    """Drop the 422 FastAPI documents for every route with parameters: where a
    422 can happen it is declared (ValidationErrorBody); elsewhere it cannot."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for item in schema["paths"].values():
                for operation in item.values():
                    default = operation["responses"].get("422", {})
                    if "HTTPValidationError" in json.dumps(default):
                        del operation["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(name, None)
            # As FastAPI generates a response model's schema (same generator).
            _, definitions = GenerateJsonSchema(
                ref_template="#/components/schemas/{model}"
            ).generate_definitions(
                [
                    (model, "serialization", model.__pydantic_core_schema__)
                    for model in ERROR_MODELS
                ]
            )
            for name, definition in definitions.items():
                # ...and orders its keys as FastAPI does, through its Schema model.
                schema["components"]["schemas"][name] = jsonable_encoder(
                    OpenAPISchema(**definition), by_alias=True, exclude_none=True
                )
            schema["components"]["schemas"] = dict(
                sorted(schema["components"]["schemas"].items())
            )
        return app.openapi_schema

    app.openapi = openapi


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
    )
    app.state.authenticator = authenticator_for(settings)
    app.state.service = JobService(
        ExtractionJobRepository(settings.resolved_database_url),
        cursor_secret=settings.cursor_secret,
        retention_days=settings.retention_days,
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
            **_errors(422),
            503: {
                "model": Health,
                "description": "The database is unavailable",
                "headers": RETRY_AFTER,
            },
        },
    )
    _install_docs(app)
    _without_default_422(app)
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
