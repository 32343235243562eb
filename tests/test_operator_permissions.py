"""Issue 19: who may act. Auth on (a real JWKS server on loopback, RS256
tokens granting permissions through Auth0's `permissions` claim), on SQLite
and PostgreSQL; and what the OpenAPI document declares.
"""

import json

import pytest
from fastapi.testclient import TestClient

from tests.jwks_server import RsaTestKey
from tests.operator_helpers import (
    ADMIN,
    READ,
    WRITE,
    Tokens,
    bulk,
    cancel,
    claim,
    create,
    events,
    heartbeat,
    job,
    jwks_serving,
    ok,
    patch,
    release,
    retry,
    secured_app,
)

HOLDER = "auth0|worker-a"
OTHER = "auth0|worker-b"
OPERATOR = "auth0|operator"


@pytest.fixture(scope="module")
def key() -> RsaTestKey:
    return RsaTestKey("ops-key")


@pytest.fixture
def jwks(key):
    yield from jwks_serving(key)


@pytest.fixture
def tokens(key) -> Tokens:
    return Tokens(key)


@pytest.fixture
def secured(database_url, monkeypatch, jwks) -> TestClient:
    return TestClient(secured_app(database_url, monkeypatch, jwks))


@pytest.fixture
def holder(tokens):
    return tokens(HOLDER, READ, WRITE)


@pytest.fixture
def other(tokens):
    return tokens(OTHER, READ, WRITE)


@pytest.fixture
def admin(tokens):
    return tokens(OPERATOR, READ, WRITE, ADMIN)


def as_(client: TestClient, headers: dict) -> TestClient:
    """The same app, every request with these headers."""
    scoped = TestClient(client.app)
    scoped.headers.update(headers)
    return scoped


def assert_forbidden(response, scope: str) -> None:
    assert response.status_code == 403, response.text
    assert scope in response.json()["detail"]
    challenge = response.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert f'scope="{scope}"' in challenge


# --- the admin routes -----------------------------------------------------------


def test_a_plain_write_token_gets_403_on_cancel_retry_and_bulk(secured, holder, admin):
    worker = as_(secured, holder)
    pending = create(worker, "pending")
    failed = create(worker, "failed")
    ok(patch(worker, failed["id"], status="failed", error_message="bad scan"))
    before = [job(worker, pending["id"]), job(worker, failed["id"])]
    history = [events(worker, pending["id"]), events(worker, failed["id"])]

    assert_forbidden(cancel(worker, pending["id"], reason="no"), ADMIN)
    assert_forbidden(retry(worker, failed["id"]), ADMIN)
    for action in ("cancel", "retry"):
        assert_forbidden(
            bulk(worker, action=action, filter={"document_id": "pending"}), ADMIN
        )
        assert_forbidden(
            bulk(worker, action=action, ids=[pending["id"]], dry_run=True), ADMIN
        )
    assert [job(worker, pending["id"]), job(worker, failed["id"])] == before
    assert [events(worker, pending["id"]), events(worker, failed["id"])] == history


def test_release_needs_the_write_permission(secured, tokens, holder):
    worker = as_(secured, holder)
    created = create(worker)
    claim(worker, "wa")
    reader = as_(secured, tokens(HOLDER, READ))
    assert_forbidden(release(reader, created["id"], "wa"), WRITE)
    assert job(worker, created["id"])["status"] == "processing"


def test_an_admin_token_cancels_retries_and_bulks_with_the_actor_recorded(
    secured, holder, admin
):
    worker, operator = as_(secured, holder), as_(secured, admin)
    first = create(worker, "batch")
    second = create(worker, "batch")
    ok(cancel(operator, first["id"], reason="wrong file"))
    ok(retry(operator, first["id"]))
    outcome = ok(bulk(operator, action="cancel", filter={"document_id": "batch"}))
    assert (outcome["matched"], outcome["changed"]) == (2, 2)
    for job_id, expected in (
        (first["id"], ["created", "cancelled", "retried", "cancelled"]),
        (second["id"], ["created", "cancelled"]),
    ):
        history = events(worker, job_id)
        assert [event["type"] for event in history] == expected
        assert [event["actor"] for event in history] == [HOLDER] + [OPERATOR] * (
            len(expected) - 1
        )
        assert job(worker, job_id)["updated_by"] == OPERATOR


def test_an_admin_permission_granted_by_scope_works_too(secured, tokens):
    operator = as_(secured, tokens(OPERATOR, READ, WRITE, ADMIN, as_scope=True))
    created = create(operator)
    assert ok(cancel(operator, created["id"]))["status"] == "cancelled"
    assert events(operator, created["id"])[-1]["actor"] == OPERATOR


# --- another subject's lease ------------------------------------------------------


def test_a_plain_write_token_gets_409_on_another_subjects_lease(secured, holder, other):
    worker, stranger = as_(secured, holder), as_(secured, other)
    created = create(worker)
    [held] = claim(worker, "wa")
    for response in (
        patch(stranger, created["id"], status="completed", worker_id="wa"),
        patch(stranger, created["id"], status="completed"),
        patch(stranger, created["id"], status="failed"),
        patch(stranger, created["id"], status="pending"),
        heartbeat(stranger, created["id"], "wa"),
        release(stranger, created["id"], "wa"),
    ):
        assert response.status_code == 409, response.text
        assert response.json()["detail"]
    assert job(worker, created["id"]) == held
    # The holder's own subject, naming no worker, may.
    assert ok(patch(worker, created["id"], status="completed"))["status"] == "completed"


