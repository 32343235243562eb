"""Shared by the job-control, bulk and operator-list tests (issue 19): an app
on the test's database, calls that assert their status, a job's whole
history, and an auth-on app with tokens signed by a loopback JWKS server.
"""

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from jose import jwt
from sqlalchemy import func, insert, select, update

import database
from db_models import CREATE_CLOCK, EVENTS, JOBS
from main import create_app
from models import FINISHED
from tests.jwks_server import JwksServer, RsaTestKey, use_jwks

JOBS_URL = "/extraction-jobs"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def make_app(
    url: str,
    monkeypatch: pytest.MonkeyPatch,
    clock: Callable[[], datetime] | None = None,
) -> FastAPI:
    monkeypatch.setenv("DATABASE_URL", url)
    app = create_app()
    if clock is not None:
        app.state.service.clock = clock
    return app


def seed(
    app: FastAPI,
    count: int,
    document_id: str,
    *,
    status: str = "pending",
    with_events: bool = True,
    **fields: Any,
) -> list[str]:
    """`count` jobs as creates would store them (with their `created`
    events, created_at 1 µs apart in creation order, the create clock moved
    on), in one transaction rather than a commit each: a thousand creates
    on SQLite, one fsync each, take over ten seconds. A finished `status`
    is as if it had been reached at once. Their ids, in creation order."""
    url = app.state.service.repository.url
    database.ensure_schema(url)
    with database.get_engine(url).begin() as connection:
        clock = connection.execute(select(func.max(CREATE_CLOCK.c.created_at))).scalar()
        start = max(app.state.service.clock(), clock or EPOCH)
        jobs, events = [], []
        for n in range(count):
            at = start + timedelta(microseconds=n + 1)
            job_id = uuid.uuid4()
            jobs.append(
                {
                    "id": job_id,
                    "document_id": document_id,
                    "status": status,
                    "finished_at": at if status in FINISHED else None,
                    "priority": fields.get("priority", 0),
                    "max_attempts": fields.get("max_attempts", 3),
                    "attempts": 0,
                    "version": 1,
                    "created_at": at,
                    "updated_at": at,
                    "run_at": at,
                }
            )
            iso = at.isoformat(timespec="microseconds")
            events.append(
                {
                    "job_id": job_id,
                    "at": at,
                    "type": "created",
                    "to_status": "pending",
                    "detail": {"run_at": iso},
                }
            )
        connection.execute(insert(JOBS), jobs)
        if with_events:
            connection.execute(insert(EVENTS), events)
        connection.execute(
            update(CREATE_CLOCK).values(created_at=jobs[-1]["created_at"])
        )
    return [str(row["id"]) for row in jobs]


def histories(app: FastAPI) -> dict[str, list[str]]:
    """Every job's event types, oldest first, read in one query (for tests
    that check thousands of histories)."""
    url = app.state.service.repository.url
    found: dict[str, list[str]] = {}
    with database.get_engine(url).connect() as connection:
        rows = connection.execute(
            select(EVENTS.c.job_id, EVENTS.c.type).order_by(EVENTS.c.seq)
        )
        for job_id, kind in rows:
            found.setdefault(str(job_id), []).append(kind)
    return found


def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def create(client: TestClient, document_id: str = "doc", **fields: Any) -> dict:
    return ok(client.post(JOBS_URL, json={"document_id": document_id, **fields}), 201)


def claim(
    client: TestClient, worker_id: str = "worker-1", limit: int = 1, **fields: Any
) -> list[dict]:
    body = {"worker_id": worker_id, "limit": limit, **fields}
    return ok(client.post(f"{JOBS_URL}/claim", json=body))


def job(client: TestClient, job_id: str) -> dict:
    return ok(client.get(f"{JOBS_URL}/{job_id}"))


def heartbeat(client: TestClient, job_id: str, worker_id: str, **fields: Any):
    return client.post(
        f"{JOBS_URL}/{job_id}/heartbeat", json={"worker_id": worker_id, **fields}
    )


def patch(client: TestClient, job_id: str, **body: Any):
    return client.patch(f"{JOBS_URL}/{job_id}", json=body)


def cancel(client: TestClient, job_id: str, **body: Any):
    return client.post(f"{JOBS_URL}/{job_id}/cancel", json=body)


def retry(client: TestClient, job_id: str, **body: Any):
    return client.post(f"{JOBS_URL}/{job_id}/retry", json=body)


def release(client: TestClient, job_id: str, worker_id: str, **body: Any):
    return client.post(
        f"{JOBS_URL}/{job_id}/release", json={"worker_id": worker_id, **body}
    )


def bulk(client: TestClient, **body: Any):
    return client.post(f"{JOBS_URL}/bulk", json=body)


def events(client: TestClient, job_id: str) -> list[dict]:
    """The job's whole history, every page."""
    found, after = [], 0
    while True:
        page = ok(
            client.get(
                f"{JOBS_URL}/{job_id}/events", params={"after": after, "limit": 1000}
            )
        )
        found += page
        if len(page) < 1000:
            return found
        after = page[-1]["id"]


def kinds(client: TestClient, job_id: str) -> list[str]:
    return [event["type"] for event in events(client, job_id)]


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def sleep_past(instant: str, margin: float = 0.3) -> None:
    """Really wait (no test clock) until `instant` has passed."""
    remaining = (ts(instant) - datetime.now(UTC)).total_seconds() + margin
    if remaining > 0:
        time.sleep(remaining)


def assert_422(response: Any) -> list[dict]:
    """A 422 that says what is wrong, in FastAPI's list form."""
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    assert all(problem["msg"] for problem in detail), detail
    return detail


# --- auth on ---------------------------------------------------------------------

AUDIENCE = "https://extraction-jobs.example.invalid"
ISSUER = "https://ops-tenant.example.invalid/"
READ = "read:extraction-jobs"
WRITE = "write:extraction-jobs"
ADMIN = "admin:extraction-jobs"


class Tokens:
    """Signs RS256 tokens the app accepts, granting permissions through
    Auth0's RBAC `permissions` claim (or, `as_scope`, the `scope` claim)."""

    def __init__(self, key: RsaTestKey) -> None:
        self.key = key

    def __call__(
        self, sub: str, *permissions: str, as_scope: bool = False
    ) -> dict[str, str]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "exp": now + 600,
        }
        if as_scope:
            claims["scope"] = " ".join(permissions)
        else:
            claims["permissions"] = list(permissions)
        token = jwt.encode(
            claims,
            self.key.private_pem,
            algorithm="RS256",
            headers={"kid": self.key.kid},
        )
        return {"Authorization": f"Bearer {token}"}


def secured_app(
    url: str,
    monkeypatch: pytest.MonkeyPatch,
    server: JwksServer,
    *,
    require_scopes: bool = True,
) -> FastAPI:
    """An app with auth on (against `server`), on the test's database."""
    use_jwks(monkeypatch, server, issuer=ISSUER, audience=AUDIENCE)
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    if not require_scopes:
        monkeypatch.setenv("AUTH_REQUIRE_SCOPES", "0")
    return make_app(url, monkeypatch)


def jwks_serving(key: RsaTestKey) -> Iterator[JwksServer]:
    server = JwksServer().start()
    server.keys = [key.public_jwk()]
    try:
        yield server
    finally:
        server.stop()
