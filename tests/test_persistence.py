"""What only an in-process run can check: the database under the API.

Restarts, concurrency, outages, index use, and the engine configuration,
on SQLite and on PostgreSQL.
"""

import logging
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import ROOT, backend_url, postgres_url
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from sqlalchemy.dialects import postgresql

import database
import drivers
import repository
import settings
from db_models import metadata
from main import create_app
from models import JobFilter, JobStatus, ListOrder

CLOSED_PORT_URL = "postgresql://postgres@127.0.0.1:1/test"


def bound_list(document_id, status, order=ListOrder.ASC):
    """The list statement with its values bound, as the repository runs it."""
    selection = JobFilter(document_id=document_id, status=status)
    statement, params = repository.list_query(selection, order, 10, 0)
    return statement.params(**params)


def test_jobs_survive_a_restart(make_client):
    first = make_client()
    job = first.post("/extraction-jobs", json={"document_id": "keep-me"}).json()
    first.patch(f"/extraction-jobs/{job['id']}", json={"status": "processing"})
    database.reset_engines()  # drop every pooled connection, as a new process would
    second = make_client()
    stored = second.get(f"/extraction-jobs/{job['id']}").json()
    assert stored["status"] == "processing"
    assert stored["created_at"] == job["created_at"]


def test_concurrent_creates_are_all_kept_and_distinct(client):
    def create(n):
        response = client.post("/extraction-jobs", json={"document_id": f"doc-{n}"})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = list(pool.map(create, range(160)))
    assert len(set(ids)) == 160
    listed = client.get("/extraction-jobs", params={"limit": 1000}).json()
    assert sorted(job["id"] for job in listed) == sorted(ids)


def test_creation_order_is_stable_within_one_microsecond(client):
    instant = datetime(2026, 11, 27, 4, 11, 59, 123456, tzinfo=UTC)
    client.app.state.service.clock = lambda: instant
    ids = [
        client.post("/extraction-jobs", json={"document_id": "same-time"}).json()["id"]
        for _ in range(20)
    ]
    for _ in range(3):
        listed = client.get("/extraction-jobs", params={"document_id": "same-time"})
        assert [job["id"] for job in listed.json()] == ids
    assert {job["created_at"] for job in listed.json()} == {
        "2026-11-27T04:11:59.123456+00:00"
    }


def test_timestamps_come_back_timezone_aware_utc(client):
    job_id = client.post("/extraction-jobs", json={"document_id": "tz"}).json()["id"]
    stored = client.app.state.service.repository.get(uuid.UUID(job_id))
    assert stored.created_at.tzinfo is not None
    assert stored.created_at.utcoffset().total_seconds() == 0


def test_in_memory_sqlite_keeps_jobs_across_requests(monkeypatch):
    monkeypatch.setenv("DB_PATH", ":memory:")
    client = TestClient(create_app())
    job = client.post("/extraction-jobs", json={"document_id": "mem"}).json()
    assert client.get(f"/extraction-jobs/{job['id']}").status_code == 200
    assert len(client.get("/extraction-jobs").json()) == 1


def test_default_database_is_a_sqlite_file_named_by_db_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert database.database_url_from_env() == "sqlite:///extraction_jobs.db"
    monkeypatch.setenv("DB_PATH", str(tmp_path / "x.db"))
    assert database.database_url_from_env() == f"sqlite:///{tmp_path / 'x.db'}"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@h:5432/db", "postgresql+psycopg2://u:p@h:5432/db"),
        (
            "postgresql://u:p@h/db?sslmode=require",
            "postgresql+psycopg2://u:p@h/db?sslmode=require",
        ),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_database_url_names_the_psycopg2_driver(given, expected):
    assert database.normalize_url(given) == expected


@pytest.mark.parametrize(
    "bad", ["mysql://u@h/db", "no-scheme", "postgresql+psycopg://u@h/db"]
)
def test_unsupported_database_url_refuses_to_start(monkeypatch, bad):
    monkeypatch.setenv("DATABASE_URL", bad)
    with pytest.raises(settings.ConfigError):
        create_app()


def test_postgres_engine_is_sized_for_lambda_and_overridable(monkeypatch):
    url = database.normalize_url("postgresql://postgres@127.0.0.1:5432/pool-test")
    database.reset_engines()
    engine = database.get_engine(url)
    assert (engine.pool.size(), engine.pool._max_overflow) == (2, 0)
    assert not engine.pool._pre_ping  # checked only after idling: test_round_trips.py
    monkeypatch.setenv("DB_POOL_SIZE", "8")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "4")
    database.reset_engines()
    engine = database.get_engine(url)
    assert (engine.pool.size(), engine.pool._max_overflow) == (8, 4)
    database.reset_engines()


