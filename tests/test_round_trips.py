"""Round trips per request, counted by PostgreSQL itself.

Each query the server receives is one round trip (psycopg2 speaks the
simple query protocol). A database of its own, `<test database>_rt`, logs
every statement (`ALTER DATABASE … SET log_statement = 'all'`); the test reads
the server's log through the server (`pg_read_file`), from where it ended
before the request, and counts that database's statements. No client-side
hook is trusted: a BEGIN, COMMIT or pre-ping sent by any layer is counted.

A prepared statement is one round trip too: `PREPARE name AS …; EXECUTE
name(…)` the first time on a connection (one query, one log entry), then
`EXECUTE name(…)` (one entry, with the prepared SQL as its DETAIL). Each is
counted once, as the SQL that ran; a PREPARE or anything else sent on its
own is an entry, and counted, like any statement.
"""

import gc
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg2
import pytest
from conftest import ROOT, TEST_DATABASE_URL, require
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

import database
import repository
from main import create_app


@dataclass
class StatementLog:
    """The server log, read through an admin connection to another database."""

    admin: "psycopg2.extensions.connection"
    path: str
    database: str

    def end(self) -> int:
        with self.admin.cursor() as cursor:
            cursor.execute("SELECT size FROM pg_stat_file(%s)", (self.path,))
            return cursor.fetchone()[0]

    def queries_since(self, offset: int) -> list[tuple[str, str | None]]:
        """Each query this database received, as sent, with the SQL it was
        prepared with when it is an EXECUTE."""
        with self.admin.cursor() as cursor:
            cursor.execute(
                "SELECT pg_read_file(%s, %s, %s)",
                (self.path, offset, self.end() - offset),
            )
            text = cursor.fetchone()[0]
        # A message's further lines start with a tab.
        pattern = re.compile(
            rf"@{re.escape(self.database)} (LOG|DETAIL):  (.*(?:\n\t.*)*)"
        )
        queries: list[tuple[str, str | None]] = []
        for level, message in pattern.findall(text):
            message = message.replace("\n\t", "\n")
            if level == "LOG" and message.startswith("statement: "):
                queries.append((message.removeprefix("statement: "), None))
            elif level == "DETAIL" and message.startswith("prepare: ") and queries:
                queries[-1] = (queries[-1][0], message.removeprefix("prepare: "))
        return queries

    def statements_since(self, offset: int) -> list[str]:
        """The SQL of each query, one per round trip; a prepared statement
        as the SQL it was prepared with."""
        return [_ran(query, prepared) for query, prepared in self.queries_since(offset)]


_PREPARE_AND_EXECUTE = re.compile(
    r"PREPARE (\w+) (?:\(.*?\) )?AS (.*); EXECUTE \1(?:\(.*\))?", re.DOTALL
)


def _ran(query: str, prepared: str | None) -> str:
    """What ran: the statement itself, or the SQL a PREPARE gave it."""
    if prepared is None:  # a statement, or PREPARE and EXECUTE in one query
        match = _PREPARE_AND_EXECUTE.fullmatch(query)
        return match[2] if match else query
    match = _PREPARE_AND_EXECUTE.fullmatch(prepared)
    name = re.match(r"EXECUTE (\w+)", query)
    return match[2] if match and name and name[1] == match[1] else query


def _server_log_path(admin) -> str | None:
    """The file the server logs to: the collector's current file, else the
    backend's own stderr (how pg_ctlcluster and most packages start it)."""
    with admin.cursor() as cursor:
        cursor.execute("SELECT pg_current_logfile()")
        current = cursor.fetchone()[0]
        if current:
            return current
        try:
            cursor.execute("SELECT size FROM pg_stat_file('/proc/self/fd/2')")
            cursor.fetchone()
        except psycopg2.Error:
            return None
        return "/proc/self/fd/2"


