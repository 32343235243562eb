"""The database failing in the ways networks fail, made on loopback, against
a real PostgreSQL and with the default settings (the times asserted are the
ones the defaults promise):

- a partition: iptables drops every packet to and from a forwarding port;
- a server that falls silent: the forwarder keeps acknowledging and answers
  nothing, as a hung instance or a proxy into a black hole;
- a tarpit: a port that accepts connections and never says a word;
- a role with a small CONNECTION LIMIT.

Each time: 503 with Retry-After, never 500, never a hang; concurrent requests
answered side by side, not one after another; 200 again by itself within
seconds once the fault is gone; nothing acknowledged lost.
"""

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from conftest import empty_postgres, postgres_url, require
from fastapi.testclient import TestClient
from faults import (
    app_role,
    forwarder,
    iptables_usable,
    partition,
    rules_left,
    tarpit,
)
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

import database
import settings
from main import create_app

# About 10-15 s for a partition (tcp_user_timeout 5 s, then the connect
# timeout 5 s), the deadline (statement timeout 10 s + 1 s) for a server
# that falls silent, the connect timeout (5 s) for one that never answered.
PARTITION_503_WITHIN_S = 15
SILENT_503_WITHIN_S = 12
TARPIT_503_WITHIN_S = 12
# Side by side, not one connect timeout after another.
SPREAD_S = 2.0
CONNECT_TIMEOUT_S = 5  # DB_CONNECT_TIMEOUT's default
RECOVERED_WITHIN_S = 5.0

Request = Callable[[TestClient], httpx.Response]


def _mixed(job_id: str) -> list[Request]:
    """Six requests of the kinds that reach the database: reads and writes."""
    return [
        lambda c: c.get("/extraction-jobs"),
        lambda c: c.get(f"/extraction-jobs/{job_id}"),
        lambda c: c.post("/extraction-jobs", json={"document_id": "fault"}),
        lambda c: c.post("/extraction-jobs/claim", json={"worker_id": "w"}),
        lambda c: c.get("/extraction-jobs/stats"),
        lambda c: c.get("/health", params={"deep": "1"}),
    ]


def concurrently(
    client: TestClient, requests: list[Request]
) -> list[tuple[float, httpx.Response]]:
    """Every request at once, each answered with how long it took."""
    answers: list[tuple[float, httpx.Response]] = []
    lock = threading.Lock()

    def one(request: Request) -> None:
        started = time.monotonic()
        response = request(client)
        with lock:
            answers.append((time.monotonic() - started, response))

    threads = [threading.Thread(target=one, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == len(requests), "a request hung"
    return sorted(answers, key=lambda answer: answer[0])


def assert_all_unavailable(answers, within_s: float, label: str) -> list[float]:
    times = [round(elapsed, 2) for elapsed, _ in answers]
    print(f"{label}: 503 after {times} s")
    for elapsed, response in answers:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
        assert elapsed <= within_s, (label, times)
    return times


def seconds_until_ok(client: TestClient, limit_s: float = 30) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if client.get("/extraction-jobs").status_code == 200:
            return time.monotonic() - started
        time.sleep(0.1)
    pytest.fail(f"no 200 within {limit_s} s of the fault's end")


@pytest.fixture
def url() -> str:
    url = postgres_url()
    empty_postgres(url)
    return url


@pytest.fixture
def app_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., TestClient]]:
    """An app whose DATABASE_URL is `url` with its port (and user) replaced."""

    def start(url: str, port: int | None = None, **env: str) -> TestClient:
        parsed = make_url(url)
        if port is not None:
            parsed = parsed.set(port=port)
        monkeypatch.setenv("DATABASE_URL", parsed.render_as_string(False))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        database.reset_engines()
        return TestClient(create_app())

    yield start
    database.reset_engines()


def warm(client: TestClient) -> str:
    """Both pooled connections (the default pool) open, and a job to ask for:
    a fault then meets connections in use, not only new ones."""
    job = client.post("/extraction-jobs", json={"document_id": "warm"}).json()
    engine = database.get_engine(settings.settings_from_env().resolved_database_url)
    with engine.connect() as first, engine.connect() as second:
        first.exec_driver_sql("SELECT 1")
        second.exec_driver_sql("SELECT 1")
    return job["id"]


