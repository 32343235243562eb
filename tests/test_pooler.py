"""`DB_POOLER=1`: the app behind a transaction-mode pooler (RDS Proxy,
PgBouncer), which hands each transaction whatever server connection is free.

Debian's PgBouncer in transaction mode, with fewer server connections than
the app processes' pools hold, carries mixed work from several app processes:
no 5xx, every acknowledged create stored, no job claimed twice, every cursor
walk in creation order without a gap. The same app without `DB_POOLER=1` is
refused by it (its startup options), which is why the setting exists.

Directly against PostgreSQL, with the server's statement log: one round trip
per request, and never a PREPARE, an EXECUTE or a SET; timestamps in UTC
whatever the session's time zone.
"""

import re
import threading
from collections.abc import Iterator

import httpx
import pytest
from conftest import empty_postgres, postgres_url, require
from fastapi.testclient import TestClient
from faults import PgBouncer, Uvicorn, app_role, tool
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool
from test_round_trips import counted, statement_log  # noqa: F401 (fixtures)

import database
from main import create_app

SERVER_CONNECTIONS = 4
APPS = 3
POOL_PER_APP = 3  # 9 client connections for 4 server connections
CREATORS, CREATES_EACH = 6, 15
CLAIMERS = 4
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
CURSOR_SECRET = "pooler-test-cursor-secret-of-32-characters"


@pytest.fixture
def url() -> str:
    url = postgres_url()
    empty_postgres(url)
    return url


@pytest.fixture
def pooled_role(url: str) -> Iterator[str]:
    """The app's role as the migration makes it (its defaults included)."""
    with app_role(url, f"{make_url(url).database}_pooled") as role:
        yield role


@pytest.fixture
def bouncer(url: str, pooled_role: str) -> Iterator[PgBouncer]:
    require(tool("pgbouncer") is not None, "pgbouncer is not installed")
    name = make_url(url).database
    pgbouncer = PgBouncer(
        name, alias=f"{name}_pool", pool_size=SERVER_CONNECTIONS, user=pooled_role
    ).start()
    yield pgbouncer
    pgbouncer.stop()


def _next_page(response: httpx.Response) -> str | None:
    link = response.headers.get("link")
    return link[1 : link.index(">")] if link else None


