"""Engines and sessions, cached per database URL for the life of the process.

Nothing here connects at import: an engine is built on first use, and the
tables are created on the first session against each URL. On Lambda that
means once per execution environment, whatever Mangum does with lifespan.
"""

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from db_models import Base

logger = logging.getLogger(__name__)

DEFAULT_SQLITE_PATH = "extraction_jobs.db"
SQLITE_BUSY_TIMEOUT_S = 15


class DatabaseUnavailable(Exception):
    """The database could not be reached, or did not answer in time."""


class InvalidDatabaseURL(ValueError):
    pass


def database_url_from_env() -> str:
    """`DATABASE_URL` when set, else SQLite at `DB_PATH`."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        return normalize_url(url)
    path = os.environ.get("DB_PATH", "").strip() or DEFAULT_SQLITE_PATH
    return "sqlite://" if path == ":memory:" else f"sqlite:///{path}"


def normalize_url(url: str) -> str:
    """Name the psycopg2 driver explicitly: SQLAlchemy 2.1 maps a bare
    `postgresql://` to psycopg 3, and Heroku-style `postgres://` to nothing."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidDatabaseURL(
            "DATABASE_URL must look like postgresql://user:pass@host/db"
        )
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg2://{rest}"
    if scheme in ("postgresql+psycopg2", "sqlite"):
        return url
    raise InvalidDatabaseURL(
        f"DATABASE_URL scheme {scheme!r} is not supported; use postgresql:// or sqlite://"
    )


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise InvalidDatabaseURL(f"{name} must be an integer, got {raw!r}") from None


def _postgres_engine(url: str) -> Engine:
    statement_timeout_ms = _env_int("DB_STATEMENT_TIMEOUT_MS", 10_000)
    return create_engine(
        url,
        hide_parameters=True,  # errors and echo never show job data
        pool_pre_ping=True,
        # Small by default: on Lambda every execution environment has its own pool.
        pool_size=_env_int("DB_POOL_SIZE", 2),
        max_overflow=_env_int("DB_MAX_OVERFLOW", 0),
        pool_timeout=_env_int("DB_POOL_TIMEOUT", 10),
        connect_args={
            "connect_timeout": _env_int("DB_CONNECT_TIMEOUT", 5),
            "options": f"-c statement_timeout={statement_timeout_ms}",
            "application_name": "extraction-jobs",
        },
    )


def _sqlite_engine(url: str) -> Engine:
    in_memory = make_url(url).database in (None, "", ":memory:")
    engine = create_engine(
        url,
        hide_parameters=True,
        # One shared connection keeps an in-memory database alive across requests.
        poolclass=StaticPool if in_memory else None,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        # Writers take the write lock up front, so concurrent writers queue on
        # the busy timeout instead of failing on a stale read snapshot.
        immediate = connection.get_execution_options().get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class _Database:
    """An engine, its session factory, and whether its tables exist yet."""

    def __init__(self, url: str) -> None:
        is_sqlite = url.startswith("sqlite")
        self.engine = _sqlite_engine(url) if is_sqlite else _postgres_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.writer_sessions = sessionmaker(
            self.engine.execution_options(sqlite_immediate=True)
            if is_sqlite
            else self.engine,
            expire_on_commit=False,
        )
        self.tables_ready = False
        self.lock = threading.Lock()

    def ensure_tables(self) -> None:
        if self.tables_ready:
            return
        with self.lock:
            if not self.tables_ready:
                Base.metadata.create_all(self.engine)
                self.tables_ready = True


_databases: dict[str, _Database] = {}
_databases_lock = threading.Lock()


def _database(url: str) -> _Database:
    database = _databases.get(url)
    if database is None:
        with _databases_lock:
            database = _databases.get(url)
            if database is None:
                database = _databases[url] = _Database(url)
    return database


def get_engine(url: str) -> Engine:
    return _database(url).engine


def _is_unavailable(error: DBAPIError) -> bool:
    return error.connection_invalidated or isinstance(
        error, OperationalError | InterfaceError
    )


@contextmanager
def session_scope(url: str, *, write: bool = False) -> Iterator[Session]:
    """One short transaction: commit on success, roll back on any error.

    Connection failures and timeouts surface as `DatabaseUnavailable`, so
    callers above never see driver exceptions for an outage.
    """
    database = _database(url)
    try:
        database.ensure_tables()
        factory = database.writer_sessions if write else database.sessions
        with factory() as session, session.begin():
            yield session
    except (DBAPIError, PoolTimeoutError) as error:
        if isinstance(error, DBAPIError) and not _is_unavailable(error):
            raise
        cause = getattr(error, "orig", None) or error
        logger.error("database unavailable: %s", cause)
        raise DatabaseUnavailable(str(cause)) from error


def ping(url: str) -> None:
    """A real round trip to the database."""
    with session_scope(url) as session:
        session.execute(text("SELECT 1"))


def create_tables(url: str) -> None:
    _database(url).ensure_tables()


def reset_engines() -> None:
    """Dispose every cached engine (tests, and after a fork)."""
    with _databases_lock:
        for database in _databases.values():
            database.engine.dispose()
        _databases.clear()