def test_sqlite_file_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    with database.get_engine(url).connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000


def test_tables_are_created_lazily_not_at_import_or_app_creation(tmp_path, monkeypatch):
    path = tmp_path / "lazy.db"
    monkeypatch.setenv("DB_PATH", str(path))
    client = TestClient(create_app())
    assert not path.exists()
    assert client.get("/health?deep=1").status_code == 200
    client.post("/extraction-jobs", json={"document_id": "x"})
    assert (
        "extraction_job"
        in inspect(database.get_engine(f"sqlite:///{path}")).get_table_names()
    )


def test_table_creation_is_safe_from_many_threads_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DB_PATH", str(tmp_path / "race.db"))
    client = TestClient(create_app())
    barrier = threading.Barrier(8)

    def first_request(_):
        barrier.wait()
        return client.post("/extraction-jobs", json={"document_id": "race"}).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(first_request, range(8))) == {201}


def test_make_migrate_command_creates_the_table(database_url):
    """`make migrate` is `alembic upgrade head` on DATABASE_URL."""
    if database_url.startswith("postgresql"):
        engine = database.get_engine(database_url)
        metadata.drop_all(engine)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE alembic_version"))
        database.reset_engines()
    result = subprocess.run(
        [str(Path(sys.executable).with_name("alembic")), "upgrade", "head"],
        check=False,
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    engine = database.get_engine(database_url)
    assert "extraction_job" in inspect(engine).get_table_names()


# --- outages --------------------------------------------------------------


def unreachable_client(monkeypatch, url):
    monkeypatch.setenv("DATABASE_URL", url)
    return TestClient(create_app())


@pytest.mark.parametrize(
    "url", [CLOSED_PORT_URL, "sqlite:////nonexistent-dir/for/sure/jobs.db"]
)
def test_database_down_is_503_with_retry_after(monkeypatch, caplog, url):
    client = unreachable_client(monkeypatch, url)
    caplog.set_level(logging.ERROR)
    health = client.get("/health?deep=1")
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable", "database": "unavailable"}
    assert health.headers["retry-after"]
    job_id = "00000000-0000-4000-8000-000000000000"
    for response in (
        client.post("/extraction-jobs", json={"document_id": "x"}),
        client.get("/extraction-jobs"),
        client.get(f"/extraction-jobs/{job_id}"),
        client.patch(f"/extraction-jobs/{job_id}", json={"status": "failed"}),
        client.post("/extraction-jobs/claim", json={"worker_id": "w"}),
    ):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
        assert "unavailable" in response.json()["detail"]
        assert "Traceback" not in response.text
    assert "database unavailable" in caplog.text


def test_postgres_statement_timeout_is_503(monkeypatch):
    """A query stuck behind a lock is cancelled by statement_timeout: 503, not a hang."""
    url = postgres_url()
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT_MS", "300")
    database.reset_engines()
    client = unreachable_client(monkeypatch, url)
    assert client.get("/health?deep=1").status_code == 200  # tables exist, pool is warm
    locker = psycopg2.connect(os.environ["TEST_DATABASE_URL"])
    try:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE extraction_job IN ACCESS EXCLUSIVE MODE")
            response = client.get("/extraction-jobs")
        assert response.status_code == 503
        assert response.headers["retry-after"]
    finally:
        locker.rollback()
        locker.close()
        database.reset_engines()
    assert client.get("/extraction-jobs").status_code == 200


def test_unhandled_error_is_a_json_500_without_traceback(client, monkeypatch, caplog):
    def explode(*_args, **_kwargs):
        raise RuntimeError("boom with secret internals")

    monkeypatch.setattr(client.app.state.service, "list_jobs", explode)
    quiet = TestClient(client.app, raise_server_exceptions=False)
    response = quiet.get("/extraction-jobs")
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal Server Error"}
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == ["unhandled exception"]
    assert not errors[0].exc_info


# --- indexes --------------------------------------------------------------

LIST_SHAPES = [
    ("doc", None),
    (None, JobStatus.FAILED),
    ("doc", JobStatus.FAILED),
    (None, None),
]


def _sql(statement, engine):
    return str(statement.compile(engine, compile_kwargs={"literal_binds": True}))


@pytest.mark.parametrize("order", ListOrder)
@pytest.mark.parametrize(("document_id", "status"), LIST_SHAPES)
def test_sqlite_list_queries_use_an_index(tmp_path, document_id, status, order):
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    database.ensure_schema(url)
    engine = database.get_engine(url)
    sql = _sql(bound_list(document_id, status, order), engine)
    with engine.connect() as connection:
        plan = " ".join(
            row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
        )
    if document_id or status:
        assert "USING" in plan and "INDEX" in plan, plan
    else:
        # seq is the rowid: reading it in order stops after LIMIT rows
        assert plan == "SCAN extraction_job", plan
    assert "TEMP B-TREE" not in plan, plan  # creation order comes from the index


def _postgres_plan(url, statement, params=None, setting="enable_seqscan = off"):
    """The plan of `statement` under `setting`: with its values written in,
    or with `params` sent as psycopg2 sends them (typed, e.g.
    '...'::timestamptz), which a statement whose values meet in a UNION needs."""
    engine = database.get_engine(url)
    if params is None:
        sql = str(
            statement.compile(
                dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
            )
        )
        values = {}
    else:
        compiled = statement.compile(dialect=engine.dialect)
        sql, values = compiled.string, compiled.construct_params(params)
    with engine.connect() as connection:
        connection.execute(text(f"SET {setting}"))
        rows = connection.exec_driver_sql(f"EXPLAIN {sql}", values).all()
        connection.rollback()
    return "\n".join(row[0] for row in rows)


@pytest.mark.parametrize("order", ListOrder)
@pytest.mark.parametrize(("document_id", "status"), LIST_SHAPES)
def test_postgres_list_queries_use_an_index(document_id, status, order):
    url = postgres_url()
    database.upgrade_schema(url)
    plan = _postgres_plan(url, bound_list(document_id, status, order))
    assert "Seq Scan" not in plan, plan
    assert "Index" in plan, plan


def _claim(limit: int) -> tuple[Any, dict]:
    """The claim statement as repository.claim sends it (no outbox: no
    event bus), and its values for a claim of `limit` jobs now."""
    now = datetime.now(UTC)
    params = {
        "worker": "w",
        "limit": limit,
        "moment": now,
        "lease_until": now,
        "actor": None,
        "reason": repository.LAPSED_ON_CANCEL,
    }
    return drivers._pg_changes(repository.CLAIM_CHANGES, None), params


def test_postgres_claim_uses_the_partial_pending_index():
    url = postgres_url()
    database.upgrade_schema(url)
    plan = _postgres_plan(url, *_claim(5))
    assert "ix_extraction_job_pending_claim" in plan, plan
    assert "ix_extraction_job_lease" in plan, plan  # the sweep in the same statement
    assert "LockRows" in plan, plan


def test_postgres_claim_reads_the_claim_index_after_a_burst_of_jobs():
    """Statistics that lag a burst of new jobs must not move the claim off
    its index: with 30,000 pending jobs ANALYZE has not seen, the claim
    still reads the claim index in order (not every pending job through
    /stats' run_at index, then a sort: 38 ms a claim against 0.3 ms)."""
    url = backend_url("postgresql", None)
    with database.get_engine(url).begin() as connection:
        connection.execute(text("ANALYZE extraction_job"))  # it saw none
        # The burst outlasts the app's statement timeout on a loaded machine.
        connection.execute(text("SET LOCAL statement_timeout = 0"))
        connection.execute(
            text(
                "INSERT INTO extraction_job (id, document_id, status, priority, "
                "created_at, updated_at, run_at, attempts, version) "
                "SELECT gen_random_uuid(), 'burst-' || n, 'pending', n % 11, now(), "
                "now(), now(), 0, 1 FROM generate_series(1, 30000) AS n"
            )
        )
    # As the app's connections plan it: one generic plan.
    plan = _postgres_plan(
        url, *_claim(1), setting="plan_cache_mode = force_generic_plan"
    )
    assert "ix_extraction_job_pending_claim" in plan, plan
    assert "ix_extraction_job_status_run_at" not in plan, plan


def test_absent_metadata_is_sql_null_not_json_null(client, database_url):
    client.post("/extraction-jobs", json={"document_id": "no-meta"})
    client.post("/extraction-jobs", json={"document_id": "null-meta", "metadata": None})
    with database.get_engine(database_url).connect() as connection:
        nulls = connection.execute(
            text("SELECT count(*) FROM extraction_job WHERE metadata IS NULL")
        ).scalar()
    assert nulls == 2


def test_one_character_document_id_is_accepted(client):
    """The lower bound; in-process only, as it cannot carry the contract-test prefix."""
    response = client.post("/extraction-jobs", json={"document_id": "x"})
    assert response.status_code == 201
    assert response.json()["document_id"] == "x"
