"""Every environment variable the service reads, validated in one place.

`load_settings()` reads them all at start (main.create_app, so both
`uvicorn main:app` and the Lambda import) and raises `ConfigError` with one
line per problem, naming the variable and how to fix it. Only pydantic is
imported here: no database driver, JWT or HTTP library (cold starts).

Adding a variable is one line in `Settings`:

    log_level: LogLevel = env("LOG_LEVEL", "INFO", "Python log level", example="DEBUG")

docs/configuration.md's table is this module's output
(`python settings.py table`); tests/test_manual.py keeps the two equal.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

DEFAULT_SQLITE_PATH = "extraction_jobs.db"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """The configuration cannot start the service; one line per problem."""

    def __init__(self, problems: list[str] | str) -> None:
        problems = [problems] if isinstance(problems, str) else problems
        super().__init__("\n".join(problems))
        self.problems = problems


def _flag(value: Any) -> Any:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("must be one of 1/true/yes/on or 0/false/no/off")
    return value


def normalize_database_url(url: str) -> str:
    """Name the psycopg2 driver explicitly: SQLAlchemy 2.1 maps a bare
    `postgresql://` to psycopg 3, and Heroku-style `postgres://` to nothing."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("must look like postgresql://user:pass@host:5432/db")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg2://{rest}"
    if scheme in ("postgresql+psycopg2", "sqlite"):
        return url
    raise ValueError(
        f"scheme {scheme!r} is not supported; use postgresql:// or sqlite://"
    )


def _auth0_domain(value: str) -> str:
    domain = value.removeprefix("https://").rstrip("/")
    if not domain or "/" in domain or " " in domain:
        raise ValueError("must be a host name such as your-tenant.eu.auth0.com")
    return domain


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_NAMESPACE_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_/#: "
)
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _metrics_namespace(value: str) -> str:
    """CloudWatch's rules for a custom namespace."""
    if (
        len(value) > 255
        or not set(value) <= _NAMESPACE_CHARACTERS
        or value.startswith("AWS/")
    ):
        raise ValueError(
            "must be at most 255 letters, digits, spaces or . - _ / # : and not "
            "start with 'AWS/'"
        )
    return value


def _role_name(value: str) -> str:
    """A PostgreSQL role name the migration can use without quoting surprises."""
    if not _ROLE_NAME.match(value):
        raise ValueError(
            "must be 1-63 lower-case letters, digits or _, not starting with a digit"
        )
    return value


def _secret_arn(value: str) -> str:
    # arn:<partition>:secretsmanager:<region>:<account>:secret:<name>
    parts = value.split(":")
    if len(parts) < 7 or parts[2] != "secretsmanager" or parts[5] != "secret":
        raise ValueError(
            "must be a Secrets Manager secret ARN "
            "(arn:aws:secretsmanager:<region>:<account>:secret:<name>)"
        )
    return value


