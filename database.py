"""Engines and sessions, cached per database URL for the life of the process.

Nothing here connects at import: an engine is built on first use, and the
schema is settled on the first session against each URL. On Lambda that
means once per execution environment, whatever Mangum does with lifespan.

The schema belongs to Alembic (migrations/). A SQLite file, the local
default, is upgraded on first use. PostgreSQL is never changed by the app:
its revision is checked, and a database behind this code's head answers
`SchemaOutOfDate` (503) until `make migrate` or the migration function runs.

Round trips are the cost that matters (each one is a network hop to RDS):
a single statement runs through `run()` in autocommit on PostgreSQL, so it
is exactly one round trip (no BEGIN, no COMMIT, no pre-ping). A pooled
connection is checked with `SELECT 1` only after it sat idle for longer than
`DB_PING_AFTER_IDLE_S` (Lambda freezes environments between invocations, and
a SnapStart restore brings back sockets that are long dead), and one the
server has closed meanwhile is noticed without a round trip (its socket is
readable); a connection found dead mid-statement is replaced, and a read
run once more on a new one (never a write: see `run`).
The hot statements run as server-side prepared statements, prepared in the
round trip of their first use on each connection (see `prepared()`).

A connection that dies without a word (a partition, a hung server) is found
within seconds (see "Dead connections" below), and a database that does not
answer is tried by one request at a time, so the others answer 503 at once.
Behind a transaction-mode pooler (`DB_POOLER=1`: RDS Proxy, PgBouncer) the
connections keep no session state: no prepared statements, no startup options.
"""

import hashlib
import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    String,
    TypeDecorator,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import NullPool, StaticPool

import settings
from db_models import SCHEMA_REVISIONS

logger = logging.getLogger(__name__)
T = TypeVar("T")
E = TypeVar("E", bound=Executable)

SQLITE_BUSY_TIMEOUT_S = 15
# Where a pool keeps, per connection, when it was last returned.
_RETURNED_AT = "returned_at"
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


def database_url_from_env() -> str:
    """`DATABASE_URL` when set, else SQLite at `DB_PATH`."""
    return settings.settings_from_env().resolved_database_url


def normalize_url(url: str) -> str:
    """`url` with the psycopg2 driver named (see settings.normalize_database_url)."""
    try:
        return settings.normalize_database_url(url)
    except ValueError as error:
        raise settings.ConfigError([f"DATABASE_URL {error}"]) from None


