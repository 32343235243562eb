"""Revision 0002 on a release-1 database with rows in it: existing jobs get
max_attempts 3, run_at = created_at, and a processing job a lease."""

from datetime import datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool
from test_migrations import (  # noqa: F401
    LEGACY_JOB_ID,
    alembic_command,
    assert_models_schema,
    build_release_1_schema,
    revision,
    scratch_postgres,
)

import database
from main import create_app

PROCESSING_JOB_ID = "5f0e8c1a-2b3d-4e5f-8a9b-0c1d2e3f4a5b"


@pytest.fixture(params=["sqlite", "postgresql"])
def release_1_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'release1.db'}"
    else:
        url = request.getfixturevalue("scratch_postgres")
    build_release_1_schema(url)
    engine = create_engine(url, poolclass=NullPool)
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO extraction_job (id, document_id, status, priority, "
                "created_at, updated_at, attempts, worker_id, started_at, version) "
                "VALUES (:id, 'busy.pdf', 'processing', 0, :created, :updated, 1, "
                "'old-worker', :updated, 2)"
            ),
            {
                "id": PROCESSING_JOB_ID
                if postgres
                else PROCESSING_JOB_ID.replace("-", ""),
                "created": "2026-01-01 00:00:00",
                "updated": "2026-01-01 00:10:00",
            },
        )
    engine.dispose()
    return url


def test_release_1_rows_get_sensible_lifecycle_values(release_1_url, monkeypatch):
    alembic_command(release_1_url, "upgrade", "head")
    assert revision(release_1_url) == database.SCHEMA_HEAD
    assert_models_schema(release_1_url)
    monkeypatch.setenv("DATABASE_URL", release_1_url)
    client = TestClient(create_app())
    pending = client.get(f"/extraction-jobs/{LEGACY_JOB_ID}").json()
    assert pending["max_attempts"] == 3
    assert pending["run_at"] == pending["created_at"]
    assert (pending["lease_expires_at"], pending["result"]) == (None, None)
    assert pending["updated_by"] is None
    busy = client.get(f"/extraction-jobs/{PROCESSING_JOB_ID}").json()
    lease = datetime.fromisoformat(busy["lease_expires_at"])
    assert lease - datetime.fromisoformat(busy["updated_at"]) == timedelta(seconds=300)
    # Long expired: the next claim takes both, the stranded one included.
    claimed = client.post(
        "/extraction-jobs/claim", json={"worker_id": "new", "limit": 10}
    ).json()
    assert {job["id"] for job in claimed} == {LEGACY_JOB_ID, PROCESSING_JOB_ID}
    history = client.get(f"/extraction-jobs/{PROCESSING_JOB_ID}/events").json()
    assert [event["type"] for event in history] == ["lease_expired", "claimed"]
    assert history[0]["worker_id"] == "old-worker"
    assert client.get(f"/extraction-jobs/{LEGACY_JOB_ID}/events").json()[0]["type"] == (
        "claimed"
    )


def test_downgrade_to_release_1_keeps_the_rows(release_1_url):
    alembic_command(release_1_url, "upgrade", "head")
    alembic_command(release_1_url, "downgrade", "0001_initial")
    assert revision(release_1_url) == "0001_initial"
    engine = create_engine(release_1_url, poolclass=NullPool)
    with engine.connect() as connection:
        assert (
            connection.execute(text("SELECT count(*) FROM extraction_job")).scalar()
            == 2
        )
    engine.dispose()
    alembic_command(release_1_url, "upgrade", "head")
    assert_models_schema(release_1_url)
