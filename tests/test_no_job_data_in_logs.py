"""No job data in logs: provoke every error path, then scan what was logged.

The requests go through the Lambda handler (Mangum and the unhandled-error
wrapper included) with auth on against a real JWKS server on 127.0.0.1. Every
body, metadata value, error message and token carries a marker; afterwards no
log record (SQLAlchemy's statement log switched on, too), nothing written to
stdout or stderr, and, on PostgreSQL, nothing the server wrote to its own log
may contain a marker. The server runs with the logging parameters the RDS
parameter group sets (read from terraform/rds.tf).
"""

import base64
import json
import logging
import os
import re
import time
import uuid
from typing import Any

import psycopg2
import pytest
from conftest import ROOT, empty_postgres, postgres_url, require
from jose import jwt
from lambda_events import LambdaContext, http_api_event
from sqlalchemy import make_url, text

import database
import lambda_handler
from main import create_app
from repository import ExtractionJobRepository
from tests.jwks_server import JwksServer, RsaTestKey, use_jwks

AUDIENCE = "https://extraction-jobs.example.invalid"
ISSUER = "https://tenant.example.invalid/"
CLOSED_PORT_POSTGRES = "postgresql://postgres@127.0.0.1:1/test"
MISSING_SQLITE = "sqlite:////nonexistent-dir/for/sure/jobs.db"
REFUSED_KEY = "refuse_me"  # metadata/result key a test-only constraint refuses


@pytest.fixture(scope="module")
def key() -> RsaTestKey:
    return RsaTestKey("log-scan-key")


@pytest.fixture
def jwks(key, monkeypatch):
    server = JwksServer().start()
    server.keys = [key.public_jwk()]
    use_jwks(monkeypatch, server, issuer=ISSUER, audience=AUDIENCE)
    yield server
    server.stop()


class Markers:
    """Unique strings put into every piece of job data and every token."""

    def __init__(self, key: RsaTestKey) -> None:
        self.key = key
        self.secret = f"jobdata-{uuid.uuid4().hex}"
        self.tokens: list[str] = []

    def value(self, label: str) -> str:
        return f"{self.secret}-{label}"

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "auth0|log-scan",
            "iat": now,
            "exp": now + 300,
            "scope": "read:extraction-jobs write:extraction-jobs",
            "note": self.value("token-claim"),
        }
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        token = jwt.encode(
            payload,
            self.key.private_pem,
            algorithm="RS256",
            headers={"kid": self.key.kid},
        )
        self.tokens.append(token)
        return token

    def found_in(self, text: str) -> list[str]:
        """The markers (or token parts) that occur in text."""
        needles = [self.secret] + [
            part for token in self.tokens for part in token.split(".")
        ]
        return [needle for needle in needles if needle in text]


class Lambda:
    """The deployed entry point, invoked with API Gateway events."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.token = token
        self.handler = lambda_handler.build_handler(app)

    def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
    ) -> int:
        all_headers = {"authorization": f"Bearer {token or self.token}"}
        all_headers.update(headers or {})
        event = http_api_event(method, path, json_body=body, headers=all_headers)
        if raw is not None:
            event["headers"]["content-type"] = "application/json"
            event["headers"]["content-length"] = str(len(raw))
            event["body"] = raw.decode()
        return self.handler(event, LambdaContext())["statusCode"]


class RacingRepository(ExtractionJobRepository):
    """Loses the idempotency race once: its first look-up by key runs as if
    the winner had not committed yet, so the insert meets the unique index."""

    lost = False

    def get_by_idempotency_key(self, created_by, key):
        if not self.lost:
            self.lost = True
            return None
        return super().get_by_idempotency_key(created_by, key)


# --- the PostgreSQL server's own log ---------------------------------------------


def rds_logging_parameters() -> dict[str, str]:
    """The log_* parameters terraform/rds.tf puts in the RDS parameter group."""
    source = (ROOT / "terraform" / "rds.tf").read_text()
    pairs = re.findall(
        r'parameter\s*{\s*name\s*=\s*"([^"]+)"\s*value\s*=\s*"([^"]*)"', source
    )
    return {name: value for name, value in pairs if name.startswith("log_")}


class ServerLog:
    """What the PostgreSQL server appends to its log (its stderr, read with
    pg_read_binary_file through the backend's /proc/self/fd/2) from now on."""

    PATH = "/proc/self/fd/2"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.start = self._size()

    def _query(self, sql: str, *args: object) -> Any:
        connection = psycopg2.connect(self.dsn)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, args)
                return cursor.fetchone()[0]
        finally:
            connection.close()

    def _size(self) -> int:
        try:
            size = self._query("SELECT size FROM pg_stat_file(%s, true)", self.PATH)
        except psycopg2.Error as error:
            size = None
            reason = str(error).strip()
        else:
            reason = "the server logs to no regular file"
        require(bool(size), f"cannot read the PostgreSQL server log: {reason}")
        return size

    def read(self) -> str:
        end = self._size()
        data = self._query(
            "SELECT pg_read_binary_file(%s, %s, %s)",
            self.PATH,
            self.start,
            end - self.start,
        )
        return bytes(data).decode("utf-8", "replace")