@pytest.fixture(scope="module")
def statement_log() -> Iterator[tuple[str, StatementLog]]:
    require(bool(TEST_DATABASE_URL), "TEST_DATABASE_URL is not set")
    base = make_url(database.normalize_url(TEST_DATABASE_URL))
    name = f"{base.database}_rt"
    admin = psycopg2.connect(TEST_DATABASE_URL)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        superuser = cursor.fetchone()[0]
    require(superuser, "counting statements needs a superuser to read the log")
    path = _server_log_path(admin)
    require(path is not None, "the server log is not readable through the server")
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cursor.execute(f'CREATE DATABASE "{name}"')
        cursor.execute(f"ALTER DATABASE \"{name}\" SET log_statement = 'all'")
    url = base.set(database=name).render_as_string(hide_password=False)
    database.upgrade_schema(url)
    yield url, StatementLog(admin, path, name)
    database.reset_engines()
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def counted(statement_log, monkeypatch) -> Callable[..., tuple[TestClient, Callable]]:
    """A fresh app on the logged database, and `count(request)` giving the
    request's response and the statements the server received for it."""
    url, log = statement_log

    def start(**env: str) -> tuple[TestClient, Callable]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("DATABASE_URL", url)
        database.reset_engines()
        client = TestClient(create_app())
        assert client.get("/health?deep=1").status_code == 200  # tables made, pool warm

        def count(request: Callable[[], object]) -> tuple[object, list[str]]:
            offset = log.end()
            response = request()
            return response, log.statements_since(offset)

        return client, count

    yield start
    database.reset_engines()


