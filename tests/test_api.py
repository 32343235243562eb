"""The v1 HTTP contract, field by field.

These tests are safe to run against a deployed API (`make test-deployed`):
each one works only on jobs whose `document_id` it made up, and lists
only through that `document_id` filter.
"""

import itertools
import os
import re
import uuid
from datetime import datetime

import httpx
import pytest
from conftest import API_URL
from fastapi.testclient import TestClient

from main import create_app
from models import MAX_METADATA_BYTES, JobStatus

ISO_UTC_MICROS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
JOB_FIELDS = {
    "id",
    "document_id",
    "status",
    "priority",
    "metadata",
    "error_message",
    "created_at",
    "updated_at",
    "created_by",
    "attempts",
    "worker_id",
    "started_at",
    "max_attempts",
    "run_at",
    "lease_expires_at",
    "heartbeat_at",
    "cancel_requested_at",
    "result",
    "updated_by",
    "finished_at",
    "version",
}
ALLOWED = {
    ("pending", "processing"),
    ("pending", "completed"),
    ("pending", "failed"),
    ("processing", "completed"),
    ("processing", "failed"),
    ("processing", "pending"),
    # The holder honouring a cancel request (a pending job is cancelled by
    # POST .../cancel, not by PATCH).
    ("processing", "cancelled"),
}
FINISHED = {"completed", "failed", "cancelled"}
STATUSES = [status.value for status in JobStatus]


def create(api, doc_id, **fields):
    response = api.post("/extraction-jobs", json={"document_id": doc_id, **fields})
    assert response.status_code == 201, response.text
    return response.json()


# The PATCHes that bring a fresh (pending) job to a status: only its holder
# moves a job to cancelled.
PATH_TO = {"pending": [], "cancelled": ["processing", "cancelled"]}


def job_in(api, doc_id, status):
    """A fresh job brought to `status` through the API."""
    job = create(api, doc_id)
    for step in PATH_TO.get(status, [status]):
        response = api.patch(f"/extraction-jobs/{job['id']}", json={"status": step})
        assert response.status_code == 200, response.text
        job = response.json()
    return job


def listed(api, doc_id, **params):
    response = api.get("/extraction-jobs", params={"document_id": doc_id, **params})
    assert response.status_code == 200, response.text
    return response.json()


def assert_detail(response, status_code):
    assert response.status_code == status_code, response.text
    assert "detail" in response.json()


# --- create -------------------------------------------------------------


def test_create_returns_201_location_and_the_full_job(api, doc_id):
    response = api.post(
        "/extraction-jobs",
        json={"document_id": doc_id, "priority": 7, "metadata": {"pages": 3}},
    )
    assert response.status_code == 201
    job = response.json()
    assert set(job) == JOB_FIELDS
    assert response.headers["location"] == f"/extraction-jobs/{job['id']}"
    assert uuid.UUID(job["id"]).version == 4
    assert job["document_id"] == doc_id
    assert job["status"] == "pending"
    assert job["priority"] == 7
    assert job["metadata"] == {"pages": 3}
    assert job["error_message"] is None
    assert job["attempts"] == 0
    assert job["version"] == 1
    assert job["worker_id"] is job["started_at"] is job["finished_at"] is None
    assert job["cancel_requested_at"] is None
    assert ISO_UTC_MICROS.match(job["created_at"]), job["created_at"]
    assert job["created_at"] == job["updated_at"]


def test_create_defaults_priority_zero_and_metadata_null(api, doc_id):
    job = create(api, doc_id)
    assert job["priority"] == 0
    assert job["metadata"] is None


def test_created_job_reads_back_identically(api, doc_id):
    metadata = {"nested": {"list": [1, 2.5, "x", None, True]}, "unicode": "żółw 🐢"}
    job = create(api, doc_id, priority=10, metadata=metadata)
    response = api.get(f"/extraction-jobs/{job['id']}")
    assert response.status_code == 200
    assert response.json() == job
    assert response.json()["metadata"] == metadata


def test_created_ids_are_distinct(api, doc_id):
    ids = {create(api, doc_id)["id"] for _ in range(5)}
    assert len(ids) == 5


# --- get ----------------------------------------------------------------


def test_get_unknown_id_is_404(api):
    assert_detail(api.get(f"/extraction-jobs/{uuid.uuid4()}"), 404)


