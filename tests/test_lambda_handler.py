"""The Lambda handler, in process, fed API Gateway HTTP API 2.0 events.

Each test builds the handler as lambda_handler does, on a fresh app over the
test's database (SQLite, and PostgreSQL when TEST_DATABASE_URL is set).
"""

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from lambda_events import LambdaContext, http_api_event, response_json

import lambda_handler
import observability
from main import create_app

Invoke = Callable[[dict[str, Any]], dict[str, Any]]


def invoker(asgi_app) -> Invoke:
    handler = lambda_handler.build_handler(asgi_app)
    return lambda event: handler(event, LambdaContext())


@pytest.fixture
def app(database_url: str, monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    monkeypatch.setenv("DATABASE_URL", database_url)
    return create_app()


@pytest.fixture
def invoke(app: FastAPI) -> Invoke:
    return invoker(app)


def create_job(invoke: Invoke, document_id: str, **fields: Any) -> dict[str, Any]:
    body = {"document_id": document_id, **fields}
    response = invoke(http_api_event("POST", "/extraction-jobs", json_body=body))
    assert response["statusCode"] == 201, response
    return response_json(response)


def test_create_then_get(invoke: Invoke) -> None:
    event = http_api_event(
        "POST",
        "/extraction-jobs",
        json_body={"document_id": "scan-1.pdf", "priority": 7, "metadata": {"p": 2}},
    )
    created = invoke(event)

    assert created["statusCode"] == 201
    assert created["headers"]["content-type"] == "application/json"
    job = response_json(created)
    assert created["headers"]["location"] == f"/extraction-jobs/{job['id']}"
    assert (job["document_id"], job["status"], job["priority"]) == (
        "scan-1.pdf",
        "pending",
        7,
    )
    assert job["metadata"] == {"p": 2}

    fetched = invoke(http_api_event("GET", f"/extraction-jobs/{job['id']}"))
    assert fetched["statusCode"] == 200
    assert response_json(fetched) == job


def test_list_filters_by_query_string(invoke: Invoke) -> None:
    wanted = create_job(invoke, "wanted.pdf")
    create_job(invoke, "wanted.pdf")
    create_job(invoke, "other.pdf")

    response = invoke(
        http_api_event(
            "GET", "/extraction-jobs", query="document_id=wanted.pdf&limit=1"
        )
    )

    assert response["statusCode"] == 200
    assert [job["id"] for job in response_json(response)] == [wanted["id"]]


def test_patch_with_base64_encoded_body(invoke: Invoke) -> None:
    job = create_job(invoke, "scan-2.pdf")
    event = http_api_event(
        "PATCH",
        f"/extraction-jobs/{job['id']}",
        json_body={"status": "processing"},
        base64_body=True,
    )
    assert event["isBase64Encoded"] and "processing" not in event["body"]

    response = invoke(event)

    assert response["statusCode"] == 200
    assert response_json(response)["status"] == "processing"


def test_unknown_job_is_404_with_detail(invoke: Invoke) -> None:
    response = invoke(http_api_event("GET", "/extraction-jobs/no-such-job"))

    assert response["statusCode"] == 404
    assert isinstance(response_json(response)["detail"], str)


def test_invalid_body_is_422_with_detail(invoke: Invoke) -> None:
    event = http_api_event("POST", "/extraction-jobs", json_body={"priority": 99})

    response = invoke(event)

    assert response["statusCode"] == 422
    fields = {tuple(error["loc"]) for error in response_json(response)["detail"]}
    assert {("body", "document_id"), ("body", "priority")} <= fields


def test_health(invoke: Invoke) -> None:
    response = invoke(http_api_event("GET", "/health", query="deep=1"))

    assert response["statusCode"] == 200
    assert response_json(response) == {"status": "ok", "database": "ok"}


def test_named_stage_is_stripped_with_api_gateway_base_path(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = http_api_event("GET", "/health", stage="prod")
    assert event["rawPath"] == "/prod/health"
    assert invoker(app)(event)["statusCode"] == 404

    monkeypatch.setenv("API_GATEWAY_BASE_PATH", "prod")

    assert invoker(app)(event)["statusCode"] == 200


def test_on_a_named_stage_the_urls_the_app_writes_keep_the_stage(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_GATEWAY_BASE_PATH", "prod")
    invoke = invoker(app)
    for number in range(3):
        created = invoke(
            http_api_event(
                "POST",
                "/extraction-jobs",
                json_body={"document_id": f"staged-{number}"},
                stage="prod",
            )
        )
        assert created["statusCode"] == 201
    job = response_json(created)
    assert created["headers"]["location"] == f"/prod/extraction-jobs/{job['id']}"
    listed = invoke(
        http_api_event("GET", "/extraction-jobs", query="limit=1", stage="prod")
    )
    link = listed["headers"]["link"]
    following = link[link.index("<") + 1 : link.index(">")]
    assert urlsplit(following).path == "/prod/extraction-jobs", link
    docs = invoke(http_api_event("GET", "/docs", stage="prod"))
    assert "/prod/openapi.json" in docs["body"]


def test_unhandled_error_is_one_json_log_line_and_a_json_500(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    def explode() -> None:
        raise RuntimeError("boom: secret internals")

    app.add_api_route("/explode", explode)
    event = http_api_event("GET", "/explode", request_id="JZ1Yvj7bIAMEMLQ=")

    with caplog.at_level(logging.INFO):
        response = invoker(app)(event)

    assert response["statusCode"] == 500
    assert response["headers"]["content-type"] == "application/json"
    assert response_json(response) == {"detail": "Internal Server Error"}
    assert "boom" not in response["body"]
    assert_one_json_error_line(caplog, "JZ1Yvj7bIAMEMLQ=")


def test_error_before_any_response_is_answered_by_the_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fallback for an exception that nothing in the app answered."""

    async def bare_app(scope, receive, send):
        raise ValueError("raised before any response")

    event = http_api_event("GET", "/anything", request_id="Kb2Zxk8cJBNFNMR=")

    with caplog.at_level(logging.INFO):
        response = invoker(bare_app)(event)

    assert response["statusCode"] == 500
    assert response_json(response) == {"detail": "Internal Server Error"}
    assert_one_json_error_line(caplog, "Kb2Zxk8cJBNFNMR=")


def assert_one_json_error_line(caplog: pytest.LogCaptureFixture, request_id: str):
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1, [r.getMessage() for r in problems]
    assert not any(record.exc_info for record in caplog.records)
    line = observability.logger.registered_formatter.format(problems[0])
    assert "\n" not in line
    assert json.loads(line)["request_id"] == request_id