def alter_database(dsn: str, settings: dict[str, str | None]) -> None:
    """Per-database settings (None resets); new connections pick them up."""
    name = make_url(dsn).database
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for parameter, value in settings.items():
                if value is None:
                    cursor.execute(f'ALTER DATABASE "{name}" RESET {parameter}')
                else:
                    cursor.execute(
                        f'ALTER DATABASE "{name}" SET {parameter} = %s', (value,)
                    )
    finally:
        connection.close()
    database.reset_engines()


POSTGRES_DEFAULTS = {
    "log_min_error_statement": "error",
    "log_error_verbosity": "default",
}


@pytest.fixture
def logging_as(request):
    """The test database logs with the given settings; reset afterwards."""
    postgres_url()  # skips (fails under CI) without TEST_DATABASE_URL
    dsn = os.environ["TEST_DATABASE_URL"]
    alter_database(dsn, request.param)
    yield dsn
    alter_database(dsn, dict.fromkeys(request.param))


def test_the_parameter_group_sets_what_the_server_log_test_uses():
    assert rds_logging_parameters() == {
        "log_min_error_statement": "panic",
        "log_error_verbosity": "terse",
    }


# --- the error paths ---------------------------------------------------------------


def refuse_metadata_key(url: str) -> None:
    """A test-only constraint, so an insert or an update fails with an error
    the app does not handle: the way to an unhandled database error with the
    row in it."""
    engine = database.get_engine(url)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                text(
                    "ALTER TABLE extraction_job DROP CONSTRAINT IF EXISTS log_scan_refuses"
                )
            )
            connection.execute(
                text(
                    "ALTER TABLE extraction_job ADD CONSTRAINT log_scan_refuses "
                    f"CHECK ((metadata -> '{REFUSED_KEY}') IS NULL "
                    f"AND (result -> '{REFUSED_KEY}') IS NULL)"
                )
            )
        else:
            for write, column in (("INSERT", "metadata"), ("UPDATE", "result")):
                connection.execute(
                    text(
                        f"CREATE TRIGGER log_scan_refuses_{write} BEFORE {write} "
                        f"ON extraction_job WHEN json_extract(NEW.{column}, "
                        f"'$.{REFUSED_KEY}') IS NOT NULL "
                        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
                    )
                )


def drop_refusal(url: str) -> None:
    engine = database.get_engine(url)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                text(
                    "ALTER TABLE extraction_job DROP CONSTRAINT IF EXISTS log_scan_refuses"
                )
            )
        else:
            for write in ("INSERT", "UPDATE"):
                connection.execute(
                    text(f"DROP TRIGGER IF EXISTS log_scan_refuses_{write}")
                )