@pytest.mark.parametrize(
    "bad_id", ["not-a-uuid", "123", "x" * 300, "%00", "' OR 1=1 --", "%E2%98%83"]
)
def test_get_malformed_id_is_404(api, bad_id):
    assert_detail(api.get(f"/extraction-jobs/{bad_id}"), 404)


# --- patch --------------------------------------------------------------


@pytest.mark.parametrize("current", STATUSES)
@pytest.mark.parametrize("target", STATUSES)
def test_state_machine(api, doc_id, current, target):
    job = job_in(api, doc_id, current)
    response = api.patch(f"/extraction-jobs/{job['id']}", json={"status": target})
    after = api.get(f"/extraction-jobs/{job['id']}").json()
    if current == target or (current, target) in ALLOWED:
        assert response.status_code == 200, response.text
        assert response.json()["status"] == target
        assert after == response.json()
        if current == target:
            assert after == job  # the same request again changes nothing
    else:
        assert_detail(response, 409)
        detail = response.json()["detail"]
        if current in FINISHED:  # a finished job refuses every move: it is final
            assert "finished" in detail and current in detail
        else:  # a move the machine has no edge for names both ends
            assert f"'{current}' to '{target}'" in detail
        assert after == job  # nothing changed


def test_patch_moves_updated_at_forward_and_keeps_created_at(api, doc_id):
    job = create(api, doc_id)
    seen = [job]
    for status in ("processing", "pending", "processing", "pending", "completed"):
        response = api.patch(f"/extraction-jobs/{job['id']}", json={"status": status})
        assert response.status_code == 200, response.text
        seen.append(response.json())
    for before, after in itertools.pairwise(seen):
        assert after["created_at"] == job["created_at"]
        assert datetime.fromisoformat(after["updated_at"]) > datetime.fromisoformat(
            before["updated_at"]
        )
        assert ISO_UTC_MICROS.match(after["updated_at"])


def test_patch_stores_error_message_as_sent_and_absent_means_null(api, doc_id):
    job = job_in(api, doc_id, "processing")
    url = f"/extraction-jobs/{job['id']}"
    released = api.patch(url, json={"status": "pending", "error_message": "OCR slow"})
    assert released.json()["error_message"] == "OCR slow"
    taken = api.patch(url, json={"status": "processing"})
    assert taken.json()["error_message"] is None
    failed = api.patch(url, json={"status": "failed", "error_message": "OCR timed out"})
    assert failed.json()["error_message"] == "OCR timed out"


def test_patch_to_same_status_changes_only_error_message(api, doc_id):
    job = job_in(api, doc_id, "processing")
    url = f"/extraction-jobs/{job['id']}"
    changed = api.patch(
        url, json={"status": "processing", "error_message": "page 3 is slow"}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["error_message"] == "page 3 is slow"
    assert changed.json()["updated_at"] > job["updated_at"]
    unchanged = ("started_at", "lease_expires_at", "attempts", "worker_id")
    assert [changed.json()[f] for f in unchanged] == [job[f] for f in unchanged]
    same = api.patch(
        url, json={"status": "processing", "error_message": "page 3 is slow"}
    )
    assert same.status_code == 200
    assert same.json() == changed.json()  # no real change, nothing moves


def test_a_finished_jobs_error_message_is_final(api, doc_id):
    job = job_in(api, doc_id, "failed")
    url = f"/extraction-jobs/{job['id']}"
    changed = api.patch(url, json={"status": "failed", "error_message": "disk full"})
    assert_detail(changed, 409)
    assert "finished" in changed.json()["detail"]
    assert api.get(url).json() == job


def test_patch_completed_job_same_status_is_allowed(api, doc_id):
    job = job_in(api, doc_id, "completed")
    response = api.patch(f"/extraction-jobs/{job['id']}", json={"status": "completed"})
    assert response.status_code == 200
    assert response.json() == job


def test_patch_unknown_and_malformed_ids_are_404(api):
    body = {"status": "processing"}
    assert_detail(api.patch(f"/extraction-jobs/{uuid.uuid4()}", json=body), 404)
    assert_detail(api.patch("/extraction-jobs/nope", json=body), 404)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"error_message": "x"},
        {"status": "done"},
        {"status": None},
        {"status": 1},
        {"status": "processing", "error_message": 5},
        {"status": "processing", "error_message": "x" * 10_001},
        {"status": "processing", "error_message": "bad \u0000 byte"},
        {"status": "processing", "priority": 3},
    ],
)
def test_patch_invalid_body_is_422_and_changes_nothing(api, doc_id, body):
    job = create(api, doc_id)
    assert_detail(api.patch(f"/extraction-jobs/{job['id']}", json=body), 422)
    assert api.get(f"/extraction-jobs/{job['id']}").json() == job