def _ping_after_idle(engine: Engine, idle_seconds: float) -> None:
    """Check a pooled connection before use only when it sat idle too long.

    Idle time is measured on the wall clock too: the monotonic clock may not
    advance while a Lambda environment is frozen or snapshotted, the wall
    clock does. A fresh connection is never pinged. A dead one makes the pool
    discard it and connect anew (SQLAlchemy's `DisconnectionError` protocol).
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection, record) -> None:
        record.info[_RETURNED_AT] = (time.monotonic(), time.time())

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection, record, _proxy) -> None:
        returned_at = record.info.pop(_RETURNED_AT, None)
        if returned_at is None:
            return
        if _closed_by_server(dbapi_connection):
            logger.info("pooled connection was closed by the server; replacing it")
            raise DisconnectionError("closed by the server while pooled")
        idle = max(time.monotonic() - returned_at[0], time.time() - returned_at[1])
        if idle <= idle_seconds:
            return
        try:
            # In autocommit, so the ping is one round trip (no BEGIN/ROLLBACK).
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_connection.autocommit = autocommit
        except Exception as error:
            logger.info("pooled connection idle %.0f s was dead: %s", idle, error)
            raise DisconnectionError(str(error)) from error


def _closed_by_server(dbapi_connection) -> bool:
    """Whether an idle connection has something to read: the server's FATAL
    message and end of stream when it ended the session (a restart, a
    failover, pg_terminate_backend). An idle session is sent nothing else
    (no LISTEN, no SET). A poll, not a round trip: about a microsecond."""
    poller = select.poll()
    poller.register(dbapi_connection.fileno(), select.POLLIN)
    return bool(poller.poll(0))


# --- Dead connections (PostgreSQL) --------------------------------------------
# TCP keepalives and tcp_user_timeout (connect_args) notice a peer that stopped
# acknowledging. Nothing in TCP notices one that acknowledges and never
# answers (a hung server, a proxy into a black hole), and psycopg2 has no read
# timeout of its own: so every statement has a deadline, kept by a watchdog
# thread that shuts a late connection's socket down. The statement then fails
# as a dropped connection, and the pool discards it.


class _Watchdog:
    """The statements under way on the app's connections, and their deadlines."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy: dict[int, tuple[float, Any]] = {}
        self.running_in: int | None = None  # the process the thread runs in

    def ensure_running(self) -> None:
        if self.running_in != os.getpid():  # threads do not survive a fork
            self.running_in = os.getpid()
            threading.Thread(target=self._run, name="db-deadline", daemon=True).start()

    def watch(self, connection: Any) -> None:
        self.busy[id(connection)] = (time.monotonic(), connection)  # its start

    def release(self, connection: Any) -> bool:
        """Done with the statement; True if the watchdog had shut it down."""
        with self.lock:
            return self.busy.pop(id(connection), None) is None

    def _run(self) -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL_S)
            now = time.monotonic()
            for key, entry in list(self.busy.items()):
                if now - entry[0] >= entry[1].deadline_s:
                    self._abandon(key, entry)

    def _abandon(self, key: int, entry: tuple[float, Any]) -> None:
        from psycopg2 import InterfaceError

        connection = entry[1]
        reason = f"no answer within {connection.deadline_s:g} s"
        with self.lock:
            if self.busy.get(key) is not entry:
                return  # it answered meanwhile
            del self.busy[key]
            # Before the statement fails: its retry must find the gate closed.
            connection.gate.silent(reason)
            try:
                with socket.socket(fileno=os.dup(connection.fileno())) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            except (OSError, InterfaceError):  # closed meanwhile: nothing to wake
                return
        logger.error("database connection shut down: %s", reason)


# Deadlines are kept to this precision.
WATCHDOG_INTERVAL_S = 0.25
_watchdog = _Watchdog()


