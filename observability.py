"""Logs and metrics: one JSON log line per request, CloudWatch metrics as EMF.

Built on AWS Lambda Powertools (`Logger`, and the CloudWatch EMF provider
behind `Metrics`), in Lambda and under uvicorn alike:

- `RequestObserver` wraps the whole ASGI app (outside Starlette's error
  middleware, so it also sees the 500s) and, per request, logs one line
  (request ids, cold start, method, route template, status, latency, caller,
  job ids), answers with `X-Request-Id`, and emits `Requests`, `Errors5xx` and
  `Latency` by route. Bodies, metadata, results and tokens are never logged.
- `count()` emits a domain counter (JobsCreated, ..., LeasesExpired);
  `publish_job_gauges()` the queue gauges of each scheduled sweep.

Metrics are printed to stdout in Embedded Metric Format, which CloudWatch Logs
turns into metrics: no API call, no network. Logs go to stderr, so stdout
carries nothing but metrics.

Every other line is JSON too: importing this module gives the root logger the
service logger's formatter on stderr, so the module loggers (database, auth),
the libraries' and Python's warnings write the same JSON lines; uvicorn's own
loggers get the same (`adopt_uvicorn_logs`, `UVICORN_LOG_CONFIG`).
"""

import json
import logging
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.filters import SuppressFilter
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import (
    AmazonCloudWatchEMFProvider,
)

import settings as config

SERVICE = "extraction_jobs"
REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID_LENGTH = 128
UNMATCHED_ROUTE = "unmatched"

# --- Logger ------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _settings_at_import() -> config.Settings:
    """LOG_LEVEL, METRICS_ENABLED and METRICS_NAMESPACE (settings.py), read
    once at import: the logger needs its level. With any variable bad, the
    defaults do until main.create_app, which runs before anything is logged,
    stops the start with one line per problem."""
    try:
        return config.settings_from_env()
    except config.ConfigError:
        return config.Settings()


# The functions below look it up at call time (tests replace it).
settings = _settings_at_import()
logger = Logger(
    service=SERVICE,
    level=settings.log_level,
    logger_handler=_StderrHandler(),
    utc=True,
    use_rfc3339=True,
)
logger.remove_keys(["location", "sampling_rate"])


def _drop_color_message(record: logging.LogRecord) -> bool:
    record.__dict__.pop("color_message", None)  # uvicorn's ANSI-coloured copy
    return True


def json_handler() -> logging.Handler:
    """A stderr handler writing the service logger's JSON lines."""
    handler = _StderrHandler()
    handler.setFormatter(logger.registered_formatter)
    handler.addFilter(_drop_color_message)
    return handler


def _every_logger_in_json() -> None:
    """The module loggers (`logging.getLogger(__name__)` in database.py,
    auth.py) and the libraries' have no handler of their own: their records
    reach the root logger, where Python's last resort (or, in Lambda, the
    runtime's handler) would print them as plain text. The root logger gets
    the JSON handler instead, replacing those; its level stays as it was
    (WARNING unless set). The service logger's own records propagate to the
    root too, so the root's handler drops them: each is written once."""
    handler = json_handler()
    handler.addFilter(SuppressFilter(SERVICE))
    logging.root.handlers = [handler]
    logging.captureWarnings(True)  # warnings.warn() lines through the same


_every_logger_in_json()


def _write_request_line(fields: dict) -> None:
    """The per-request line, written straight to stderr in exactly the shape
    the logger's formatter gives (level, message, timestamp, service, the
    fields, then the X-Ray trace id in Lambda) and at the logger's level.

    Not through `logger.info`: the logging machinery (caller lookup, record,
    Powertools' key extraction) made up about 15 % of the CPU time of a GET by
    id, for a line whose shape never changes.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    line = {
        "level": "INFO",
        "message": "request",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "service": SERVICE,
        **fields,
    }
    # The formatter's own lookup (the runtime sets it per invocation), so the
    # trace id reads exactly as on the logger's other lines.
    trace_id = logger.registered_formatter._get_latest_trace_id()
    if trace_id:
        line["xray_trace_id"] = trace_id
    sys.stderr.write(_to_json(line) + "\n")


# The formatter's own serializer settings: compact, UTF-8 kept, str() for the rest.
_to_json = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, default=str
).encode


# --- Per request -------------------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    """What a request's log line says beyond the method, route and status."""

    request_id: str
    sub: str | None = None
    azp: str | None = None
    job_ids: list[str] = field(default_factory=list)


_current: ContextVar[RequestRecord | None] = ContextVar("request", default=None)
_cold_start = True


def _take_cold_start() -> bool:
    global _cold_start
    cold, _cold_start = _cold_start, False
    return cold


def note_caller(sub: str | None, azp: str | None) -> None:
    """Record who sent the current request (from the validated token)."""
    record = _current.get()
    if record is not None:
        record.sub, record.azp = sub, azp


def touched(*job_ids: str) -> None:
    """Record the ids of the jobs the current request created or claimed."""
    record = _current.get()
    if record is not None:
        record.job_ids.extend(job_ids)


def current_request_id() -> str | None:
    record = _current.get()
    return record.request_id if record is not None else None


def _sane_request_id(value: bytes | None) -> str | None:
    """The client's X-Request-Id when it is 1-128 printable ASCII characters."""
    if not value or len(value) > MAX_REQUEST_ID_LENGTH:
        return None
    if not all(0x20 <= byte <= 0x7E for byte in value):
        return None
    return value.decode("ascii")


def _job_id_in_path(scope: dict) -> str | None:
    value = (scope.get("path_params") or {}).get("job_id")
    if isinstance(value, str) and len(value) == 36:
        try:
            return str(uuid.UUID(value))
        except ValueError:
            return None
    return None