def test_a_partition_answers_503_within_seconds_and_heals_by_itself(url, app_on):
    require(iptables_usable(), "a partition needs root and iptables")
    with forwarder() as relay:
        client = app_on(url, relay.port)
        job_id = warm(client)
        with partition(relay.port):
            answers = concurrently(client, _mixed(job_id))
        assert rules_left(relay.port) == "", "the partition's rules are gone"
        times = assert_all_unavailable(answers, PARTITION_503_WITHIN_S, "partition")
        # Not one after another: a request that found the connect gate shut
        # may answer a connect timeout early, never one more behind the rest.
        assert times[-1] - times[0] <= CONNECT_TIMEOUT_S + SPREAD_S, times
        healed = seconds_until_ok(client)
    print(f"partition: 200 again {healed:.2f} s after it healed")
    assert healed <= RECOVERED_WITHIN_S


def test_a_server_that_falls_silent_is_cut_off_at_the_deadline(url, app_on, caplog):
    """It keeps acknowledging, so TCP sees nothing wrong: only the statement
    deadline ends the wait. The connections it cut are discarded, and the
    next ones, once the server answers again, work."""
    caplog.set_level(logging.ERROR, logger="database")
    with forwarder() as relay:
        client = app_on(url, relay.port)
        job_id = warm(client)
        relay.silence()
        answers = concurrently(client, _mixed(job_id))
        relay.resume()
        assert_all_unavailable(answers, SILENT_503_WITHIN_S, "silent server")
        healed = seconds_until_ok(client)
        print(f"silent server: 200 again {healed:.2f} s after it answered again")
        assert healed <= RECOVERED_WITHIN_S
        for _ in range(5):  # no connection that was cut is left in the pool
            created = client.post("/extraction-jobs", json={"document_id": "after"})
            assert created.status_code == 201, created.text
    assert "database connection shut down: no answer within 11 s" in caplog.text


def test_concurrent_requests_to_a_tarpit_are_answered_side_by_side(url, app_on):
    """A database that accepts and never answers, before the app ever reached
    it: the schema check is the first thing each request waits for."""
    with tarpit() as port:
        client = app_on(url, port)
        answers = concurrently(client, _mixed(str(uuid.uuid4())))
    times = assert_all_unavailable(answers, TARPIT_503_WITHIN_S, "tarpit")
    assert times[-1] - times[0] <= SPREAD_S, "one after another"
    health = [r for _, r in answers if r.request.url.path == "/health"]
    assert health[0].json() == {"status": "unavailable", "database": "unavailable"}


@pytest.fixture
def limited_role(url: str) -> Iterator[str]:
    """The app's role, as the migration makes it, allowed two connections."""
    role = f"{make_url(url).database}_limited"
    with app_role(url, role, connection_limit=2):
        yield make_url(url).set(username=role).render_as_string(False)


def test_a_role_out_of_connections_gets_503_never_500_and_loses_nothing(
    url, limited_role, app_on
):
    client = app_on(limited_role, DB_POOL_SIZE="6")
    keys = [f"limit-{n}" for n in range(16)]

    def create(key: str) -> Request:
        return lambda c: c.post(
            "/extraction-jobs",
            json={"document_id": key},
            headers={"Idempotency-Key": key},
        )

    answers = concurrently(client, [create(key) for key in keys])
    statuses = [response.status_code for _, response in answers]
    print(f"connection limit 2, 16 creates at once: {sorted(statuses)}")
    assert set(statuses) <= {201, 503}, statuses
    assert 503 in statuses, "the limit never bit: the test proves nothing"
    assert 201 in statuses
    acknowledged = {
        response.json()["id"] for _, response in answers if response.status_code == 201
    }
    assert all(r.headers["retry-after"] for _, r in answers if r.status_code == 503)
    # Retried one at a time, the refused ones go through on the pool's two.
    for key in keys:
        retried = create(key)(client)
        assert retried.status_code in (200, 201), retried.text
    stored = create_engine(url, poolclass=NullPool)
    with stored.connect() as connection:
        ids = {
            str(row[0])
            for row in connection.execute(text("SELECT id FROM extraction_job"))
        }
    stored.dispose()
    assert acknowledged <= ids
    assert len(ids) == len(keys)