def test_patch_error_message_at_limit_is_accepted(api, doc_id):
    job = create(api, doc_id)
    message = "e" * 10_000
    response = api.patch(
        f"/extraction-jobs/{job['id']}",
        json={"status": "failed", "error_message": message},
    )
    assert response.status_code == 200
    assert response.json()["error_message"] == message


# --- list ---------------------------------------------------------------


def test_list_returns_array_in_creation_order(api, doc_id):
    ids = [create(api, doc_id, priority=i % 3)["id"] for i in range(6)]
    assert [job["id"] for job in listed(api, doc_id)] == ids


def test_list_filters_combine(api, doc_id):
    other = f"{doc_id}-other"
    a = job_in(api, doc_id, "failed")
    job_in(api, doc_id, "pending")
    job_in(api, other, "failed")
    assert [j["id"] for j in listed(api, doc_id, status="failed")] == [a["id"]]
    assert {j["document_id"] for j in listed(api, other)} == {other}
    assert listed(api, doc_id, status="completed") == []


def test_list_pagination_applies_to_the_filtered_result(api, doc_id):
    ids = [create(api, doc_id)["id"] for _ in range(5)]
    assert [j["id"] for j in listed(api, doc_id, limit=2)] == ids[:2]
    assert [j["id"] for j in listed(api, doc_id, limit=2, offset=2)] == ids[2:4]
    assert [j["id"] for j in listed(api, doc_id, limit=2, offset=4)] == ids[4:]
    assert listed(api, doc_id, offset=5) == []
    assert listed(api, doc_id, limit=0) == []
    assert [j["id"] for j in listed(api, doc_id, limit=1000)] == ids


def test_list_unknown_document_is_empty_array(api, doc_id):
    assert listed(api, doc_id) == []


@pytest.mark.parametrize(
    "params",
    [
        {"status": "done"},
        {"status": ""},
        {"limit": -1},
        {"limit": 1001},
        {"limit": "ten"},
        {"limit": 1.5},
        {"offset": -1},
        {"offset": 2**63},
        {"document_id": ""},
        {"document_id": "x" * 256},
        {"document_id": "nul\u0000here"},
    ],
)
def test_list_invalid_query_is_422(api, params):
    assert_detail(api.get("/extraction-jobs", params=params), 422)


def test_list_sql_looking_filter_is_just_a_string(api, doc_id):
    hostile = f"{doc_id}' OR '1'='1"
    create(api, doc_id)
    assert listed(api, hostile) == []
    job = create(api, hostile)
    assert [j["id"] for j in listed(api, hostile)] == [job["id"]]


# --- validation ---------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"document_id": ""},
        {"document_id": "x" * 256},
        {"document_id": 42},
        {"document_id": None},
        {"document_id": ["a"]},
        {"document_id": "nul\u0000"},
        {"priority": -1},
        {"priority": 11},
        {"priority": 5.5},
        {"priority": 5.0},
        {"priority": "5"},
        {"priority": True},
        {"priority": None},
        {"priority": 10**30},
        {"metadata": []},
        {"metadata": "text"},
        {"metadata": 3},
        {"metadata": {"k\u0000": 1}},
        {"metadata": {"k": "v\u0000"}},
        {"metadata": {"k": ["deep", {"x": "\u0000"}]}},
        {"unknown_field": 1},
    ],
)
def test_create_invalid_is_422(api, doc_id, fields):
    body = {"document_id": doc_id, **fields}
    assert_detail(api.post("/extraction-jobs", json=body), 422)


def test_create_document_id_max_length_accepted(api, doc_id):
    long_id = (doc_id + "y" * 255)[:255]
    assert create(api, long_id)["document_id"] == long_id


@pytest.mark.parametrize("priority", [0, 10])
def test_create_priority_bounds_accepted(api, doc_id, priority):
    assert create(api, doc_id, priority=priority)["priority"] == priority