class RequestObserver:
    """Pure ASGI: one log line, an X-Request-Id header and metrics per request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        client_id = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                client_id = _sane_request_id(value)
                break
        event = scope.get("aws.event") or {}
        api_request_id = (event.get("requestContext") or {}).get("requestId")
        request_id = api_request_id or client_id or uuid.uuid4().hex
        record = RequestRecord(request_id)
        header = (REQUEST_ID_HEADER, request_id.encode("ascii", "replace"))
        status = 500

        async def send_with_request_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = _current.set(record)
        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            _current.reset(token)
            self._finish(scope, record, status, started, api_request_id, client_id)

    def _finish(self, scope, record, status, started, api_request_id, client_id):
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        route = scope.get("route")
        template = getattr(route, "path", None) or UNMATCHED_ROUTE
        job_ids = record.job_ids or (
            [job_id] if (job_id := _job_id_in_path(scope)) else []
        )
        context = scope.get("aws.context")
        fields = {
            "request_id": record.request_id,
            "api_gateway_request_id": api_request_id,
            "lambda_request_id": getattr(context, "aws_request_id", None),
            "client_request_id": client_id if client_id != record.request_id else None,
            "cold_start": _take_cold_start(),
            "method": scope.get("method"),
            "route": template,
            "status": status,
            "latency_ms": latency_ms,
            "sub": record.sub,
            "azp": record.azp,
            "job_ids": job_ids,
        }
        _write_request_line(
            {k: v for k, v in fields.items() if v is not None and v != []}
        )
        if settings.metrics_enabled:
            metrics = _emf()
            metrics.add_dimension("route", template)
            _add(metrics, "Requests", 1)
            _add(metrics, "Errors5xx", 1 if status >= 500 else 0)
            _add(metrics, "Latency", latency_ms)
            metrics.flush_metrics()


# --- Metrics: every name and unit, said once ----------------------------------
# terraform/monitoring.tf's dashboard and alarms name these (checked by
# tests/test_metric_names.py).

# Per request, by route (RequestObserver).
REQUEST_METRICS = {"Requests": "Count", "Errors5xx": "Count", "Latency": "Milliseconds"}
# Domain counters, without dimensions (count()).
DOMAIN_COUNTERS = dict.fromkeys(
    (
        "JobsCreated",
        "JobsClaimed",
        "JobsCompleted",
        "JobsFailed",
        "JobsCancelled",
        "LeasesExpired",
        "EventsPublished",
        "EventsPublishFailed",
    ),
    "Count",
)
# The queue gauges of each scheduled sweep (publish_job_gauges()).
JOB_GAUGES = {
    "PendingJobs": "Count",
    "ProcessingJobs": "Count",
    "OldestPendingAgeSeconds": "Seconds",
}
METRICS = REQUEST_METRICS | DOMAIN_COUNTERS | JOB_GAUGES


def _add(metrics: AmazonCloudWatchEMFProvider, name: str, value: float) -> None:
    metrics.add_metric(name, METRICS[name], value)


def _emf() -> AmazonCloudWatchEMFProvider:
    """A fresh metric set each time: nothing shared between concurrent requests."""
    return AmazonCloudWatchEMFProvider(namespace=settings.metrics_namespace)


def count(name: str, value: int = 1) -> None:
    """Emit a domain counter now, without dimensions (e.g. JobsCompleted)."""
    if name not in DOMAIN_COUNTERS:
        raise ValueError(f"unknown domain counter {name!r}")
    if value <= 0 or not settings.metrics_enabled:
        return
    metrics = _emf()
    _add(metrics, name, value)
    metrics.flush_metrics()


@dataclass(frozen=True)
class JobGauges:
    pending: int
    processing: int
    oldest_pending_age_seconds: float | None  # None: no job waits (as in /stats)


def publish_job_gauges(gauges: JobGauges) -> None:
    """One log line and one EMF record with the three queue gauges."""
    logger.info(
        "job gauges",
        extra={
            "cold_start": _take_cold_start(),
            "pending_jobs": gauges.pending,
            "processing_jobs": gauges.processing,
            "oldest_pending_age_seconds": gauges.oldest_pending_age_seconds,
        },
    )
    if settings.metrics_enabled:
        metrics = _emf()
        _add(metrics, "PendingJobs", gauges.pending)
        _add(metrics, "ProcessingJobs", gauges.processing)
        # No job waiting is no age at all: the gauge reads 0, its floor.
        _add(metrics, "OldestPendingAgeSeconds", gauges.oldest_pending_age_seconds or 0)
        metrics.flush_metrics()


# --- uvicorn's own lines -------------------------------------------------------


# uvicorn's loggers: its own lines (started, reloading, shutting down, its
# errors) in the service's JSON on stderr, and no plain-text access line: the
# request line above says all it does, so stderr is one JSON line per request.
# A launcher hands it to uvicorn (`uvicorn.run(..., log_config=...)`,
# scripts/serve.py), so the reloader process's lines are JSON from the first.
UVICORN_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {
        "json": {"()": json_handler},
        "drop": {"class": "logging.NullHandler"},
    },
    "loggers": {
        "uvicorn": {"handlers": ["json"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": ["drop"], "propagate": False},
    },
}


def adopt_uvicorn_logs() -> None:
    """Under `uvicorn main:app`, uvicorn has set up its default text logging
    before it imports the app, and writes its first line after: the config
    above replaces it then. (With `--reload` or `--workers`, the supervising
    process never imports the app: scripts/serve.py, behind `make run`,
    hands it the config instead.)"""
    if "uvicorn" in sys.modules:
        import logging.config  # not at import: never needed in Lambda

        logging.config.dictConfig(UVICORN_LOG_CONFIG)