class Work:
    """Mixed work on several apps at once, and what each kind saw."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.lock = threading.Lock()
        self.statuses: list[int] = []
        self.created: dict[str, str] = {}  # idempotency key -> job id
        self.claimed: list[str] = []
        self.walks: list[list[str]] = []
        self.creating = True

    def _client(self, number: int) -> httpx.Client:
        return httpx.Client(base_url=self.urls[number % len(self.urls)], timeout=60)

    def _saw(self, response: httpx.Response) -> httpx.Response:
        with self.lock:
            self.statuses.append(response.status_code)
        return response

    def create(self, number: int) -> None:
        with self._client(number) as client:
            for n in range(CREATES_EACH):
                key = f"pool-{number}-{n}"
                response = self._saw(
                    client.post(
                        "/extraction-jobs",
                        json={"document_id": key, "priority": n % 3},
                        headers={"Idempotency-Key": key},
                    )
                )
                if response.status_code == 201:
                    with self.lock:
                        self.created[key] = response.json()["id"]
                if n % 5 == 0:  # a replay answers the same job
                    again = self._saw(
                        client.post(
                            "/extraction-jobs",
                            json={"document_id": key, "priority": n % 3},
                            headers={"Idempotency-Key": key},
                        )
                    )
                    assert again.json()["id"] == response.json()["id"]

    def claim(self, number: int) -> None:
        worker = f"worker-{number}"
        with self._client(number) as client:
            while True:
                creating = self.creating
                jobs = self._saw(
                    client.post(
                        "/extraction-jobs/claim",
                        json={"worker_id": worker, "limit": 2, "lease_seconds": 600},
                    )
                ).json()
                if not jobs and not creating:
                    return
                for job in jobs:
                    with self.lock:
                        self.claimed.append(job["id"])
                    self._saw(
                        client.patch(
                            f"/extraction-jobs/{job['id']}",
                            json={"status": "completed", "worker_id": worker},
                        )
                    )

    def walk(self, number: int) -> None:
        with self._client(number) as client:
            while self.creating:
                seen: list[str] = []
                page: str | None = "/extraction-jobs?limit=7"
                while page:
                    response = self._saw(client.get(page))
                    seen += [job["id"] for job in response.json()]
                    page = _next_page(response)
                with self.lock:
                    self.walks.append(seen)

    def run(self) -> None:
        workers = [
            *(threading.Thread(target=self.create, args=(n,)) for n in range(CREATORS)),
            *(threading.Thread(target=self.claim, args=(n,)) for n in range(CLAIMERS)),
            *(threading.Thread(target=self.walk, args=(n,)) for n in range(2)),
        ]
        for worker in workers:
            worker.start()
        for creator in workers[:CREATORS]:
            creator.join(timeout=120)
        self.creating = False
        for worker in workers[CREATORS:]:
            worker.join(timeout=120)
        assert not any(worker.is_alive() for worker in workers), "a worker hung"


def test_several_apps_through_pgbouncer_keep_every_guarantee(
    url, pooled_role, bouncer, tmp_path
):
    apps = Uvicorn(
        APPS,
        {
            "DATABASE_URL": bouncer.url(pooled_role),
            "DB_POOLER": "1",
            "DB_POOL_SIZE": str(POOL_PER_APP),
            "CURSOR_SECRET": CURSOR_SECRET,
        },
        tmp_path,
    ).start()
    try:
        work = Work(apps.urls)
        work.run()
    finally:
        apps.stop()
    logs = "\n".join(apps.log(port) for port in apps.ports)
    print(
        f"through PgBouncer: {len(work.statuses)} requests, "
        f"{len(work.claimed)} claims, {len(work.walks)} cursor walks"
    )

    assert work.statuses, "nothing ran"
    assert all(status < 500 for status in work.statuses), (
        sorted(set(work.statuses)),
        logs[-3000:],
    )
    assert len(work.created) == CREATORS * CREATES_EACH

    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        in_order = [
            str(row[0])
            for row in connection.execute(
                text("SELECT id FROM extraction_job ORDER BY seq")
            )
        ]
        # Nine client connections, at most four server connections.
        server_connections = connection.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE usename = :role"),
            {"role": pooled_role},
        ).scalar()
        claimed_events = connection.execute(
            text(
                "SELECT count(*), count(DISTINCT job_id) FROM extraction_job_event "
                "WHERE type = 'claimed'"
            )
        ).one()
    engine.dispose()
    assert 0 < server_connections <= SERVER_CONNECTIONS
    # Every acknowledged create is stored, once.
    assert sorted(in_order) == sorted(work.created.values())
    # No job claimed twice, by two workers or one; all of them claimed.
    assert len(work.claimed) == len(set(work.claimed)) == len(in_order)
    assert tuple(claimed_events) == (len(in_order), len(in_order))
    # Each walk is in creation order, and never passed a job that committed
    # later with a smaller place (creates take their place in line in the
    # statement that commits them: a transaction-scoped lock).
    position = {job_id: n for n, job_id in enumerate(in_order)}
    assert work.walks, "no walk finished"
    for walk in work.walks:
        places = [position[job_id] for job_id in walk]
        assert places == sorted(set(places)), "out of order or repeated"
        if places:
            assert places == list(range(places[-1] + 1)), "a job was passed"


def test_without_db_pooler_the_app_is_refused_by_pgbouncer(
    pooled_role, bouncer, monkeypatch
):
    """Its startup options (statement timeout, time zone, plan mode) are
    session state a transaction-mode pooler cannot carry: PgBouncer refuses
    them, RDS Proxy would pin every session."""
    monkeypatch.setenv("DATABASE_URL", bouncer.url(pooled_role))
    monkeypatch.delenv("DB_POOLER", raising=False)
    database.reset_engines()
    refused = TestClient(create_app()).get("/health", params={"deep": "1"})
    assert refused.status_code == 503
    assert "unsupported startup parameter: options" in bouncer.log()
    monkeypatch.setenv("DB_POOLER", "1")
    database.reset_engines()
    assert TestClient(create_app()).get("/health", params={"deep": "1"}).json() == {
        "status": "ok",
        "database": "ok",
    }


SESSION_STATE = re.compile(r"^\s*(PREPARE|EXECUTE|DEALLOCATE|SET|RESET|DISCARD)\b")


def test_every_request_is_one_round_trip_and_keeps_no_session_state(counted):  # noqa: F811
    client, count = counted(DB_POOLER="1")
    created, sent = count(
        lambda: client.post("/extraction-jobs", json={"document_id": "pooled"})
    )
    job = created.json()
    requests = [
        lambda: client.post("/extraction-jobs", json={"document_id": "pooled"}),
        lambda: client.get(f"/extraction-jobs/{job['id']}"),
        lambda: client.get("/extraction-jobs", params={"limit": 5}),
        lambda: client.post("/extraction-jobs/claim", json={"worker_id": "w"}),
        lambda: client.post(
            f"/extraction-jobs/{job['id']}/heartbeat", json={"worker_id": "w"}
        ),
        lambda: client.patch(
            f"/extraction-jobs/{job['id']}",
            json={"status": "completed", "worker_id": "w"},
        ),
        lambda: client.get(f"/extraction-jobs/{job['id']}/events"),
        lambda: client.get("/extraction-jobs/stats"),
    ]
    every = [sent]
    for request in requests:
        response, sent = count(request)
        assert response.status_code < 400, response.text
        every.append(sent)
    for sent in every:
        assert len(sent) == 1, sent
        assert not SESSION_STATE.match(sent[0]), sent
    # The create's place in line is the create clock's row lock, taken in its
    # statement and held to its commit: transaction-scoped, nothing left in
    # the session for the pooler's next client.
    assert "UPDATE extraction_job_create_clock" in every[0][0], every[0]
    assert not any("pg_advisory_lock" in sent[0] for sent in every), every


@pytest.mark.parametrize("pooler", ["1", "0"])
def test_timestamps_are_utc_whatever_the_sessions_time_zone(url, monkeypatch, pooler):
    """Behind a pooler the session's zone is the role's default (here, as
    PGTZ makes it, +05:30); directly, the app keeps its sessions in UTC."""
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")  # libpq sends it at connect
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("DB_POOLER", pooler)
    database.reset_engines()
    client = TestClient(create_app())
    zone = database.run(url, lambda c: c.exec_driver_sql("SHOW TimeZone").scalar())
    assert zone == ("Asia/Kolkata" if pooler == "1" else "UTC")
    created = client.post("/extraction-jobs", json={"document_id": "tz"}).json()
    [claimed] = client.post("/extraction-jobs/claim", json={"worker_id": "w"}).json()
    fetched = client.get(f"/extraction-jobs/{created['id']}").json()
    for field in ("created_at", "updated_at", "run_at"):
        assert ISO_UTC.match(created[field]), created[field]
    assert (fetched["created_at"], fetched["run_at"]) == (
        created["created_at"],
        created["run_at"],
    )
    for field in ("started_at", "lease_expires_at", "updated_at"):
        assert ISO_UTC.match(claimed[field]), claimed[field]
    database.reset_engines()