def _job(client: TestClient, **fields) -> dict:
    response = client.post("/extraction-jobs", json={"document_id": "rt", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def test_every_request_type_is_one_round_trip(counted):
    client, count = counted()
    created, sent = count(
        lambda: client.post("/extraction-jobs", json={"document_id": "rt"})
    )
    assert created.status_code == 201
    # The create clock's tick, the INSERT and its `created` event: one
    # statement of data-modifying CTEs (drivers._pg_insert).
    assert len(sent) == 1 and sent[0].startswith("WITH clock AS"), sent
    assert "INSERT INTO extraction_job_event" in sent[0], sent
    job = created.json()

    keyed, sent = count(
        lambda: client.post(
            "/extraction-jobs",
            json={"document_id": "rt"},
            headers={"Idempotency-Key": f"key-{uuid.uuid4()}"},
        )
    )
    assert keyed.status_code == 201
    assert len(sent) == 1, sent

    fetched, sent = count(lambda: client.get(f"/extraction-jobs/{job['id']}"))
    assert fetched.json() == job
    assert len(sent) == 1 and sent[0].startswith("SELECT"), sent

    for _ in range(50):
        _job(client)
    listed, sent = count(lambda: client.get("/extraction-jobs", params={"limit": 50}))
    assert len(listed.json()) == 50
    assert len(sent) == 1, sent

    claimed, sent = count(
        lambda: client.post(
            "/extraction-jobs/claim", json={"worker_id": "w", "limit": 3}
        )
    )
    assert len(claimed.json()) == 3
    assert len(sent) == 1, sent

    health, sent = count(lambda: client.get("/health?deep=1"))
    assert health.status_code == 200
    assert sent == ["SELECT 1"]

    missing, sent = count(lambda: client.get(f"/extraction-jobs/{uuid.uuid4()}"))
    assert missing.status_code == 404
    assert len(sent) == 1, sent


def test_a_patch_is_one_round_trip_refused_or_not(counted):
    client, count = counted()
    job = _job(client)
    url = f"/extraction-jobs/{job['id']}"

    moved, sent = count(lambda: client.patch(url, json={"status": "processing"}))
    assert (moved.status_code, moved.json()["attempts"]) == (200, 1)
    # The conditional UPDATE, its event and the job as it stood: one statement.
    assert len(sent) == 1 and sent[0].startswith("WITH picked_0 AS"), sent

    for body, status in [
        ({"status": "processing", "worker_id": "another"}, 409),  # not the holder
        ({"status": "completed", "worker_id": "another"}, 409),
    ]:
        refused, sent = count(lambda body=body: client.patch(url, json=body))
        assert refused.status_code == status, refused.text
        assert len(sent) == 1, sent

    message, sent = count(
        lambda: client.patch(url, json={"status": "processing", "error_message": "x"})
    )
    assert message.json()["error_message"] == "x"
    assert len(sent) == 1, sent

    matched, sent = count(
        lambda: client.patch(
            url,
            json={"status": "completed"},
            headers={"If-Match": message.headers["etag"]},
        )
    )
    assert matched.status_code == 200, matched.text
    assert len(sent) == 1, sent

    # A refusal is explained from the job as the same statement saw it.
    for body, headers, status in [
        ({"status": "pending"}, {}, 409),  # completed is final
        ({"status": "failed"}, {"If-Match": '"1"'}, 409),  # final, whatever If-Match
        ({"status": "completed"}, {}, 200),  # the finishing request repeated
        ({"status": "completed"}, {"If-Match": '"1"'}, 200),
    ]:
        response, sent = count(
            lambda body=body, headers=headers: client.patch(
                url, json=body, headers=headers
            )
        )
        assert response.status_code == status, response.text
        assert len(sent) == 1, sent

    other = _job(client)
    stale, sent = count(
        lambda: client.patch(
            f"/extraction-jobs/{other['id']}",
            json={"status": "failed"},
            headers={"If-Match": '"7"'},
        )
    )
    assert stale.status_code == 412, stale.text
    assert len(sent) == 1, sent

    missing, sent = count(
        lambda: client.patch(
            f"/extraction-jobs/{uuid.uuid4()}", json={"status": "failed"}
        )
    )
    assert missing.status_code == 404
    assert len(sent) == 1, sent


def test_a_refused_heartbeat_is_one_round_trip(counted):
    client, count = counted()
    job = _job(client)
    url = f"/extraction-jobs/{job['id']}/heartbeat"
    beat = lambda worker: client.post(url, json={"worker_id": worker})
    for worker, status in (("w", 409), ("w", 200), ("other", 409)):
        if status == 200:  # now held by w
            taken = {"status": "processing", "worker_id": "w"}
            client.patch(f"/extraction-jobs/{job['id']}", json=taken)
        response, sent = count(lambda worker=worker: beat(worker))
        assert response.status_code == status, response.text
        assert len(sent) == 1, sent
    missing, sent = count(
        lambda: client.post(
            f"/extraction-jobs/{uuid.uuid4()}/heartbeat", json={"worker_id": "w"}
        )
    )
    assert missing.status_code == 404
    assert len(sent) == 1, sent


def test_replaying_an_idempotent_create_reads_the_earlier_job(counted):
    client, count = counted()
    headers = {"Idempotency-Key": "replayed"}
    first = client.post("/extraction-jobs", json={"document_id": "rt"}, headers=headers)
    again, sent = count(
        lambda: client.post(
            "/extraction-jobs", json={"document_id": "rt"}, headers=headers
        )
    )
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert len(sent) == 2, sent


def test_pooled_connection_is_pinged_only_after_idling(counted):
    client, count = counted()  # default: 30 s idle
    job = _job(client)
    _, sent = count(lambda: client.get(f"/extraction-jobs/{job['id']}"))
    assert "SELECT 1" not in sent

    client, count = counted(DB_PING_AFTER_IDLE_S="0")
    _, sent = count(lambda: client.get(f"/extraction-jobs/{job['id']}"))
    assert sent[0] == "SELECT 1" and len(sent) == 2, sent


def test_fresh_connection_is_never_pinged(statement_log, monkeypatch):
    url, log = statement_log
    monkeypatch.setenv("DB_PING_AFTER_IDLE_S", "0")
    database.reset_engines()  # a pool with no connection in it yet
    database._database(url).schema_ready = True  # so nothing else connects first

    def select_2() -> None:
        database.run(url, lambda connection: connection.exec_driver_sql("SELECT 2"))

    offset = log.end()
    select_2()
    sent = log.statements_since(offset)
    assert sent[-1] == "SELECT 2" and "SELECT 1" not in sent, sent
    offset = log.end()
    select_2()  # now pooled, and idle for longer than 0 s
    assert log.statements_since(offset) == ["SELECT 1", "SELECT 2"]
    database.reset_engines()


def _terminate_app_connections(log: StatementLog) -> int:
    with log.admin.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (log.database,),
        )
        return cursor.fetchone()[0]


@pytest.mark.parametrize("ping_after_idle_s", ["30", "0"])
def test_a_dead_pooled_connection_is_replaced_and_the_request_succeeds(
    counted, statement_log, ping_after_idle_s
):
    """As after a database restart or failover, or a SnapStart restore:
    found dead by the idle check (0 s) or by the statement itself (30 s)."""
    _, log = statement_log
    client, _ = counted(DB_PING_AFTER_IDLE_S=ping_after_idle_s)
    job = _job(client)
    assert _terminate_app_connections(log) >= 1
    for request in (
        lambda: client.get(f"/extraction-jobs/{job['id']}"),
        lambda: client.post("/extraction-jobs", json={"document_id": "after"}),
        lambda: client.get("/health?deep=1"),
    ):
        assert request().status_code in (200, 201)
    assert _terminate_app_connections(log) >= 1
    moved = client.patch(f"/extraction-jobs/{job['id']}", json={"status": "failed"})
    assert moved.status_code == 200, moved.text


def test_dropping_pooled_connections_after_a_restore_talks_to_no_one(counted):
    client, count = counted()
    _, sent = count(database.drop_pooled_connections)
    assert sent == []
    assert client.get("/extraction-jobs").status_code == 200
    # What was dropped is garbage in a reference cycle: here its socket is
    # alive (after a real restore it is dead), so its session stays open
    # until a collection closes it, and a later test would count it.
    gc.collect()


def test_a_multi_statement_write_keeps_one_transaction(counted, statement_log):
    url, _ = statement_log
    _, count = counted()

    def two_statements() -> None:
        with database.transaction(url) as connection:
            connection.exec_driver_sql("SELECT 1")
            connection.exec_driver_sql("SELECT 2")

    _, sent = count(two_statements)
    assert sent == ["BEGIN", "SELECT 1", "SELECT 2", "COMMIT"]


RESTORE_HOOK_CHECK = """
import database, snapshot_restore_py
assert snapshot_restore_py.after_restore == {expected}, snapshot_restore_py.after_restore
"""


@pytest.mark.parametrize("initialization", ["snap-start", "on-demand"])
def test_under_snapstart_restored_pools_are_dropped_by_the_runtime_hook(
    tmp_path, initialization
):
    """Lambda's runtime ships `snapshot_restore_py`; this machine has none, so
    a stand-in records what database.py registers when imported."""
    (tmp_path / "snapshot_restore_py.py").write_text(
        "after_restore = []\n"
        "def register_after_restore(func, *args, **kwargs):\n"
        "    after_restore.append(func)\n"
    )
    expected = "[]"
    if initialization == "snap-start":
        expected = "[database.drop_pooled_connections]"
    result = subprocess.run(
        [sys.executable, "-c", RESTORE_HOOK_CHECK.format(expected=expected)],
        check=False,
        env={
            **os.environ,
            "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
            "AWS_LAMBDA_INITIALIZATION_TYPE": initialization,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_lease_history_stats_and_cursor_requests_are_one_round_trip_each(counted):
    client, count = counted()
    for _ in range(3):
        _job(client)
    claimed, sent = count(
        lambda: client.post(
            "/extraction-jobs/claim", json={"worker_id": "w", "lease_seconds": 60}
        )
    )
    [job] = claimed.json()
    assert len(sent) == 1, sent  # sweep, claim and events in one statement
    for request in (
        lambda: client.post(
            f"/extraction-jobs/{job['id']}/heartbeat", json={"worker_id": "w"}
        ),
        lambda: client.post(
            f"/extraction-jobs/{job['id']}/heartbeat", json={"worker_id": "other"}
        ),
        lambda: client.get(f"/extraction-jobs/{job['id']}/events"),
        lambda: client.get("/extraction-jobs/stats"),
    ):
        response, sent = count(request)
        assert response.status_code in (200, 409), response.text
        assert len(sent) == 1, sent
    first = client.get("/extraction-jobs", params={"limit": 1})
    page, sent = count(lambda: client.get(first.headers["Link"][1:].split(">")[0]))
    assert page.status_code == 200 and len(page.json()) == 1
    assert len(sent) == 1, sent


def _one_connection(counted, **env: str) -> tuple[TestClient, Callable]:
    """An app whose pool holds one connection, so every request shares it."""
    return counted(DB_POOL_SIZE="1", DB_MAX_OVERFLOW="0", **env)


def _on_the_app_connection(url: str, sql: str) -> list[tuple]:
    def rows(connection) -> list[tuple]:
        result = connection.exec_driver_sql(sql)
        return result.all() if result.returns_rows else []

    return database.run(url, rows)


def test_a_statement_is_prepared_once_per_connection_then_only_executed(
    counted, statement_log
):
    url, log = statement_log
    # With a key of its own, no list page also reads the stored one.
    client, _ = _one_connection(counted, CURSOR_SECRET="k" * 32)

    def requests() -> None:
        """A create, then one of each hot request on what it made or claimed."""
        job = _job(client)
        assert client.get(f"/extraction-jobs/{job['id']}").status_code == 200
        assert client.get("/extraction-jobs", params={"limit": 5}).status_code == 200
        claim = client.post("/extraction-jobs/claim", json={"worker_id": "w"})
        url = f"/extraction-jobs/{claim.json()[0]['id']}"
        beat = client.post(f"{url}/heartbeat", json={"worker_id": "w"})
        assert beat.status_code == 200, beat.text
        done = client.patch(
            url,
            json={"status": "completed"},
            headers={"If-Match": beat.headers["etag"]},
        )
        assert done.status_code == 200, done.text

    for first_time in (True, False):
        offset = log.end()
        requests()
        queries = log.queries_since(offset)
        assert len(queries) == 6, queries
        for query, prepared in queries:
            if first_time:
                assert query.startswith("PREPARE ej_") and prepared is None, query
            else:
                assert query.startswith("EXECUTE ej_") and prepared, query
    # Planned once, when prepared: every later EXECUTE ran the generic plan.
    plans = _on_the_app_connection(
        url, "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
    )
    assert sorted(plans) == [(2, 0)] * 6, plans


def test_a_replaced_connection_prepares_again(counted, statement_log):
    """After an outage, a failover or a SnapStart restore: the new connection
    has none of the old one's prepared statements."""
    _, log = statement_log
    client, _ = _one_connection(counted)
    job = _job(client)
    get = lambda: client.get(f"/extraction-jobs/{job['id']}")
    get()
    assert _terminate_app_connections(log) == 1
    for expected in ("PREPARE ej_", "EXECUTE ej_"):
        offset = log.end()
        assert get().json() == job
        [(query, _)] = log.queries_since(offset)
        assert query.startswith(expected), query


def test_a_statement_gone_from_the_server_is_prepared_again(counted, statement_log):
    """A prepared statement the server no longer has (a DISCARD ALL, a
    PREPARE that failed): its EXECUTE fails, and it is prepared again at
    once. The only case that costs a second round trip."""
    url, log = statement_log
    client, _ = _one_connection(counted)
    job = _job(client)
    get = lambda: client.get(f"/extraction-jobs/{job['id']}")
    get()
    _on_the_app_connection(url, "DEALLOCATE ALL")
    offset = log.end()
    assert get().json() == job
    queries = [query for query, _ in log.queries_since(offset)]
    assert len(queries) == 2, queries
    assert queries[0].startswith("EXECUTE ej_"), queries
    assert queries[1].startswith("PREPARE ej_"), queries


def test_a_statement_whose_result_type_changed_is_prepared_again(
    counted, statement_log
):
    """A migration that changes the type of a column a prepared statement
    returns: PostgreSQL refuses the old statement, which is replaced."""
    url, log = statement_log
    client, _ = _one_connection(counted)
    job = _job(client)
    get = lambda: client.get(f"/extraction-jobs/{job['id']}")
    get()
    alter = "ALTER TABLE extraction_job ALTER COLUMN document_id TYPE {}"
    _on_the_app_connection(url, alter.format("text"))
    try:
        offset = log.end()
        assert get().json() == job
        queries = [query for query, _ in log.queries_since(offset)]
    finally:
        _on_the_app_connection(url, alter.format("varchar(255)"))
        _on_the_app_connection(url, "ANALYZE extraction_job")
    assert len(queries) == 2, queries
    assert queries[0].startswith("EXECUTE ej_"), queries
    assert queries[1].startswith("DEALLOCATE ej_"), queries


def test_the_claims_generic_plan_reads_the_pending_jobs_index(counted, statement_log):
    """Fixed values are written into the prepared SQL (`status = 'pending'`),
    so the one plan every claim runs still reads the partial index."""
    url, _ = statement_log
    client, _ = _one_connection(counted)
    # A test table is small enough to read whole; the plan is made at the
    # claim's first EXECUTE, so this comes first. With `status = $n` no
    # plan could use the partial index at all.
    _on_the_app_connection(url, "SET enable_seqscan = off")
    client.post("/extraction-jobs/claim", json={"worker_id": "w"})
    # The claim's first pick (due pending jobs), named by the claim's place
    # among the changes its statement runs (drivers._pg_picked).
    part = repository.CLAIM_CHANGES.index(repository.CLAIM)
    [(name, parameters)] = _on_the_app_connection(
        url,
        "SELECT name, cardinality(parameter_types) FROM pg_prepared_statements "
        f"WHERE strpos(statement, 'pick_{part}_0 AS MATERIALIZED') > 0",
    )
    nulls = ", ".join(["NULL"] * parameters)
    plan = "\n".join(
        row[0]
        for row in _on_the_app_connection(
            url, f"EXPLAIN (COSTS OFF) EXECUTE {name}({nulls})"
        )
    )
    assert "Index Scan using ix_extraction_job_pending_claim" in plan, plan
    assert "$1" in plan, plan  # the generic plan, not one for these values
