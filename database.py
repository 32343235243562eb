"""Engines and sessions, cached per database URL for the life of the process.

Nothing here connects at import: an engine is built on first use, and the
schema is settled on the first session against each URL. On Lambda that
means once per execution environment, whatever Mangum does with lifespan.

The schema belongs to Alembic (migrations/). A SQLite file, the local
default, is upgraded on first use. PostgreSQL is never changed by the app:
its revision is checked, and a database behind this code's head answers
`SchemaOutOfDate` (503) until `make migrate` or the migration function runs.
"""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool

import settings
from db_models import SCHEMA_REVISIONS

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 15
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SCHEMA_HEAD = SCHEMA_REVISIONS[-1]
# While the schema is out of date, look again at most this often.
SCHEMA_RECHECK_S = 5.0


class DatabaseUnavailable(Exception):
    """The database could not be reached, or did not answer in time."""


class SchemaOutOfDate(DatabaseUnavailable):
    """The database's schema is behind the revision this code needs."""

    def __init__(self, found: str | None, needed: str) -> None:
        super().__init__(
            f"database schema is at revision {found or '<none>'}, this code needs "
            f"{needed}; run `make migrate` (in AWS: the migration function)"
        )
        self.found = found
        self.needed = needed


# A bad DATABASE_URL is a configuration error like any other (settings.py).
InvalidDatabaseURL = settings.ConfigError


def database_url_from_env() -> str:
    """`DATABASE_URL` when set, else SQLite at `DB_PATH`."""
    return settings.settings_from_env().resolved_database_url


def normalize_url(url: str) -> str:
    """`url` with the psycopg2 driver named (see settings.normalize_database_url)."""
    try:
        return settings.normalize_database_url(url)
    except ValueError as error:
        raise InvalidDatabaseURL([f"DATABASE_URL {error}"]) from None


def _postgres_engine(url: str) -> Engine:
    config = settings.settings_from_env()
    engine = create_engine(
        url,
        hide_parameters=True,  # errors and echo never show job data
        pool_pre_ping=True,
        # Small by default: on Lambda every execution environment has its own pool.
        pool_size=config.db_pool_size,
        max_overflow=config.db_max_overflow,
        pool_timeout=config.db_pool_timeout,
        connect_args={
            "connect_timeout": config.db_connect_timeout,
            "options": f"-c statement_timeout={config.db_statement_timeout_ms}",
            "application_name": "extraction-jobs",
        },
    )
    if config.db_iam_auth:
        use_iam_auth(engine, config.aws_region)
    return engine


def use_iam_auth(engine: Engine, region: str | None = None) -> None:
    """IAM database authentication (`DB_IAM_AUTH=1`, on AWS): every new
    connection signs a fresh 15-minute token for its host, port and user with
    the function's own credentials, and passes it as the password, so the
    URL holds none. botocore comes with the Lambda runtime; it is imported
    here only, so SQLite and password connections never load it."""
    import botocore.session

    session = botocore.session.get_session()
    region = region or session.get_config_variable("region")
    if not region:
        raise InvalidDatabaseURL(["DB_IAM_AUTH=1 needs AWS_REGION (set on Lambda)"])
    signer = session.create_client("rds", region_name=region)
    # The token is the signature; botocore's signer logs signatures at DEBUG.
    logging.getLogger("botocore.auth").setLevel(logging.INFO)

    @event.listens_for(engine, "do_connect")
    def _sign_token(_dialect, _record, _cargs, cparams):
        cparams["password"] = signer.generate_db_auth_token(
            DBHostname=cparams["host"],
            Port=int(cparams.get("port") or 5432),
            DBUsername=cparams["user"],
            Region=region,
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


def migration_engine(url: str) -> Engine:
    """An engine for `alembic upgrade`: no pool, no statement timeout, and on
    SQLite the write lock taken up front."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url).execution_options(sqlite_immediate=True)
    return create_engine(
        url,
        hide_parameters=True,
        poolclass=NullPool,
        connect_args={
            "connect_timeout": settings.settings_from_env().db_connect_timeout,
            "application_name": "extraction-jobs-migrate",
        },
    )


def _alembic_config(**attributes: object):
    from alembic.config import Config  # only when migrating, never per request

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes.update(attributes)
    return config


def upgrade_schema(url: str) -> None:
    """`alembic upgrade head` on `url`: for scripts, tests and the migration function."""
    from alembic import command

    command.upgrade(_alembic_config(url=url), "head")


def schema_revision(engine: Engine) -> str | None:
    """The database's Alembic revision; None when it has never been migrated."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(
            text("SELECT version_num FROM alembic_version")
        ).scalar()


class _Database:
    """An engine, its session factory, and whether its schema is settled."""

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
        self.is_sqlite = is_sqlite
        self.schema_ready = False
        self.out_of_date: SchemaOutOfDate | None = None
        self.checked_at = 0.0
        self.lock = threading.Lock()

    def ensure_schema(self) -> None:
        if self.schema_ready:
            return
        with self.lock:
            if self.schema_ready:
                return
            if self.is_sqlite:
                self._upgrade_sqlite()
            else:
                self._check_revision()
            self.schema_ready = True

    def _upgrade_sqlite(self) -> None:
        """Local development: bring the file (or in-memory database) to head,
        on the app's own connection so an in-memory database is the same one."""
        from alembic import command

        immediate = self.engine.execution_options(sqlite_immediate=True)
        with immediate.connect() as connection:
            command.upgrade(_alembic_config(connection=connection), "head")

    def _check_revision(self) -> None:
        recent = time.monotonic() - self.checked_at < SCHEMA_RECHECK_S
        if self.out_of_date is not None and recent:
            raise self.out_of_date
        self.checked_at = time.monotonic()
        found = schema_revision(self.engine)
        if found == SCHEMA_HEAD:
            self.out_of_date = None
            return
        if found is None or found in SCHEMA_REVISIONS:
            self.out_of_date = SchemaOutOfDate(found, SCHEMA_HEAD)
            logger.error("%s", self.out_of_date)
            raise self.out_of_date
        # Not a revision this code knows: a newer release migrated it, and
        # migrations only add, so this code can still serve.
        logger.warning(
            "database schema is at revision %s, newer than this code's %s",
            found,
            SCHEMA_HEAD,
        )


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
        database.ensure_schema()
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


def ensure_schema(url: str) -> None:
    """Settle the schema now rather than on the first request."""
    _database(url).ensure_schema()


def reset_engines() -> None:
    """Dispose every cached engine (tests, and after a fork)."""
    with _databases_lock:
        for database in _databases.values():
            database.engine.dispose()
        _databases.clear()