def provoke_every_error_path(
    url: str, markers: Markers, jwks: JwksServer, monkeypatch
) -> dict[str, int]:
    """Run each error path once; returns the status each one got."""
    statuses: dict[str, int] = {}
    api = Lambda(create_app(), markers.token())
    job = {
        "document_id": markers.value("document"),
        "priority": 3,
        "metadata": {"customer": markers.value("metadata"), "nested": [markers.secret]},
    }
    key = {"Idempotency-Key": "log-scan-key-1"}
    statuses["create"] = api.send("POST", "/extraction-jobs", job, headers=key)
    job_id = json.loads(
        api.handler(
            http_api_event(
                "GET",
                "/extraction-jobs",
                headers={"authorization": f"Bearer {api.token}"},
            ),
            LambdaContext(),
        )["body"]
    )[0]["id"]
    path = f"/extraction-jobs/{job_id}"

    # validation errors
    statuses["unknown field"] = api.send(
        "POST", "/extraction-jobs", {**job, "bogus": markers.value("field")}
    )
    statuses["bad priority"] = api.send(
        "POST", "/extraction-jobs", {**job, "priority": markers.value("priority")}
    )
    statuses["malformed json"] = api.send(
        "POST", "/extraction-jobs", raw=json.dumps(job).encode()[:-3]
    )
    statuses["too large"] = api.send(
        "POST", "/extraction-jobs", {**job, "pad": markers.secret * 40_000}
    )
    statuses["bad status"] = api.send(
        "PATCH", path, {"status": "done", "error_message": markers.value("result")}
    )
    statuses["bad if-match"] = api.send(
        "PATCH",
        path,
        {"status": "failed", "error_message": markers.value("result")},
        headers={"If-Match": markers.value("etag")},
    )
    statuses["bad idempotency key"] = api.send(
        "POST",
        "/extraction-jobs",
        job,
        headers={"Idempotency-Key": markers.value("key") + "\x7f"},
    )
    statuses["stale if-match"] = api.send(
        "PATCH",
        path,
        {"status": "failed", "error_message": markers.value("result")},
        headers={"If-Match": '"9"'},
    )

    # idempotency: a reused key, and a lost race that meets the unique index
    other = {**job, "metadata": {"other": markers.value("metadata-2")}}
    statuses["key reused"] = api.send("POST", "/extraction-jobs", other, headers=key)
    api.app.state.service.repository = RacingRepository(url)
    statuses["race replay"] = api.send("POST", "/extraction-jobs", job, headers=key)
    api.app.state.service.repository = RacingRepository(url)
    statuses["race reused"] = api.send("POST", "/extraction-jobs", other, headers=key)
    api.app.state.service.repository = ExtractionJobRepository(url)

    # an unhandled database error whose message holds the refused row
    refuse_metadata_key(url)
    try:
        statuses["unhandled"] = api.send(
            "POST",
            "/extraction-jobs",
            {**job, "metadata": {REFUSED_KEY: markers.value("refused")}},
        )
        # ...and in the one statement of a PATCH (its event's detail too)
        statuses["unhandled patch"] = api.send(
            "PATCH",
            path,
            {"status": "completed", "result": {REFUSED_KEY: markers.value("result")}},
        )
    finally:
        drop_refusal(url)

    # refusals explained from the job the same statement returned
    finished = {"status": "completed", "result": {"r": markers.value("result")}}
    statuses["finish"] = api.send("PATCH", path, finished)
    statuses["finished"] = api.send(
        "PATCH", path, {"status": "failed", "error_message": markers.value("error")}
    )
    statuses["not held"] = api.send(
        "POST", f"{path}/heartbeat", {"worker_id": markers.value("worker")}
    )

    # auth failures
    statuses["no sub"] = api.send(
        "GET", "/extraction-jobs", token=markers.token(sub=None)
    )
    statuses["expired"] = api.send(
        "GET", "/extraction-jobs", token=markers.token(exp=int(time.time()) - 3600)
    )
    statuses["wrong audience"] = api.send(
        "GET", "/extraction-jobs", token=markers.token(aud="https://other.invalid")
    )
    tampered = (
        api.token.rsplit(".", 1)[0]
        + "."
        + base64.urlsafe_b64encode(markers.secret.encode()).decode().rstrip("=")
    )
    markers.tokens.append(tampered)
    statuses["bad signature"] = api.send("GET", "/extraction-jobs", token=tampered)
    statuses["not a jwt"] = api.send(
        "GET", "/extraction-jobs", token=markers.value("token")
    )
    statuses["read-only"] = api.send(
        "POST",
        "/extraction-jobs",
        job,
        token=markers.token(scope="read:extraction-jobs"),
    )
    jwks.up = False
    cold = Lambda(create_app(), api.token)
    statuses["jwks down"] = cold.send("POST", "/extraction-jobs", job)
    jwks.up = True

    # statement timeout (PostgreSQL only: SQLite has none)
    if url.startswith("postgresql"):
        monkeypatch.setenv("DB_STATEMENT_TIMEOUT_MS", "300")
        database.reset_engines()
        slow = Lambda(create_app(), api.token)
        assert slow.send("GET", "/extraction-jobs") == 200  # warm pool
        locker = psycopg2.connect(os.environ["TEST_DATABASE_URL"])
        try:
            with locker.cursor() as cursor:
                cursor.execute("LOCK TABLE extraction_job IN ACCESS EXCLUSIVE MODE")
                statuses["statement timeout"] = slow.send(
                    "POST", "/extraction-jobs", job
                )
        finally:
            locker.rollback()
            locker.close()
            monkeypatch.delenv("DB_STATEMENT_TIMEOUT_MS")
            database.reset_engines()

    # outage
    monkeypatch.setenv(
        "DATABASE_URL",
        CLOSED_PORT_POSTGRES if url.startswith("postgresql") else MISSING_SQLITE,
    )
    down = Lambda(create_app(), api.token)
    statuses["outage"] = down.send("POST", "/extraction-jobs", job)
    monkeypatch.setenv("DATABASE_URL", url)
    return statuses


