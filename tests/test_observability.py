"""Request logs, X-Request-Id, EMF metrics and the scheduled queue gauges.

Log lines are read from stderr and metrics from stdout, exactly as CloudWatch
Logs receives them; requests go through the real app on both databases, and
tokens through a real JWKS server on loopback.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import SWEPT_NOTHING
from fastapi.testclient import TestClient
from jose import jwk, jwt
from jwks_server import JwksServer, RsaTestKey, use_jwks
from lambda_events import LambdaContext, http_api_event, response_json
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

import database
import lambda_handler
import observability
import settings
from db_models import JOBS
from main import create_app

ROOT = Path(__file__).resolve().parent.parent
JOB_ROUTE = "/extraction-jobs/{job_id}"


def log_lines(captured: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in captured.splitlines() if line]


def request_lines(captured: str) -> list[dict[str, Any]]:
    return [line for line in log_lines(captured) if line["message"] == "request"]


def emf_records(captured: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in captured.splitlines() if '"_aws"' in line]


def metric_values(records: list[dict[str, Any]], name: str) -> list[float]:
    """Every value of `name` (EMF allows one number or a list per record)."""
    values: list[float] = []
    for record in records:
        value = record.get(name, [])
        values.extend(value if isinstance(value, list) else [value])
    return values


@pytest.fixture
def metrics_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        observability,
        "settings",
        settings.settings_from_env(
            {"METRICS_ENABLED": "1", "METRICS_NAMESPACE": "TestJobs"}
        ),
    )


# --- the request line ---------------------------------------------------------


def test_one_json_line_per_request_with_route_template_status_and_latency(
    client: TestClient, capsys: pytest.CaptureFixture
) -> None:
    created = client.post("/extraction-jobs", json={"document_id": "a.pdf"})
    job_id = created.json()["id"]
    fetched = client.get(f"/extraction-jobs/{job_id}")
    missing = client.get("/no/such/route")

    lines = request_lines(capsys.readouterr().err)
    assert len(lines) == 3
    post, get, unmatched = lines
    assert (post["method"], post["route"], post["status"]) == (
        "POST",
        "/extraction-jobs",
        201,
    )
    assert (get["method"], get["route"], get["status"]) == ("GET", JOB_ROUTE, 200)
    assert (unmatched["route"], unmatched["status"]) == ("unmatched", 404)
    assert post["job_ids"] == [job_id] and get["job_ids"] == [job_id]
    for line, response in zip(lines, (created, fetched, missing), strict=True):
        assert line["level"] == "INFO"
        assert line["timestamp"].endswith("+00:00")
        assert isinstance(line["cold_start"], bool)
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
        assert line["request_id"] == response.headers["x-request-id"]
        assert "lambda_request_id" not in line  # not in Lambda


def test_claim_logs_every_claimed_job_id(
    client: TestClient, capsys: pytest.CaptureFixture
) -> None:
    ids = {
        client.post("/extraction-jobs", json={"document_id": f"{n}.pdf"}).json()["id"]
        for n in range(3)
    }
    claimed = client.post("/extraction-jobs/claim", json={"worker_id": "w", "limit": 5})
    line = request_lines(capsys.readouterr().err)[-1]
    assert line["route"] == "/extraction-jobs/claim"
    assert set(line["job_ids"]) == ids == {job["id"] for job in claimed.json()}


def test_the_request_line_is_the_line_the_powertools_formatter_writes(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request line skips the logging machinery for speed; it must still
    be, key for key and in order, what `logger.info` would have written."""
    monkeypatch.setenv(
        "_X_AMZN_TRACE_ID", "Root=1-6747a1b2-abc;Parent=53995c3f;Sampled=1"
    )
    fields = {
        "request_id": "r-1",
        "cold_start": False,
        "method": "GET",
        "route": JOB_ROUTE,
        "status": 200,
        "latency_ms": 1.25,
        "sub": "auth0|caf\u00e9",
        "job_ids": [str(uuid.uuid4())],
    }
    observability.logger.info("request", extra=fields)
    observability._write_request_line(fields)
    via_logger, direct = capsys.readouterr().err.splitlines()
    expected, got = json.loads(via_logger), json.loads(direct)
    assert list(got) == list(expected)
    assert got["xray_trace_id"] == "1-6747a1b2-abc"
    for line in (expected, got):
        del line["timestamp"]
    assert got == expected
    assert len(direct) == len(via_logger)  # same separators, UTF-8 kept

    observability.logger.setLevel("WARNING")
    try:
        observability._write_request_line(fields)
        assert capsys.readouterr().err == ""
    finally:
        observability.logger.setLevel(observability.settings.log_level)