def _ca_bundle(value: str) -> str:
    """An existing file; a relative path is taken from the code's folder."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), value)
    if not os.path.isfile(path):
        raise ValueError(
            f"no such file: {path} (fetch the bundle before `make build`, or unset it)"
        )
    return path


Flag = Annotated[bool, BeforeValidator(_flag)]
CaBundle = Annotated[str, AfterValidator(_ca_bundle)]
DatabaseUrl = Annotated[str, AfterValidator(normalize_database_url)]
Auth0Domain = Annotated[str, AfterValidator(_auth0_domain)]
LogLevel = Annotated[str, AfterValidator(_log_level)]
MetricsNamespace = Annotated[str, AfterValidator(_metrics_namespace)]
RoleName = Annotated[str, AfterValidator(_role_name)]
SecretArn = Annotated[str, AfterValidator(_secret_arn)]


def env(
    name: str,
    default: Any,
    meaning: str,
    *,
    example: str,
    shown_default: str | None = None,
    secret: bool = False,
    **constraints: Any,
) -> Any:
    """One environment variable: its name, default, meaning and an example value.

    `shown_default` is the table's wording when the default is not a plain value;
    `secret` keeps the value out of error messages (it may hold a password).
    """
    return Field(
        default,
        alias=name,
        description=meaning,
        json_schema_extra={
            "example": example,
            "shown_default": shown_default,
            "secret": secret,
        },
        **constraints,
    )


class Settings(BaseModel):
    """The service's configuration, one field per environment variable."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    database_url: DatabaseUrl | None = env(
        "DATABASE_URL",
        None,
        "`postgresql://user:pass@host:5432/db` (or `postgres://`; the psycopg2 "
        "driver is named for you), or `sqlite:///path`. Wins over `DB_PATH`",
        example="postgresql://postgres@127.0.0.1:5432/extraction_jobs",
        shown_default="unset",
        secret=True,
    )
    db_path: str = env(
        "DB_PATH",
        DEFAULT_SQLITE_PATH,
        "SQLite file when `DATABASE_URL` is unset; `:memory:` keeps data for the "
        "life of the process",
        example="/tmp/jobs.db",
    )
    db_pool_size: int = env(
        "DB_POOL_SIZE",
        2,
        "PostgreSQL connections per process (right for Lambda; raise it for a "
        "long-running server)",
        example="2",
        ge=1,
    )
    db_max_overflow: int = env(
        "DB_MAX_OVERFLOW",
        0,
        "extra PostgreSQL connections beyond the pool",
        example="0",
        ge=0,
    )
    db_pool_timeout: int = env(
        "DB_POOL_TIMEOUT",
        10,
        "seconds to wait for a pooled connection before answering 503",
        example="10",
        ge=1,
    )
    db_connect_timeout: int = env(
        "DB_CONNECT_TIMEOUT",
        5,
        "seconds to wait for a PostgreSQL connection",
        example="5",
        ge=1,
    )
    db_statement_timeout_ms: int = env(
        "DB_STATEMENT_TIMEOUT_MS",
        10_000,
        "PostgreSQL `statement_timeout`; a query over it is cancelled and answered 503",
        example="10000",
        ge=1,
    )
    db_keepalives_idle_s: int = env(
        "DB_KEEPALIVES_IDLE_S",
        5,
        "seconds a PostgreSQL connection is idle (or waits for an answer) before "
        "TCP keepalive probes start",
        example="5",
        ge=1,
    )
    db_keepalives_interval_s: int = env(
        "DB_KEEPALIVES_INTERVAL_S",
        2,
        "seconds between TCP keepalive probes",
        example="2",
        ge=1,
    )
    db_keepalives_count: int = env(
        "DB_KEEPALIVES_COUNT",
        3,
        "unanswered TCP keepalive probes after which the connection is dead",
        example="3",
        ge=1,
    )
    db_tcp_user_timeout_ms: int = env(
        "DB_TCP_USER_TIMEOUT_MS",
        5_000,
        "TCP `tcp_user_timeout`: a PostgreSQL connection whose sent data (or "
        "keepalive probes) went unacknowledged this long is dead, as in a network "
        "partition; `0` leaves it to the kernel (about 15 minutes)",
        example="5000",
        ge=0,
    )
    db_pooler: Flag = env(
        "DB_POOLER",
        False,
        "`1`: a transaction-mode pooler (RDS Proxy, PgBouncer) sits in front of "
        "PostgreSQL, so connections keep no session state: no prepared statements, "
        "no `SET`, no startup options (the migration puts `statement_timeout`, "
        "`TimeZone` and `plan_cache_mode` in the application role's defaults)",
        example="1",
        shown_default="unset",
    )
    db_ssl_root_cert: CaBundle | None = env(
        "DB_SSL_ROOT_CERT",
        None,
        "a CA bundle (PEM file; a relative path is next to the code, as in "
        "`lambda.zip`) to verify the PostgreSQL server's certificate and host name "
        "against: `sslmode=verify-full`. Unset: the URL's `sslmode` (Terraform's "
        "is `require`: encrypted, the server not authenticated)",
        example="rds-ca-bundle.pem",
        shown_default="unset",
    )
    db_ping_after_idle_s: float = env(
        "DB_PING_AFTER_IDLE_S",
        30,
        "a pooled PostgreSQL connection idle longer than this is checked "
        "(`SELECT 1`) before use; `0` checks every reuse",
        example="30",
        ge=0,
        allow_inf_nan=False,
    )
    auth_disabled: Flag = env(
        "AUTH_DISABLED",
        False,
        "`1`/`true`/`yes`/`on` turns token checks off: local use only (`make run` "
        "sets it; inside Lambda every cold start logs a warning while it is set)",
        example="0",
        shown_default="unset (auth on)",
    )
    auth0_domain: Auth0Domain | None = env(
        "AUTH0_DOMAIN",
        None,
        "your tenant's domain, e.g. `your-tenant.eu.auth0.com`",
        example="your-tenant.eu.auth0.com",
        shown_default="none, required with auth on",
    )
    auth0_audience: str | None = env(
        "AUTH0_AUDIENCE",
        None,
        "the API identifier in Auth0",
        example="https://extraction-jobs.example.com",
        shown_default="none, required with auth on",
    )
    auth0_issuer: str | None = env(
        "AUTH0_ISSUER",
        None,
        "expected `iss`, matched exactly (trailing slash included)",
        example="https://your-tenant.eu.auth0.com/",
        shown_default="`https://$AUTH0_DOMAIN/`",
    )
    auth0_jwks_url: str | None = env(
        "AUTH0_JWKS_URL",
        None,
        "where the signing keys are fetched",
        example="https://your-tenant.eu.auth0.com/.well-known/jwks.json",
        shown_default="`https://$AUTH0_DOMAIN/.well-known/jwks.json`",
    )
    auth0_console_client_id: str | None = env(
        "AUTH0_CONSOLE_CLIENT_ID",
        None,
        "Client ID of an Auth0 Single Page Application: turns on the console's "
        '"Sign in with Auth0" (Authorization Code with PKCE, no client secret); '
        "unset: the console takes a pasted access token only",
        example="k3B2cS0nS0leCl1entIdExample0000",
        shown_default="unset",
        pattern=r"^[A-Za-z0-9_.-]{1,128}$",
    )
    auth_require_scopes: Flag = env(
        "AUTH_REQUIRE_SCOPES",
        True,
        "`0` turns the permission check off, for tenants without RBAC",
        example="1",
        shown_default="`1`",
    )
    api_gateway_base_path: str = env(
        "API_GATEWAY_BASE_PATH",
        "/",
        "the stage name when the HTTP API is deployed on a named stage",
        example="prod",
        shown_default="unset",
    )
    retention_days: int | None = env(
        "RETENTION_DAYS",
        None,
        "the sweep deletes finished jobs (completed, failed or cancelled) and "
        "their events, finished more than this many days ago (1..36500)",
        example="90",
        shown_default="unset (keep forever)",
        ge=1,
        le=36_500,
    )
    cursor_secret: str | None = env(
        "CURSOR_SECRET",
        None,
        "key for signing list cursors, 32+ characters; unset: a random key the "
        "migration stored in the database",
        example="a-long-random-string-of-32-characters-or-more",
        shown_default="unset",
        secret=True,
        min_length=32,
    )
    db_iam_auth: Flag = env(
        "DB_IAM_AUTH",
        False,
        "`1` (set by Terraform): PostgreSQL with IAM database authentication; each "
        "new connection signs a fresh token (botocore's `generate_db_auth_token`, "
        "with `AWS_REGION` and the function's credentials) for the URL's host, port "
        "and user and uses it as the password, so `DATABASE_URL` holds none. "
        "Unset: the URL's password, as always",
        example="1",
        shown_default="unset",
    )
    db_master_secret_arn: SecretArn | None = env(
        "DB_MASTER_SECRET_ARN",
        None,
        "migration function only (set by Terraform): the Secrets Manager secret "
        "holding the RDS master user's name and password",
        example="arn:aws:secretsmanager:us-east-1:123456789012:secret:rds-master",
        shown_default="unset",
    )
    db_app_secret_arn: SecretArn | None = env(
        "DB_APP_SECRET_ARN",
        None,
        "migration function only (set by Terraform with `enable_rds_proxy`): the "
        "Secrets Manager secret RDS Proxy logs in with; the migration gives the "
        "application role a password and keeps it there (no IAM login then)",
        example="arn:aws:secretsmanager:us-east-1:123456789012:secret:app-db",
        shown_default="unset",
    )
    db_app_user: RoleName = env(
        "DB_APP_USER",
        "extraction_app",
        "migration function only (set by Terraform): the application's database "
        "role it creates and grants",
        example="extraction_app",
        shown_default="`extraction_app`",
    )
    aws_region: str | None = env(
        "AWS_REGION",
        None,
        "set by the Lambda runtime; the region `DB_IAM_AUTH` signs tokens for "
        "(else botocore's configured region)",
        example="us-east-1",
        shown_default="unset",
    )
    aws_lambda_function_name: str | None = env(
        "AWS_LAMBDA_FUNCTION_NAME",
        None,
        "set by the Lambda runtime, never by hand; names the function in the "
        "`AUTH_DISABLED` warning",
        example="extraction-jobs-api",
        shown_default="unset",
    )
    aws_lambda_initialization_type: str | None = env(
        "AWS_LAMBDA_INITIALIZATION_TYPE",
        None,
        "set by the Lambda runtime, never by hand; `snap-start` makes the pool "
        "drop its connections after a SnapStart restore",
        example="on-demand",
        shown_default="unset",
    )
    event_bus_name: str | None = env(
        "EVENT_BUS_NAME",
        None,
        "the EventBridge bus each job's outcomes (job.completed, job.failed, "
        "job.cancelled, job.retried) are published to, at least once (set by "
        "Terraform); unset: nothing is published",
        example="extraction-jobs",
        shown_default="unset",
        min_length=1,
        max_length=256,
    )
    aws_endpoint_url_events: str | None = env(
        "AWS_ENDPOINT_URL_EVENTS",
        None,
        "the EventBridge endpoint to publish to instead of AWS's (a test double "
        "such as moto); botocore's own `AWS_ENDPOINT_URL_EVENTBRIDGE` and "
        "`AWS_ENDPOINT_URL` work too",
        example="http://127.0.0.1:5000",
        shown_default="unset",
    )
    log_level: LogLevel = env(
        "LOG_LEVEL",
        "INFO",
        "the request log's level: `DEBUG`, `INFO`, `WARNING`, `ERROR` or "
        "`CRITICAL` (any case)",
        example="DEBUG",
    )
    metrics_enabled: Flag = env(
        "METRICS_ENABLED",
        False,
        "`1` prints CloudWatch EMF metrics to stdout (under uvicorn too), `0` "
        "turns them off",
        example="1",
        shown_default="`1` in Lambda (`AWS_LAMBDA_FUNCTION_NAME` set), else `0`",
    )
    metrics_namespace: MetricsNamespace = env(
        "METRICS_NAMESPACE",
        "ExtractionJobs",
        "the CloudWatch namespace of the metrics (not starting with `AWS/`)",
        example="ExtractionJobs",
    )

    @model_validator(mode="before")
    @classmethod
    def _metrics_on_in_lambda(cls, data: Any) -> Any:
        """METRICS_ENABLED unset: on in Lambda, off elsewhere."""
        if isinstance(data, dict) and "METRICS_ENABLED" not in data:
            in_lambda = bool(data.get("AWS_LAMBDA_FUNCTION_NAME"))
            data = {**data, "METRICS_ENABLED": in_lambda}
        return data

    @property
    def resolved_database_url(self) -> str:
        """`DATABASE_URL` when set, else SQLite at `DB_PATH`."""
        if self.database_url:
            return self.database_url
        path = self.db_path
        return "sqlite://" if path == ":memory:" else f"sqlite:///{path}"

    def describe_database(self) -> str:
        """The database in use, in words, without its password."""
        from sqlalchemy.engine import make_url  # not at import: cold start

        url = make_url(self.resolved_database_url)
        if url.get_backend_name() == "sqlite":
            where = url.database or ":memory:"
            if where != ":memory:":
                where = os.path.abspath(where)
            return f"SQLite at {where}"
        host = f"{url.host or 'localhost'}:{url.port or 5432}"
        user = f"{url.username}@" if url.username else ""
        return f"PostgreSQL at {user}{host}/{url.database or ''}"