def _watched_connection(deadline_s: float, gate: "_ConnectGate") -> type:
    """A psycopg2 connection class that connects through `gate`, and whose
    every round trip has a deadline."""
    from psycopg2 import OperationalError
    from psycopg2.extensions import connection, cursor

    def watched(call: Callable[..., T], conn: Any, *args: Any) -> T:
        _watchdog.watch(conn)
        try:
            result = call(*args)
        finally:
            abandoned = _watchdog.release(conn)
        if abandoned:  # it answered just as the watchdog shut it down
            conn.close()
            raise OperationalError("connection shut down at its deadline")
        return result

    class WatchedCursor(cursor):
        def execute(self, query, vars=None):
            return watched(super().execute, self.connection, query, vars)

        def executemany(self, query, vars_list):
            return watched(super().executemany, self.connection, query, vars_list)

    class WatchedConnection(connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            gate.connect(super().__init__, *args, **kwargs)  # psycopg2 connects here
            self.cursor_factory = WatchedCursor

        def commit(self) -> None:
            watched(super().commit, self)

        def rollback(self) -> None:
            watched(super().rollback, self)

    WatchedConnection.deadline_s = deadline_s
    WatchedConnection.gate = gate
    return WatchedConnection


class _ConnectGate:
    """While the database does not answer, one connection attempt at a time.

    An attempt that waited out much of the connect timeout, or a statement
    shut down at its deadline, means the server is not answering. From then
    until an attempt gets through, one attempt is made at a time and at most
    one every RECHECK_S; the others fail at once, instead of each waiting out
    the connect timeout (and queueing on the pool behind those that do). The
    first attempt after the network heals gets through, and all is as before.
    """

    def __init__(self, slow_s: float) -> None:
        self.slow_s = slow_s
        self.lock = threading.Lock()
        self.silent_at: float | None = None
        self.reason = ""
        self.probing = False

    def silent(self, reason: str) -> None:
        with self.lock:
            self.silent_at, self.reason = time.monotonic(), reason

    def connect(self, connect: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.lock:
            probe = self.silent_at is not None
            if probe and (
                self.probing or time.monotonic() - self.silent_at < RECHECK_S
            ):
                from psycopg2 import OperationalError

                raise OperationalError(
                    f"the database is not answering ({self.reason}); "
                    "not connecting again yet"
                )
            self.probing |= probe
        started = time.monotonic()
        try:
            connection = connect(*args, **kwargs)
        except Exception as error:
            if time.monotonic() - started >= self.slow_s:
                self.silent(str(error).strip().splitlines()[-1])
            raise
        finally:
            if probe:
                self.probing = False
        self.silent_at = None
        return connection


# The server cancels a statement at `statement_timeout` and says so; no answer
# this long after it means no answer at all (see _Watchdog).
DEADLINE_GRACE_S = 1.0
# A connection attempt refused at once: the database did not answer one this
# recently (see _ConnectGate).
RECHECK_S = 1.0
# Prepared statements always run their generic plan (see GENERIC_PLANS).
PLAN_CACHE_MODE = "force_generic_plan"


def session_settings(config: settings.Settings) -> dict[str, str]:
    """What every application session needs: startup options, or behind a
    pooler the application role's defaults (migration.py sets them)."""
    return {
        "statement_timeout": str(config.db_statement_timeout_ms),
        # Timestamps arrive in UTC, as the API writes them (db_models.UTCDateTime).
        "TimeZone": "UTC",
        "plan_cache_mode": PLAN_CACHE_MODE,
    }


def connect_args(config: settings.Settings, application_name: str) -> dict[str, Any]:
    """libpq's parameters for every PostgreSQL connection, migrations too."""
    args: dict[str, Any] = {
        "connect_timeout": config.db_connect_timeout,
        "application_name": application_name,
        # A peer that stopped acknowledging (a partition, a host gone) is found
        # in seconds instead of after the kernel's retransmissions (~15 min).
        "keepalives": 1,
        "keepalives_idle": config.db_keepalives_idle_s,
        "keepalives_interval": config.db_keepalives_interval_s,
        "keepalives_count": config.db_keepalives_count,
        "tcp_user_timeout": config.db_tcp_user_timeout_ms,
    }
    if config.db_ssl_root_cert:
        # The server's certificate and host name, checked against the bundle;
        # wins over the URL's sslmode (Terraform's `require` only encrypts).
        args |= {"sslmode": "verify-full", "sslrootcert": config.db_ssl_root_cert}
    return args


def _postgres_engine(url: str) -> Engine:
    config = settings.settings_from_env()
    gate = _ConnectGate(slow_s=config.db_connect_timeout / 2)
    args = connect_args(config, "extraction-jobs")
    args["connection_factory"] = _watched_connection(
        config.db_statement_timeout_ms / 1000 + DEADLINE_GRACE_S, gate
    )
    if not config.db_pooler:
        args["options"] = " ".join(
            f"-c {name}={value}" for name, value in session_settings(config).items()
        )
    engine = create_engine(
        url,
        hide_parameters=True,  # errors and echo never show job data
        # No pre-ping: see _ping_after_idle.
        pool_pre_ping=False,
        # Set once per connection, client-side: a statement sent alone is its
        # own transaction, with no BEGIN or COMMIT round trip around it.
        isolation_level="AUTOCOMMIT",
        # Small by default: on Lambda every execution environment has its own pool.
        pool_size=config.db_pool_size,
        max_overflow=config.db_max_overflow,
        pool_timeout=config.db_pool_timeout,
        connect_args=args,
    )
    _ping_after_idle(engine, config.db_ping_after_idle_s)
    if not config.db_pooler:
        # A pooler would run an EXECUTE on a server connection that never
        # saw its PREPARE (RDS Proxy pins the session instead); there,
        # prepared() is a no-op. And the session is in UTC only when the
        # startup options say so (UTCDateTime converts otherwise).
        _run_prepared(engine)
        _keep_sessions_in_utc(engine)
    if config.db_iam_auth:
        use_iam_auth(engine, config.aws_region)

    _watchdog.ensure_running()
    return engine


def _keep_sessions_in_utc(engine: Engine) -> None:
    """Every session in UTC, as the startup options ask: then UTCDateTime
    needs no per-value conversion (it reads the dialect's mark). Only a
    `PGTZ` in the environment can win over the options; that connection is
    set back, with one `SET` when it connects."""
    engine.dialect.session_time_zone = "UTC"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        if dbapi_connection.info.parameter_status("TimeZone") != "UTC":
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET TimeZone = 'UTC'")
            dbapi_connection.autocommit = autocommit


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
        raise settings.ConfigError(["DB_IAM_AUTH=1 needs AWS_REGION (set on Lambda)"])
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


# --- Prepared statements (PostgreSQL) ------------------------------------------

# The execution option that marks a statement to run prepared (see prepared()).
PREPARED = "prepared"
# Where a connection's pool entry keeps the names it has prepared: the pool
# clears it whenever the DBAPI connection is replaced (a dead one after an
# outage, a failover or a SnapStart restore), so a new one prepares anew.
_PREPARED_NAMES = "prepared_names"
_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")
# Prepared statements always run their generic plan. Left to choose,
# PostgreSQL keeps planning the claim anew: with `LIMIT $n` it estimates a
# tenth of the queue, so the generic plan's cost looks far higher than a
# custom plan's, though the plan is the same (the partial index, in order).
# Every prepared statement here has one best plan whatever its parameters
# (an index on what it filters by, in the order it reads); the setting
# touches nothing else (psycopg2 prepares nothing, the schema has no
# functions).
GENERIC_PLANS = f"-c plan_cache_mode={PLAN_CACHE_MODE}"


def prepared(statement: E) -> E:
    """`statement`, run on PostgreSQL as a server-side prepared statement.

    psycopg2 sends every statement as plain text, and PostgreSQL plans it
    anew each time: for the claim, planning costs more than running it. A
    prepared statement is planned once per connection and its generic plan
    reused. It costs no round trip: the first use on a connection sends
    `PREPARE name AS ...; EXECUTE name(...)` as one query, later ones
    `EXECUTE name(...)`. Only the statement's own parameters (its named
    `bindparam`s) become `$n`; every value fixed in the statement (statuses,
    `LIMIT 100`, `version + 1`) is written into the prepared SQL, so the
    generic plan still sees `status = 'pending'` and uses the partial indexes.

    For statements built once (the repository's cached ones): each distinct
    statement is prepared once on every connection and kept for its life.
    Never for a statement that carries a per-call value other than as a named
    `bindparam` (`JOBS.c.id == job_id`): that value would be fixed, and each
    call prepare a statement of its own.

    Behind a pooler (`DB_POOLER=1`) the mark does nothing: the statement goes
    as text, as every other, since the next transaction may run on a server
    connection that never saw the PREPARE.
    """
    return statement.execution_options(**{PREPARED: True})


def _parameter_type(type_: Any, dialect: Any) -> str:
    """A `$n`'s declared type: the statement's own, so that no parameter's
    type is left to guess (`jsonb_build_object('k', $1)` needs one). Strings
    are `text`: a value compared with a VARCHAR(255) column is not cut to it."""
    if isinstance(type_, TypeDecorator):
        type_ = type_.load_dialect_impl(dialect)
    if isinstance(type_, String):
        return "text"
    if type_._isnull:
        return "unknown"
    return dialect.type_compiler_instance.process(type_)


@dataclass(frozen=True)
class _Shape:
    """A statement's SQL split into its parameters (`$n`, in order, typed)
    and its fixed values (left as placeholders, filled in by psycopg2)."""

    body: str
    parameters: tuple[str, ...]
    types: tuple[str, ...]
    fixed: tuple[str, ...]

    def prepare(self, values: dict[str, Any]) -> "_Statement":
        key = (self.body, *(values[name] for name in self.fixed))
        statement = _statements.get(key)
        if statement is None:
            name = "ej_" + hashlib.sha256(repr(key).encode()).hexdigest()[:24]
            arguments = ", ".join(f"%({key})s" for key in self.parameters)
            execute = f"EXECUTE {name}({arguments})" if arguments else f"EXECUTE {name}"
            types = f" ({', '.join(self.types)})" if self.types else ""
            statement = _statements[key] = _Statement(
                name, f"PREPARE {name}{types} AS {self.body}; {execute}", execute
            )
        return statement


@dataclass(frozen=True)
class _Statement:
    name: str
    prepare_and_execute: str
    execute: str


_shapes: dict[str, _Shape | None] = {}
_statements: dict[tuple, _Statement] = {}


def _shape(sql: str, compiled: Any, dialect: Any) -> _Shape | None:
    """`sql` as a prepared statement, or None if it cannot be one: a
    parameter with a varying number of values (`IN` of a caller's list)."""
    if sql in _shapes:
        return _shapes[sql]
    binds = {name: bind for bind, name in compiled.bind_names.items()}
    required = {name for name, bind in binds.items() if bind.required}
    parameters: list[str] = []
    fixed: list[str] = []

    def placeholder(match: re.Match) -> str:
        name = match[1]
        if name is None or name not in required:
            if name is not None and name not in fixed:
                fixed.append(name)
            return match[0]
        if name not in parameters:
            parameters.append(name)
        return f"${parameters.index(name) + 1}"

    body = _PLACEHOLDER.sub(placeholder, sql)
    shape = None
    if set(parameters) == required and not compiled.escaped_bind_names:
        types = tuple(_parameter_type(binds[name].type, dialect) for name in parameters)
        shape = _Shape(body, tuple(parameters), types, tuple(fixed))
    _shapes[sql] = shape
    return shape


def _run_prepared(engine: Engine) -> None:
    """Run statements marked `prepared()` as prepared statements."""
    from psycopg2.errors import FeatureNotSupported, InvalidSqlStatementName
    from psycopg2.extensions import TRANSACTION_STATUS_IDLE

    @event.listens_for(engine, "do_execute")
    def _execute(cursor, sql, parameters, context):
        dbapi_connection = cursor.connection
        if not (
            context.execution_options.get(PREPARED)
            # In autocommit and between transactions: a statement found
            # missing can then be prepared again (below).
            and dbapi_connection.autocommit
            and dbapi_connection.get_transaction_status() == TRANSACTION_STATUS_IDLE
        ):
            return None
        shape = _shape(sql, context.compiled, context.dialect)
        if shape is None:
            return None
        statement = shape.prepare(parameters)
        names = context.root_connection.info.setdefault(_PREPARED_NAMES, set())
        query = statement.prepare_and_execute
        if statement.name in names:
            try:
                cursor.execute(statement.execute, parameters)
                return True
            except InvalidSqlStatementName:
                pass  # gone from the server (DISCARD ALL), or its PREPARE failed
            except FeatureNotSupported:
                # "cached plan must not change result type": a migration
                # changed the type of a column it returns. Prepared anew:
                query = f"DEALLOCATE {statement.name}; {query}"
        # Marked first: when the EXECUTE fails, the PREPARE still holds.
        names.add(statement.name)
        cursor.execute(query, parameters)
        return True


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
        from drivers import register_sqlite_functions  # drivers imports this module

        register_sqlite_functions(dbapi_connection)

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
        connect_args=connect_args(
            settings.settings_from_env(), "extraction-jobs-migrate"
        ),
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
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.pooled = self.autocommit_engine = self.engine = _sqlite_engine(url)
            # Writers take the write lock up front.
            self.writer_engine = self.engine.execution_options(sqlite_immediate=True)
        else:
            # The pool's connections are in autocommit: request paths use them
            # as they are. `engine` (schema check, tools, tests) opens ordinary
            # transactions; switching a connection there and back costs a
            # `SET` round trip each way, which no request path pays.
            self.pooled = self.autocommit_engine = _postgres_engine(url)
            self.engine = self.writer_engine = self.pooled.execution_options(
                isolation_level="READ COMMITTED"
            )
        self.schema_ready = False
        self.out_of_date: SchemaOutOfDate | None = None
        self.checked_at = 0.0
        # When the last check failed, and why (see ensure_schema).
        self.failed_check: tuple[float, str] | None = None
        self.lock = threading.Lock()

    def ensure_schema(self) -> None:
        if self.schema_ready:
            return
        asked_at = time.monotonic()
        with self.lock:
            if self.schema_ready:
                return
            # A check ran while this request waited, and could not reach the
            # database: its answer, at once. Checking again would queue every
            # request one connect timeout behind the last on a hung database.
            if self.failed_check is not None and self.failed_check[0] >= asked_at:
                raise DatabaseUnavailable(self.failed_check[1])
            try:
                if self.is_sqlite:
                    self._upgrade_sqlite()
                else:
                    self._check_revision()
            except (DBAPIError, PoolTimeoutError) as error:
                cause = getattr(error, "orig", None) or error
                self.failed_check = (time.monotonic(), str(cause))
                raise
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
def _unavailable_as_domain_error() -> Iterator[None]:
    """Connection failures and timeouts surface as `DatabaseUnavailable`, so
    callers above never see driver exceptions for an outage."""
    try:
        yield
    except (DBAPIError, PoolTimeoutError) as error:
        if isinstance(error, DBAPIError) and not _is_unavailable(error):
            raise
        cause = getattr(error, "orig", None) or error
        logger.error("database unavailable: %s", cause)
        raise DatabaseUnavailable(str(cause)) from error


def _read_once_more_if_dropped(work: Callable[[], T]) -> T:
    """Run `work`, a read; if its connection turns out dead (a server restart
    or failover, a connection restored from a snapshot), run it once more on
    a fresh one. The pool has already discarded the dead connection then."""
    try:
        return work()
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
        logger.info("pooled connection was dead; retrying on a new one: %s", error.orig)
    return work()


def run(url: str, work: Callable[[Connection], T], *, write: bool = False) -> T:
    """`work(connection)` for ONE statement: autocommit on PostgreSQL (one
    round trip, nothing else), a short transaction on SQLite.

    `write` takes SQLite's write lock up front, and is never sent twice: if
    the connection drops, the server may have run it already (a claim would
    take a second batch, a create make a second job), so the caller gets
    `DatabaseUnavailable` (503). A read is run once more on a new connection.
    Several statements that must hold together belong in `transaction()`.
    """
    database = _database(url)
    sqlite_writer = write and database.is_sqlite
    engine = database.writer_engine if sqlite_writer else database.autocommit_engine

    def attempt() -> T:
        with engine.connect() as connection:
            if database.is_sqlite:
                with connection.begin():
                    return work(connection)
            return work(connection)

    with _unavailable_as_domain_error():
        database.ensure_schema()
        return attempt() if write else _read_once_more_if_dropped(attempt)


@contextmanager
def transaction(url: str) -> Iterator[Connection]:
    """One transaction over several statements: commit on success, roll back
    on any error. On PostgreSQL it is BEGIN … COMMIT sent on the pool's
    autocommit connection: two round trips more, and nothing else."""
    database = _database(url)
    with _unavailable_as_domain_error():
        database.ensure_schema()
        if database.is_sqlite:
            with database.writer_engine.begin() as connection:
                yield connection
            return
        with database.autocommit_engine.connect() as connection:
            connection.exec_driver_sql("BEGIN")
            try:
                yield connection
            except BaseException:
                try:
                    connection.exec_driver_sql("ROLLBACK")
                except DBAPIError:
                    connection.invalidate()  # never pool a connection mid-transaction
                raise
            connection.exec_driver_sql("COMMIT")


def ping(url: str) -> None:
    """A real round trip to the database."""
    run(url, lambda connection: connection.execute(text("SELECT 1")))


def ensure_schema(url: str) -> None:
    """Settle the schema now rather than on the first request."""
    _database(url).ensure_schema()


def drop_pooled_connections() -> None:
    """Forget every pooled connection without talking to the server.

    After a SnapStart restore the sockets in the pool belong to a snapshot
    taken long ago: closing them politely could block, so they are dropped.
    """
    with _databases_lock:
        for database in _databases.values():
            database.pooled.dispose(close=False)


def reset_engines() -> None:
    """Dispose every cached engine (tests, and after a fork)."""
    with _databases_lock:
        for database in _databases.values():
            database.pooled.dispose()
        _databases.clear()


def _register_after_restore() -> None:
    """Under SnapStart, drop the pool's connections as soon as a snapshot is
    restored. Outside SnapStart (or without the runtime's hook module), the
    idle check and the retry on a dead connection catch them on first use."""
    try:
        initialization = settings.settings_from_env().aws_lambda_initialization_type
    except settings.ConfigError:
        return  # main.create_app reports it and stops the start
    if initialization != "snap-start":
        return
    try:
        from snapshot_restore_py import register_after_restore
    except ImportError:
        return
    register_after_restore(drop_pooled_connections)


_register_after_restore()