def test_x_request_id_is_the_clients_when_sane_else_generated(
    client: TestClient,
) -> None:
    longest = "r" * 128
    for sane in ("abc-123", longest, "with spaces and ~!@#$%^&*()"):
        response = client.get("/health", headers={"X-Request-Id": sane})
        assert response.headers["x-request-id"] == sane
    generated = set()
    for insane in ("r" * 129, "tab\there", "caf\u00e9".encode(), ""):
        response = client.get("/health", headers={"X-Request-Id": insane})
        assert response.headers["x-request-id"] != insane
        generated.add(response.headers["x-request-id"])
    generated.add(client.get("/health").headers["x-request-id"])
    assert len(generated) == 5
    assert all(len(value) == 32 and value.isalnum() for value in generated)


def test_a_500_is_logged_counted_and_carries_the_request_id(
    client: TestClient, capsys: pytest.CaptureFixture, metrics_on: None
) -> None:
    def explode() -> None:
        raise RuntimeError("boom")

    client.app.add_api_route("/explode", explode)
    quiet = TestClient(client.app, raise_server_exceptions=False)
    response = quiet.get("/explode", headers={"X-Request-Id": "trace-me"})

    assert response.status_code == 500
    assert response.headers["x-request-id"] == "trace-me"
    captured = capsys.readouterr()
    error, request = log_lines(captured.err)
    assert (error["level"], error["message"]) == ("ERROR", "unhandled exception")
    assert error["request_id"] == request["request_id"] == "trace-me"
    assert (request["status"], request["route"]) == (500, "/explode")
    records = emf_records(captured.out)
    assert metric_values(records, "Requests") == metric_values(records, "Errors5xx")
    assert metric_values(records, "Requests") == [1.0]


def test_a_failed_statement_is_logged_without_its_parameters(
    client: TestClient, capsys: pytest.CaptureFixture
) -> None:
    def fail(*_args, **_kwargs):
        raise IntegrityError(
            "INSERT INTO extraction_job (metadata) VALUES (%(metadata)s)",
            {"metadata": '{"password": "SECRET-IN-PARAMETERS"}'},
            ValueError("constraint failed"),
        )

    client.app.state.service.repository.add = fail
    quiet = TestClient(client.app, raise_server_exceptions=False)
    response = quiet.post("/extraction-jobs", json={"document_id": "x.pdf"})

    assert response.status_code == 500
    err = capsys.readouterr().err
    assert "SECRET-IN-PARAMETERS" not in err and "INSERT" not in err
    (error,) = [line for line in log_lines(err) if line["level"] == "ERROR"]
    assert error["error"] == "IntegrityError"  # the type, never the message
    assert error["at"].startswith("test_observability.py:")


def test_in_lambda_the_api_gateway_request_id_wins_and_both_ids_are_logged(
    client: TestClient, capsys: pytest.CaptureFixture
) -> None:
    handler = lambda_handler.build_handler(client.app)
    context = LambdaContext()
    event = http_api_event(
        "GET",
        "/health",
        request_id="HVZ3oh1CIAMEVxA=",
        headers={"X-Request-Id": "client-chosen"},
    )
    response = handler(event, context)

    assert response["headers"]["x-request-id"] == "HVZ3oh1CIAMEVxA="
    (line,) = request_lines(capsys.readouterr().err)
    assert line["request_id"] == line["api_gateway_request_id"] == "HVZ3oh1CIAMEVxA="
    assert line["lambda_request_id"] == context.aws_request_id
    assert line["client_request_id"] == "client-chosen"
    assert line["route"] == "/health"