@pytest.mark.parametrize("status", ["completed", "failed", "pending", "cancelled"])
def test_an_admin_patch_without_worker_id_overrides_the_lease(
    secured, holder, admin, status
):
    worker, operator = as_(secured, holder), as_(secured, admin)
    created = create(worker)
    claim(worker, "wa")
    changed = ok(patch(operator, created["id"], status=status))
    assert changed["status"] == status
    assert changed["updated_by"] == OPERATOR
    assert changed["lease_expires_at"] is None
    event = events(worker, created["id"])[-1]
    assert (event["from_status"], event["to_status"], event["actor"]) == (
        "processing",
        status,
        OPERATOR,
    )
    # The old holder no longer holds it.
    assert heartbeat(worker, created["id"], "wa").status_code == 409


def test_an_admin_patch_naming_a_worker_is_no_override(secured, holder, admin):
    worker, operator = as_(secured, holder), as_(secured, admin)
    created = create(worker)
    [held] = claim(worker, "wa")
    for worker_id in ("wa", "another"):
        refused = patch(
            operator, created["id"], status="completed", worker_id=worker_id
        )
        assert refused.status_code == 409, refused.text
    assert job(worker, created["id"]) == held


def test_without_required_scopes_every_caller_is_an_operator(
    database_url, monkeypatch, jwks, tokens
):
    app = secured_app(database_url, monkeypatch, jwks, require_scopes=False)
    client = as_(TestClient(app), tokens(OTHER))  # no permissions at all
    created = create(client)
    assert ok(cancel(client, created["id"]))["status"] == "cancelled"
    assert ok(retry(client, created["id"]))["status"] == "pending"
    outcome = ok(bulk(client, action="cancel", ids=[created["id"]]))
    assert outcome["changed"] == 1


# --- the OpenAPI document ----------------------------------------------------------

NEW_ROUTES = {
    "/extraction-jobs/{job_id}/cancel": ("CancelRequest", ADMIN, {404, 409, 422}),
    "/extraction-jobs/{job_id}/retry": ("RetryRequest", ADMIN, {404, 409, 422}),
    "/extraction-jobs/{job_id}/release": ("ReleaseRequest", WRITE, {404, 409, 422}),
    "/extraction-jobs/bulk": ("BulkRequest", ADMIN, {422}),
}


@pytest.fixture
def openapi(client) -> dict:
    return ok(client.get("/openapi.json"))


@pytest.mark.parametrize("path", sorted(NEW_ROUTES))
def test_openapi_declares_each_new_route_its_body_errors_and_permission(openapi, path):
    body, scope, errors = NEW_ROUTES[path]
    operation = openapi["paths"][path]["post"]
    assert operation["requestBody"]["required"] is True
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": f"#/components/schemas/{body}"}
    assert operation["security"] == [{"HTTPBearer": [scope]}]
    declared = {int(code) for code in operation["responses"]}
    assert {200, 401, 403, 503} | errors <= declared
    for code in errors | {401, 403}:
        assert operation["responses"][str(code)]["description"]


def test_openapi_bodies_say_their_limits(openapi):
    schemas = openapi["components"]["schemas"]
    reason = schemas["CancelRequest"]["properties"]["reason"]
    assert {"type": "string", "maxLength": 1000} in reason["anyOf"]
    assert schemas["CancelRequest"]["additionalProperties"] is False
    assert set(schemas["RetryRequest"]["properties"]) == {"run_at", "priority"}
    assert schemas["ReleaseRequest"]["required"] == ["worker_id"]
    retry_in = schemas["ReleaseRequest"]["properties"]["retry_in_seconds"]
    assert {"type": "integer", "minimum": 0, "maximum": 86400} in retry_in["anyOf"]
    bulk_body = schemas["BulkRequest"]
    assert bulk_body["required"] == ["action"]
    assert bulk_body["additionalProperties"] is False
    assert set(bulk_body["properties"]) == {
        "action",
        "filter",
        "ids",
        "dry_run",
        "reason",
    }
    assert schemas["BulkAction"]["enum"] == ["cancel", "retry"]
    ids = bulk_body["properties"]["ids"]["anyOf"][0]
    assert (ids["maxItems"], ids["items"]["format"]) == (1000, "uuid")
    assert set(schemas["JobFilter"]["properties"]) == {
        "status",
        "document_id",
        "created_after",
        "created_before",
        "worker_id",
    }
    assert set(schemas["BulkOutcome"]["properties"]) == {
        "matched",
        "changed",
        "dry_run",
        "more",
    }


def test_openapi_declares_cancelled_the_new_fields_and_list_parameters(openapi):
    schemas = openapi["components"]["schemas"]
    assert "cancelled" in schemas["JobStatus"]["enum"]
    assert "cancel_requested_at" in schemas["Job"]["properties"]
    assert "cancelled" in schemas["StatusCounts"]["properties"]
    assert "estimated" in schemas["JobStats"]["properties"]
    parameters = {
        parameter["name"]: parameter
        for parameter in openapi["paths"]["/extraction-jobs"]["get"]["parameters"]
    }
    status = parameters["status"]["schema"]["anyOf"][0]
    assert status["type"] == "array"
    for name in ("created_after", "created_before"):
        assert parameters[name]["schema"]["anyOf"][0]["format"] == "date-time"
    assert "worker_id" in parameters
    order = parameters["order"]["schema"]
    assert order["default"] == "asc"
    assert schemas["ListOrder"]["enum"] == ["asc", "desc"]


def test_openapi_names_the_admin_override_of_patch(openapi):
    """The override is the one admin power on a write route: the PATCH's
    description or its body must say which permission grants it."""
    operation = openapi["paths"]["/extraction-jobs/{job_id}"]["patch"]
    text = json.dumps(operation) + json.dumps(
        openapi["components"]["schemas"]["JobUpdate"]
    )
    assert ADMIN in text