def nested(depth):
    """A metadata object `depth` levels deep."""
    value = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_metadata_depth_limit(api, doc_id):
    assert create(api, doc_id, metadata=nested(32))["metadata"] == nested(32)
    too_deep = api.post(
        "/extraction-jobs", json={"document_id": doc_id, "metadata": nested(33)}
    )
    assert_detail(too_deep, 422)


def test_metadata_size_limit(api, doc_id):
    # {"k":"..."} is 8 bytes of JSON around the string
    fits = {"k": "x" * (MAX_METADATA_BYTES - 8)}
    assert create(api, doc_id, metadata=fits)["metadata"] == fits
    over = {"k": "x" * (MAX_METADATA_BYTES - 7)}
    response = api.post(
        "/extraction-jobs", json={"document_id": doc_id, "metadata": over}
    )
    assert_detail(response, 422)


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"not json",
        b'{"document_id": "x",}',
        b"",
        b"\xff\xfe\x00",
        b"[" * 100_000,
        b'{"document_id": "x", "metadata": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001,
        b'{"document_id": "\\ud800"}',
        b'{"document_id": "x", "metadata": {"n": NaN}}',
        b'{"document_id": "x", "metadata": {"n": Infinity}}',
    ],
)
def test_malformed_or_hostile_json_is_422(api, raw):
    response = api.post(
        "/extraction-jobs", content=raw, headers={"content-type": "application/json"}
    )
    assert_detail(response, 422)


def test_body_over_one_mebibyte_is_413(api, doc_id):
    body = (
        b'{"document_id": "'
        + doc_id.encode()
        + b'", "pad": "'
        + b"x" * 1_048_576
        + b'"}'
    )
    response = api.post(
        "/extraction-jobs", content=body, headers={"content-type": "application/json"}
    )
    assert_detail(response, 413)
    assert listed(api, doc_id) == []


def test_streamed_body_over_one_mebibyte_is_413(api, doc_id):
    def chunks():
        yield b'{"document_id": "' + doc_id.encode() + b'", "pad": "'
        for _ in range(17):
            yield b"x" * 65_536
        yield b'"}'

    response = api.post(
        "/extraction-jobs",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert_detail(response, 413)
    assert listed(api, doc_id) == []


def test_sql_looking_strings_are_stored_verbatim(api, doc_id):
    hostile = "'); DROP TABLE extraction_job; --"
    job = create(api, f"{doc_id}{hostile}", metadata={hostile: hostile})
    assert job["metadata"] == {hostile: hostile}
    assert api.get(f"/extraction-jobs/{job['id']}").json() == job


# --- health, docs, errors -----------------------------------------------


def test_health_is_ok(api):
    response = api.get("/health", params={"deep": "1"})
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_health_by_default_asks_nothing_of_the_database(api):
    """Cheap for load balancers and uptime probes; `deep=1` for the database."""
    response = api.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "not_checked"}
    refused = api.get("/health", params={"deep": "maybe"})
    assert refused.status_code == 422


def test_unknown_route_and_method_use_detail(api):
    # Deployed, a path with no route is the gateway's own 404 (no catch-all).
    response = api.get("/no-such-route")
    if response.json() != GATEWAY_NOT_FOUND:
        assert_detail(response, 404)
    assert_detail(api.delete(f"/extraction-jobs/{uuid.uuid4()}"), 405)