ENV_NAMES: dict[str, str] = {
    field.alias: name for name, field in Settings.model_fields.items()
}


def _extra(name: str) -> dict[str, Any]:
    return Settings.model_fields[ENV_NAMES[name]].json_schema_extra  # type: ignore[return-value]


def _raw(environ: Mapping[str, str]) -> dict[str, str]:
    """The service's variables that are set; blank counts as unset."""
    return {
        name: environ[name].strip()
        for name in ENV_NAMES
        if environ.get(name, "").strip()
    }


def _describe(error: dict[str, Any], raw: dict[str, str]) -> str:
    name = str(error["loc"][0])
    extra = _extra(name)
    message = error["msg"].removeprefix("Value error, ")
    shown = "" if extra["secret"] else f" (got {raw.get(name, '')!r})"
    return (
        f"{name}{shown}: {message}; set it like {name}={extra['example']}, "
        "or unset it for the default"
    )


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Every variable parsed and checked on its own; ConfigError lists each bad one."""
    raw = _raw(os.environ if environ is None else environ)
    try:
        return Settings.model_validate(raw)
    except ValidationError as error:
        raise ConfigError([_describe(item, raw) for item in error.errors()]) from None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """What the service starts with: every variable valid, and together complete."""
    raw = _raw(os.environ if environ is None else environ)
    problems: list[str] = []
    try:
        settings = settings_from_env(raw)
    except ConfigError as error:
        problems += error.problems
        settings = None
    try:
        auth_disabled = _flag(raw.get("AUTH_DISABLED", "0"))
    except ValueError:
        auth_disabled = True  # already reported; do not pile on
    if not auth_disabled:
        for name in ("AUTH0_DOMAIN", "AUTH0_AUDIENCE"):
            if name not in raw:
                problems.append(
                    f"{name} is not set and auth is on: set it like "
                    f"{name}={_extra(name)['example']}, or AUTH_DISABLED=1 for "
                    "local development only"
                )
    if problems:
        raise ConfigError(problems)
    assert settings is not None
    return settings


def exit_on_config_error(error: ConfigError) -> None:
    """Stop the start: one JSON log line per problem on stderr, no traceback."""
    from observability import logger  # not at import: only pydantic there

    for problem in error.problems:
        logger.critical("configuration error: %s", problem)
    raise SystemExit(1)


def markdown_table() -> str:
    """docs/configuration.md's table of the variables."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for field in Settings.model_fields.values():
        extra = field.json_schema_extra
        assert isinstance(extra, dict)
        default = extra["shown_default"] or f"`{field.default}`"
        rows.append(f"| `{field.alias}` | {default} | {field.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "table":
        print(markdown_table(), end="")
    else:
        sys.exit("usage: python settings.py table")
