"""Shared fixtures: every API test runs against SQLite and PostgreSQL.

PostgreSQL tests need `TEST_DATABASE_URL`; without it they are skipped on
a developer machine and fail under `CI=true`, so CI can never go green on
SQLite alone. With `API_URL` set (`make test-deployed`) the contract tests
talk to a deployed API over the network instead.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Auth has its own tests; everywhere else it is not the subject.
os.environ["AUTH_DISABLED"] = "1"
for leaked in ("DATABASE_URL", "DB_PATH", "API_GATEWAY_BASE_PATH"):
    os.environ.pop(leaked, None)

# Starlette nudges towards httpx2; the pinned httpx is what the project uses.
warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, delete, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import database
from db_models import CREATE_CLOCK, EVENTS, JOBS, OUTBOX, metadata
from main import create_app

IN_CI = os.environ.get("CI") == "true"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _database_of_this_worker(url: str) -> str:
    """Under pytest-xdist (`make test` runs several workers), each worker's
    PostgreSQL tests get a database of their own beside TEST_DATABASE_URL's,
    `<its name>_<worker>`, made if missing: the tests empty and rebuild the
    database they use, so two workers cannot share one. Every name a test
    derives from it (scratch databases, roles) is then the worker's own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not url or not worker:
        return url
    import psycopg2

    own = make_url(url).set(database=f"{make_url(url).database}_{worker}")
    admin = psycopg2.connect(url)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (own.database,))
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{own.database}"')
    admin.close()
    return own.render_as_string(hide_password=False)


TEST_DATABASE_URL = _database_of_this_worker(
    os.environ.get("TEST_DATABASE_URL", "").strip()
)
if TEST_DATABASE_URL:  # also for the tests that read the environment
    os.environ["TEST_DATABASE_URL"] = TEST_DATABASE_URL