def test_cold_start_is_true_for_the_first_request_of_a_process(
    tmp_path: Path,
) -> None:
    script = (
        "import json, sys\n"
        "from fastapi.testclient import TestClient\n"
        "import main\n"
        "client = TestClient(main.app)\n"
        "client.get('/nowhere'); client.get('/nowhere')\n"
    )
    env = {
        "PATH": os.environ["PATH"],
        "AUTH_DISABLED": "1",
        "DB_PATH": str(tmp_path / "jobs.db"),
    }
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = request_lines(result.stderr)
    assert [line["cold_start"] for line in lines] == [True, False]
    assert result.stdout == ""  # metrics are off outside Lambda by default


# --- secrets stay out of logs and metrics --------------------------------------

AUDIENCE = "https://observability.example.invalid"
ISSUER = "https://tenant.example.invalid/"


@pytest.fixture(scope="module")
def key() -> RsaTestKey:
    return RsaTestKey("obs-key")


@pytest.fixture
def authed_client(
    key: RsaTestKey, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> TestClient:
    server = JwksServer().start()
    server.keys = [key.public_jwk()]
    use_jwks(monkeypatch, server, issuer=ISSUER, audience=AUDIENCE)
    monkeypatch.setenv("DB_PATH", str(tmp_path / "jobs.db"))
    yield TestClient(create_app())
    server.stop()


def token(key: RsaTestKey, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "auth0|observed-user",
        "azp": "worker-client-id",
        "iat": now,
        "exp": now + 300,
        "scope": "read:extraction-jobs write:extraction-jobs",
        **claims,
    }
    signing = jwk.construct(key.private_pem, algorithm="RS256")
    return jwt.encode(payload, signing, algorithm="RS256", headers={"kid": key.kid})


def test_bodies_metadata_results_and_tokens_are_never_logged(
    authed_client: TestClient,
    key: RsaTestKey,
    capsys: pytest.CaptureFixture,
    metrics_on: None,
) -> None:
    bearer = token(key)
    headers = {"Authorization": f"Bearer {bearer}"}
    created = authed_client.post(
        "/extraction-jobs",
        json={
            "document_id": "doc-SECRET-DOCUMENT-7f3a.pdf",
            "metadata": {"password": "SECRET-METADATA-9c1e"},
        },
        headers=headers,
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    authed_client.post(
        "/extraction-jobs/claim", json={"worker_id": "w-1", "limit": 1}, headers=headers
    )
    authed_client.patch(
        f"/extraction-jobs/{job_id}",
        json={"status": "failed", "error_message": "SECRET-RESULT-4b2d"},
        headers=headers,
    )
    authed_client.get(
        "/extraction-jobs", headers={"Authorization": "Bearer SECRET-BAD-TOKEN-1"}
    )
    authed_client.post(
        "/extraction-jobs",
        json={"document_id": 1, "metadata": "SECRET-INVALID-BODY-5e"},
        headers=headers,
    )

    captured = capsys.readouterr()
    everything = captured.out + captured.err
    for secret in (
        bearer,
        bearer.split(".")[2],
        "SECRET-DOCUMENT",
        "SECRET-METADATA",
        "SECRET-RESULT",
        "SECRET-BAD-TOKEN",
        "SECRET-INVALID-BODY",
    ):
        assert secret not in everything, secret
    lines = request_lines(captured.err)
    assert [line["status"] for line in lines] == [201, 200, 200, 401, 422]
    assert lines[0]["sub"] == "auth0|observed-user"
    assert lines[0]["azp"] == "worker-client-id"
    assert "sub" not in lines[3]  # refused: no caller is named


# --- metrics -------------------------------------------------------------------


def test_request_metrics_by_route_and_domain_counters_in_emf(
    client: TestClient, capsys: pytest.CaptureFixture, metrics_on: None
) -> None:
    ids = [
        client.post("/extraction-jobs", json={"document_id": f"{n}.pdf"}).json()["id"]
        for n in range(3)
    ]
    client.post(
        "/extraction-jobs",
        json={"document_id": "0.pdf"},
        headers={"Idempotency-Key": "k"},
    )
    client.post(
        "/extraction-jobs",
        json={"document_id": "0.pdf"},
        headers={"Idempotency-Key": "k"},
    )  # a replay creates nothing
    client.post("/extraction-jobs/claim", json={"worker_id": "w", "limit": 2})
    for job_id, status in zip(ids, ("completed", "completed", "failed"), strict=True):
        client.patch(f"/extraction-jobs/{job_id}", json={"status": status})
    client.patch(f"/extraction-jobs/{ids[0]}", json={"status": "completed"})  # no-op

    records = emf_records(capsys.readouterr().out)
    for record in records:
        (directive,) = record["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "TestJobs"
    by_route = [r for r in records if "Requests" in r]
    assert len(by_route) == 10
    assert all(
        r["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["route"]] for r in by_route
    )
    assert {r["route"] for r in by_route} == {
        "/extraction-jobs",
        "/extraction-jobs/claim",
        JOB_ROUTE,
    }
    assert sum(metric_values(by_route, "Errors5xx")) == 0
    latency_units = {
        m["Unit"]
        for r in by_route
        for m in r["_aws"]["CloudWatchMetrics"][0]["Metrics"]
        if m["Name"] == "Latency"
    }
    assert latency_units == {"Milliseconds"}
    counters = [r for r in records if "Requests" not in r]
    assert all(
        r["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [[]] for r in counters
    )
    assert sum(metric_values(counters, "JobsCreated")) == 4
    assert sum(metric_values(counters, "JobsClaimed")) == 2
    assert sum(metric_values(counters, "JobsCompleted")) == 2
    assert sum(metric_values(counters, "JobsFailed")) == 1


def test_metrics_are_off_by_default_outside_lambda(
    client: TestClient, capsys: pytest.CaptureFixture
) -> None:
    client.post("/extraction-jobs", json={"document_id": "quiet.pdf"})
    assert capsys.readouterr().out == ""


def test_leases_expired_counter_hook_and_unknown_counters(
    capsys: pytest.CaptureFixture, metrics_on: None
) -> None:
    observability.count("LeasesExpired", 3)
    observability.count("LeasesExpired", 0)  # nothing to say
    records = emf_records(capsys.readouterr().out)
    assert metric_values(records, "LeasesExpired") == [3.0]
    with pytest.raises(ValueError, match="JobsLost"):
        observability.count("JobsLost")


# --- the scheduled sweep event publishes the queue gauges --------------------------


def test_sweep_event_publishes_the_queue_gauges_after_sweeping(
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    metrics_on: None,
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    app = create_app()
    monkeypatch.setattr(lambda_handler, "app", app)
    client = TestClient(app)
    ids = [
        client.post("/extraction-jobs", json={"document_id": f"{n}.pdf"}).json()["id"]
        for n in range(4)
    ]
    client.patch(f"/extraction-jobs/{ids[3]}", json={"status": "completed"})
    client.patch(f"/extraction-jobs/{ids[2]}", json={"status": "processing"})
    lapsed = client.post(
        "/extraction-jobs", json={"document_id": "lapsed.pdf", "priority": 10}
    ).json()["id"]
    claimed = client.post("/extraction-jobs/claim", json={"worker_id": "dies"})
    assert [job["id"] for job in claimed.json()] == [lapsed]
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with database.get_engine(database.normalize_url(database_url)).begin() as conn:
        # Created two hours ago, due for one: the age counts from run_at.
        conn.execute(
            update(JOBS)
            .where(JOBS.c.id == uuid.UUID(ids[0]))
            .values(created_at=hour_ago - timedelta(hours=1), run_at=hour_ago)
        )
        conn.execute(
            update(JOBS)
            .where(JOBS.c.id == uuid.UUID(lapsed))
            .values(lease_expires_at=hour_ago)
        )
    capsys.readouterr()

    result = lambda_handler.handler(lambda_handler.SWEEP_EVENT, LambdaContext())

    assert result == {**SWEPT_NOTHING, "leases_released": 1}
    captured = capsys.readouterr()
    sweep, gauges = log_lines(captured.err)
    assert (sweep["message"], gauges["message"]) == ("sweep", "job gauges")
    # After the sweep: the lapsed lease is pending again.
    assert (gauges["pending_jobs"], gauges["processing_jobs"]) == (3, 1)
    assert 3590 <= gauges["oldest_pending_age_seconds"] <= 3700
    records = emf_records(captured.out)
    assert metric_values(records, "LeasesExpired") == [1.0]
    (record,) = [r for r in records if "PendingJobs" in r]
    assert metric_values([record], "PendingJobs") == [3.0]
    assert metric_values([record], "ProcessingJobs") == [1.0]
    age = metric_values([record], "OldestPendingAgeSeconds")
    assert age == [gauges["oldest_pending_age_seconds"]]
    assert record["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "TestJobs"
    assert record["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [[]]


def test_sweep_gauges_on_an_empty_queue_are_zero(
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    metrics_on: None,
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setattr(lambda_handler, "app", create_app())
    result = lambda_handler.handler(lambda_handler.SWEEP_EVENT, LambdaContext())
    assert result == SWEPT_NOTHING
    (record,) = emf_records(capsys.readouterr().out)
    assert [
        metric_values([record], name)
        for name in ("PendingJobs", "ProcessingJobs", "OldestPendingAgeSeconds")
    ] == [[0.0], [0.0], [0.0]]


def test_the_stats_task_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """One schedule, the sweep's, publishes the gauges (terraform/schedule.tf)."""
    assert set(lambda_handler.SCHEDULED_TASKS) == {"sweep"}
    with pytest.raises(ValueError, match="'stats'"):
        lambda_handler.handler({"task": "stats"}, LambdaContext())


def test_an_unknown_task_is_refused_and_http_events_still_reach_the_app(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="'sweep-everything'"):
        lambda_handler.handler({"task": "sweep-everything"}, LambdaContext())
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setattr(
        lambda_handler, "http_handler", lambda_handler.build_handler(create_app())
    )
    response = lambda_handler.handler(
        http_api_event("GET", "/health", query="deep=1"), LambdaContext()
    )
    assert response_json(response) == {"status": "ok", "database": "ok"}


# --- configuration --------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LOG_LEVEL", "LOUD"),
        ("METRICS_ENABLED", "maybe"),
        ("METRICS_NAMESPACE", "AWS/Lambda"),
        ("METRICS_NAMESPACE", "Jobs{prod}"),
        ("METRICS_NAMESPACE", "N" * 256),
    ],
)
def test_a_bad_value_names_its_variable_in_one_line(variable: str, value: str) -> None:
    with pytest.raises(settings.ConfigError) as error:
        settings.settings_from_env({variable: value})
    assert str(error.value).startswith(variable)
    assert "\n" not in str(error.value)


def test_settings_defaults_and_values() -> None:
    def read(environ: dict[str, str]) -> tuple[str, bool, str]:
        config = settings.settings_from_env(environ)
        return config.log_level, config.metrics_enabled, config.metrics_namespace

    assert read({}) == ("INFO", False, "ExtractionJobs")
    assert read({"AWS_LAMBDA_FUNCTION_NAME": "f"})[1] is True
    assert read({"AWS_LAMBDA_FUNCTION_NAME": "f", "METRICS_ENABLED": "0"})[1] is False
    assert read({"METRICS_ENABLED": "1"})[1] is True
    assert read({"LOG_LEVEL": "debug", "METRICS_NAMESPACE": "Team/Jobs"}) == (
        "DEBUG",
        False,
        "Team/Jobs",
    )


def test_a_bad_log_level_stops_the_lambda_import() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import lambda_handler"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "AUTH_DISABLED": "1", "LOG_LEVEL": "LOUD"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()  # no traceback
    assert json.loads(line)["message"].startswith(
        "configuration error: LOG_LEVEL (got 'LOUD'): must be one of"
    )