EXPECTED = {
    "create": 201,
    "unknown field": 422,
    "bad priority": 422,
    "malformed json": 422,
    "too large": 413,
    "bad status": 422,
    "bad if-match": 422,
    "bad idempotency key": 422,
    "stale if-match": 412,
    "key reused": 422,
    "race replay": 201,
    "race reused": 422,
    "unhandled": 500,
    "unhandled patch": 500,
    "finish": 200,
    "finished": 409,
    "not held": 409,
    "no sub": 401,
    "expired": 401,
    "wrong audience": 401,
    "bad signature": 401,
    "not a jwt": 401,
    "read-only": 403,
    "jwks down": 503,
    "outage": 503,
}


def captured(caplog, capfd) -> str:
    out, err = capfd.readouterr()
    records = "\n".join(
        record.getMessage() + "\n" + (record.exc_text or "")
        for record in caplog.records
    )
    return f"{records}\n{out}\n{err}"


def run_and_scan(url, key, jwks, monkeypatch, caplog, capfd) -> tuple[Markers, str]:
    monkeypatch.setenv("DATABASE_URL", url)
    caplog.set_level(logging.DEBUG)
    # SQLAlchemy's statement log, as `echo=True` would write it: hide_parameters
    # must keep the values out of it too.
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    markers = Markers(key)
    statuses = provoke_every_error_path(url, markers, jwks, monkeypatch)
    expected = dict(EXPECTED)
    if url.startswith("postgresql"):
        expected["statement timeout"] = 503
    assert statuses == expected
    logs = captured(caplog, capfd)
    # The paths that log did log: the scan looked at something.
    for line in ("unhandled exception", "IntegrityError", "database unavailable"):
        assert line in logs
    assert "JWKS fetch from" in logs
    assert "INSERT INTO extraction_job" in logs
    return markers, logs


def test_no_job_data_or_token_in_the_app_logs(
    database_url, key, jwks, monkeypatch, caplog, capfd
):
    markers, logs = run_and_scan(database_url, key, jwks, monkeypatch, caplog, capfd)
    leaks = [line for line in logs.splitlines() if markers.found_in(line)]
    assert leaks == []


@pytest.mark.parametrize("logging_as", [rds_logging_parameters()], indirect=True)
def test_no_job_data_in_the_postgresql_server_log(
    logging_as, key, jwks, monkeypatch, caplog, capfd
):
    url = postgres_url()
    empty_postgres(url)
    server_log = ServerLog(logging_as)
    markers, _ = run_and_scan(url, key, jwks, monkeypatch, caplog, capfd)
    logged = server_log.read()
    assert "duplicate key value violates unique constraint" in logged
    assert "canceling statement due to statement timeout" in logged
    assert "violates check constraint" in logged
    leaks = [line for line in logged.splitlines() if markers.found_in(line)]
    assert leaks == []


@pytest.mark.parametrize("logging_as", [POSTGRES_DEFAULTS], indirect=True)
def test_the_server_log_check_can_fail_with_default_settings(
    logging_as, key, jwks, monkeypatch
):
    """Control: with PostgreSQL's defaults a lost idempotency race writes the
    job's metadata into the server log, so the scan above would see it."""
    url = postgres_url()
    empty_postgres(url)
    server_log = ServerLog(logging_as)
    monkeypatch.setenv("DATABASE_URL", url)
    markers = Markers(key)
    api = Lambda(create_app(), markers.token())
    job = {"document_id": "d", "metadata": {"m": markers.value("metadata")}}
    key_header = {"Idempotency-Key": "control"}
    assert api.send("POST", "/extraction-jobs", job, headers=key_header) == 201
    api.app.state.service.repository = RacingRepository(url)
    assert api.send("POST", "/extraction-jobs", job, headers=key_header) == 201
    assert markers.found_in(server_log.read())


def test_engines_hide_parameters(database_url):
    assert database.get_engine(database_url).hide_parameters is True
