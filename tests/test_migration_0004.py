"""Revision 0004 (job control) on a database at 0003 with jobs in it, on
SQLite and PostgreSQL: the rows stay, the status CHECK takes `cancelled` (and
still refuses what is no status), the create clock starts at the newest
job's created_at, and a downgrade turns cancelled jobs into failed ones.
"""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool
from test_migrations import (  # noqa: F401
    alembic_command,
    assert_models_schema,
    revision,
    scratch_postgres,
)

import database
from db_models import CREATE_CLOCK, EVENTS, JOBS
from main import create_app
from tests.operator_helpers import cancel, create, ok

BEFORE = "0003_one_write_path"
# The newest job's created_at is ahead of every clock: the create clock
# must start there, so that created_at never goes back in creation order.
NEWEST = datetime(2099, 1, 1, tzinfo=UTC)
OLD = {
    "pending": datetime(2026, 1, 1, tzinfo=UTC),
    "processing": datetime(2026, 1, 2, tzinfo=UTC),
    "completed": NEWEST,
}
IDS = {status: uuid.uuid4() for status in OLD}


def row(status: str) -> dict:
    at = OLD[status]
    processing = status == "processing"
    return {
        "id": IDS[status],
        "document_id": f"{status}.pdf",
        "status": status,
        "priority": 0,
        "created_at": at,
        "updated_at": at,
        "attempts": 0 if status == "pending" else 1,
        "worker_id": None if status == "pending" else "old-worker",
        "started_at": None if status == "pending" else at,
        "finished_at": at if status == "completed" else None,
        "version": 1,
        "max_attempts": 3,
        "run_at": at,
        "lease_expires_at": at + timedelta(days=36500) if processing else None,
        "lease_owner": None,
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def at_0003(request, tmp_path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'at_0003.db'}"
    else:
        url = request.getfixturevalue("scratch_postgres")
    alembic_command(url, "upgrade", BEFORE)
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as connection:
        for status, at in OLD.items():
            connection.execute(insert(JOBS).values(row(status)))
            connection.execute(
                insert(EVENTS).values(
                    job_id=IDS[status],
                    at=at,
                    type="created",
                    to_status="pending",
                )
            )
    engine.dispose()
    return url


def stored(url: str) -> list[tuple]:
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        jobs = connection.execute(
            select(JOBS.c.id, JOBS.c.status, JOBS.c.created_at).order_by(JOBS.c.seq)
        ).all()
        events = connection.execute(select(func.count()).select_from(EVENTS)).scalar()
    engine.dispose()
    return [*map(tuple, jobs), events]


def test_upgrade_keeps_the_rows_and_makes_room_for_cancelled(at_0003, monkeypatch):
    alembic_command(at_0003, "upgrade", "head")
    assert revision(at_0003) == database.SCHEMA_HEAD
    assert_models_schema(at_0003)
    assert stored(at_0003) == [
        *((IDS[status], status, OLD[status]) for status in OLD),
        3,
    ]
    engine = create_engine(at_0003, poolclass=NullPool)
    with engine.connect() as connection:
        clock = connection.execute(select(CREATE_CLOCK.c.created_at)).scalars().all()
    assert clock == [NEWEST]

    monkeypatch.setenv("DATABASE_URL", at_0003)
    client = TestClient(create_app())
    for status in OLD:
        found = ok(client.get(f"/extraction-jobs/{IDS[status]}"))
        assert (found["status"], found["cancel_requested_at"]) == (status, None)
    assert ok(cancel(client, str(IDS["pending"])))["status"] == "cancelled"
    asked = ok(cancel(client, str(IDS["processing"])))
    assert asked["cancel_requested_at"] is not None
    newer = create(client, "after-the-upgrade.pdf")
    assert datetime.fromisoformat(newer["created_at"]) >= NEWEST
    listed = ok(client.get("/extraction-jobs", params={"order": "desc", "limit": 2}))
    assert [job["id"] for job in listed] == [newer["id"], str(IDS["completed"])]

    with engine.begin() as connection, pytest.raises(IntegrityError):
        connection.execute(
            insert(JOBS).values(
                {**row("pending"), "id": uuid.uuid4(), "status": "lost"}
            )
        )
    engine.dispose()


def test_downgrade_turns_cancelled_into_failed_and_upgrade_again(at_0003, monkeypatch):
    alembic_command(at_0003, "upgrade", "head")
    monkeypatch.setenv("DATABASE_URL", at_0003)
    ok(cancel(TestClient(create_app()), str(IDS["pending"])))
    database.reset_engines()
    alembic_command(at_0003, "downgrade", BEFORE)
    assert revision(at_0003) == BEFORE
    statuses = [status for _, status, _ in stored(at_0003)[:-1]]
    assert statuses == ["failed", "processing", "completed"]
    alembic_command(at_0003, "upgrade", "head")
    assert_models_schema(at_0003)
    assert len(stored(at_0003)) == 4