API_URL = os.environ.get("API_URL", "").strip()
BACKENDS = ["sqlite", "postgresql"]
CONTRACT_PREFIX = "contract-test-"
# What main.run_sweep answers when it found nothing to do (without a bus).
SWEPT_NOTHING = {
    "leases_failed": 0,
    "leases_cancelled": 0,
    "leases_released": 0,
    "jobs_deleted": 0,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes minutes (terraform apply on moto)")


def require(condition: bool, reason: str) -> None:
    """Skip on a developer machine, fail under CI=true."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"cannot run under CI=true: {reason}")
    pytest.skip(reason)


def postgres_url() -> str:
    require(bool(TEST_DATABASE_URL), "TEST_DATABASE_URL is not set")
    return database.normalize_url(TEST_DATABASE_URL)


_schema_refreshed: set[str] = set()


def empty_postgres(url: str) -> None:
    """Start each test from an empty table; rebuild the schema once per run
    through the migrations, so a changed table definition never meets an old
    table and the tests run on exactly what `make migrate` makes."""
    engine = database.get_engine(url)
    if url not in _schema_refreshed:
        metadata.drop_all(engine)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
        database.upgrade_schema(url)
        _schema_refreshed.add(url)
    with engine.begin() as connection:
        connection.execute(delete(JOBS))
        connection.execute(delete(EVENTS))
        connection.execute(delete(OUTBOX))
        # A test whose clock ran ahead must not leave the next one's jobs
        # created in its future.
        connection.execute(update(CREATE_CLOCK).values(created_at=EPOCH))


@contextmanager
def scratch_postgres_database(suffix: str) -> Iterator[str]:
    """An empty PostgreSQL database of its own beside TEST_DATABASE_URL's
    (named after it with `suffix`), dropped afterwards."""
    base = make_url(postgres_url())
    name = f"{base.database}_{suffix}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    drop = text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    with admin.connect() as connection:
        connection.execute(drop)
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(drop)
        admin.dispose()


def start_server(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`uvicorn main:app` or `make run` in the repository, in a process group
    of its own, stdout and stderr piped (text)."""
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop_server(process: subprocess.Popen) -> None:
    """Ctrl-C for the server: SIGINT to uvicorn itself, or to `make run`'s one
    child (its recipe execs scripts/serve.py), as a terminal would send it
    minus make's own "Interrupt" line. Killed if it does not stop."""
    pid = process.pid
    if process.args[0] == "make":
        pid = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    os.kill(pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


# make's own closing line on a failed recipe: "make: *** [...] Error 1"
# ("make[1]: ..." when make runs under make, as in `make test`).
MAKE_ERROR = re.compile(r"^make(\[\d+\])?: \*\*\* ")


def without_make_errors(stderr: str) -> list[str]:
    """The lines of `stderr` but make's own closing line."""
    return [line for line in stderr.splitlines() if not MAKE_ERROR.match(line)]


def wait_until_listening(process: subprocess.Popen, port: int) -> None:
    """Until something accepts connections on 127.0.0.1:`port`, the process
    still running. (uvicorn's reloader listens before its server is ready:
    requests then wait for it.)"""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, "the server stopped"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)


def backend_url(backend: str, tmp_path: Path) -> str:
    """A database URL for `backend` holding no jobs."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    url = postgres_url()
    empty_postgres(url)
    return url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request.param, tmp_path)


@pytest.fixture
def make_client(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], TestClient]:
    """A fresh app (as after a restart) on the test's database."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    return lambda: TestClient(create_app())


@pytest.fixture
def client(make_client: Callable[[], TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def app(database_url: str, monkeypatch: pytest.MonkeyPatch, clock: "Clock"):
    """A fresh app on the test's database whose service tells time by `clock`."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    app = create_app()
    app.state.service.clock = clock
    return app


def _deployed_client() -> httpx.Client:
    token = os.environ.get("API_TOKEN", "").strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=API_URL.rstrip("/"), headers=headers, timeout=30)


@pytest.fixture(params=["deployed"] if API_URL else BACKENDS)
def api(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[httpx.Client]:
    """The contract tests' client: in-process per backend, or a deployed API."""
    if request.param == "deployed":
        with _deployed_client() as deployed:
            yield deployed
        return
    monkeypatch.setenv("DATABASE_URL", backend_url(request.param, tmp_path))
    yield TestClient(create_app())


@pytest.fixture
def doc_id() -> str:
    """A document id no other test (or real user of a deployed API) has."""
    return f"{CONTRACT_PREFIX}{uuid.uuid4().hex}"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say once, at the end, what did not run and what would enable it:
    one line per skip reason, the PostgreSQL half named as such."""
    reasons = Counter(
        report.longrepr[2].removeprefix("Skipped: ")
        for report in terminalreporter.stats.get("skipped", [])
        if isinstance(report.longrepr, tuple)
    )
    for reason, count in reasons.items():
        if "TEST_DATABASE_URL is not set" in reason:
            line = (
                f"{count} PostgreSQL tests skipped: set TEST_DATABASE_URL to an "
                "empty database they may write to, e.g. TEST_DATABASE_URL="
                "postgresql://postgres@127.0.0.1:5432/test make test"
            )
        else:
            line = f"{count} skipped: {reason}"
        terminalreporter.write_line(line, yellow=True)


def next_link(response: httpx.Response) -> str | None:
    """The URL of a page's Link header (rel="next"), None without one."""
    link = response.headers.get("Link")
    if link is None:
        return None
    target, rel = link.split(";", 1)
    assert rel.strip() == 'rel="next"'
    assert target.startswith("<") and target.endswith(">")
    return target[1:-1]


class Clock:
    """Now, plus however far the test has moved it: leases expire and\n    `run_at` comes due without sleeping (set it as the service's clock)."""

    def __init__(self) -> None:
        self.offset = timedelta()
        self.lock = threading.Lock()

    def __call__(self) -> datetime:
        with self.lock:
            return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()