def test_openapi_describes_every_route_bound_and_error(api):
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {
        "/extraction-jobs",
        "/extraction-jobs/{job_id}",
        "/extraction-jobs/claim",
        "/health",
    }
    schemas = spec["components"]["schemas"]
    create_schema = schemas["JobCreate"]
    assert create_schema["examples"]
    assert create_schema["properties"]["priority"]["maximum"] == 10
    assert create_schema["properties"]["document_id"]["maxLength"] == 255
    assert schemas["JobUpdate"]["examples"]
    assert schemas["ClaimRequest"]["examples"]
    patch = paths["/extraction-jobs/{job_id}"]["patch"]["responses"]
    assert {"200", "404", "409", "412", "422"} <= set(patch)
    listing = paths["/extraction-jobs"]["get"]["parameters"]
    limit = next(p for p in listing if p["name"] == "limit")["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (0, 1000, 100)
    assert api.get("/docs").status_code == 200


# --- without a token ------------------------------------------------------------
#
# Deployed, the gateway's JWT authorizer answers a request without a valid
# token itself: 401 {"message": "Unauthorized"}, the function never runs. In
# process (or with auth_disabled, no gateway authorizer) the app answers
# RFC 6750's 401. Either is right; nothing else is.

GATEWAY_UNAUTHORIZED = {"message": "Unauthorized"}
GATEWAY_NOT_FOUND = {"message": "Not Found"}


def assert_unauthenticated(response, *, invalid_token: bool = False) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    challenge = response.headers.get("www-authenticate", "")
    if body == GATEWAY_UNAUTHORIZED:
        if invalid_token:
            assert 'error="invalid_token"' in challenge
        return
    assert set(body) == {"detail"}
    assert challenge.startswith('Bearer realm="extraction-jobs"')
    if invalid_token:
        assert 'error="invalid_token"' in challenge


@pytest.fixture
def anonymous(request, tmp_path, monkeypatch):
    """A client that sends no token: to the deployed API, or in process to
    an app with auth on (these requests are refused before any key is
    fetched, so the JWKS URL is a closed port on 127.0.0.1)."""
    if API_URL:
        if not os.environ.get("API_TOKEN", "").strip():
            pytest.skip("API_TOKEN is unset: taken as a deployment with auth off")
        with httpx.Client(base_url=API_URL.rstrip("/"), timeout=30) as client:
            yield client
        return
    monkeypatch.delenv("AUTH_DISABLED")
    monkeypatch.setenv("AUTH0_DOMAIN", "tenant.example.invalid")
    monkeypatch.setenv("AUTH0_AUDIENCE", "https://extraction-jobs.example.invalid")
    monkeypatch.setenv("AUTH0_JWKS_URL", "http://127.0.0.1:1/.well-known/jwks.json")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    yield TestClient(create_app())


JOB_PATH = "/extraction-jobs/00000000-0000-4000-8000-000000000000"
NO_TOKEN_REQUESTS = [
    ("GET", "/extraction-jobs", None),
    ("POST", "/extraction-jobs", {"document_id": "contract-test-no-token"}),
    ("POST", "/extraction-jobs/claim", {"worker_id": "contract-test-no-token"}),
    ("GET", JOB_PATH, None),
    ("PATCH", JOB_PATH, {"status": "failed"}),
]


@pytest.mark.parametrize(("method", "path", "body"), NO_TOKEN_REQUESTS)
def test_job_routes_without_a_token_are_401(anonymous, method, path, body):
    assert_unauthenticated(anonymous.request(method, path, json=body))


@pytest.mark.parametrize(("method", "path", "body"), NO_TOKEN_REQUESTS)
def test_job_routes_with_a_token_that_is_not_a_jwt_are_401(
    anonymous, method, path, body
):
    headers = {"Authorization": "Bearer not-a-jwt"}
    response = anonymous.request(method, path, json=body, headers=headers)
    assert_unauthenticated(response, invalid_token=True)


@pytest.mark.parametrize(
    "path",
    [
        "/health",
        "/openapi.json",
        "/docs",
        "/redoc",
        "/console",
        "/console/config.json",
        "/console/assets/console.js",
    ],
)
def test_public_routes_need_no_token(anonymous, path):
    assert anonymous.get(path).status_code == 200


def fake_response(status: int, body: dict, challenge: str | None = None):
    headers = {"www-authenticate": challenge} if challenge else {}
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("response", "invalid_token"),
    [
        (fake_response(401, GATEWAY_UNAUTHORIZED), False),
        (
            fake_response(
                401,
                GATEWAY_UNAUTHORIZED,
                'Bearer scope="" error="invalid_token" error_description="x"',
            ),
            True,
        ),
        (fake_response(401, {"detail": "x"}, 'Bearer realm="extraction-jobs"'), False),
    ],
    ids=["gateway-no-token", "gateway-invalid", "app"],
)
def test_both_401_shapes_are_accepted(response, invalid_token):
    assert_unauthenticated(response, invalid_token=invalid_token)


@pytest.mark.parametrize(
    "response",
    [
        fake_response(200, []),
        fake_response(403, {"detail": "x"}, 'Bearer realm="extraction-jobs"'),
        fake_response(401, {"detail": "x"}),
        fake_response(401, {"message": "Forbidden"}),
    ],
    ids=["200", "403", "no-challenge", "other-gateway-body"],
)
def test_other_answers_are_not_taken_for_a_401(response):
    with pytest.raises(AssertionError):
        assert_unauthenticated(response)
