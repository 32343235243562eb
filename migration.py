"""The migration function: bring the database to this code's schema, then
make the application's role match what the code needs, nothing more.

It runs as the RDS master user. RDS keeps that user's password in Secrets
Manager (`manage_master_user_password`); the function's environment names the
secret (`DB_MASTER_SECRET_ARN`), never its value, and `DATABASE_URL` names the
host and database without any user or password. botocore comes with the
Lambda runtime and is imported on this path only.

The application role (`DB_APP_USER`, default `extraction_app`) logs in with
IAM tokens (`rds_iam`), or with RDS Proxy the proxy logs in as it with a
password this function makes and keeps in the proxy's secret
(`DB_APP_SECRET_ARN`). It gets what `TABLE_PRIVILEGES` says, table by table,
and USAGE on the sequences: no DDL, no ownership. The grants are made again
on every run, and default privileges cover the tables later revisions
create. Its defaults carry the session settings the app would otherwise send
at connect (`database.session_settings`), which a transaction-mode pooler
cannot pass on.

Any failure is raised, so the Lambda invocation (and with it `terraform
apply`) fails with its text.
"""

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Mapping

from sqlalchemy import Connection, text
from sqlalchemy.engine import URL, make_url

import database
import settings as config

logger = logging.getLogger("extraction_jobs.migration")

# What the application role may do, table by table; a table not named here
# gets DEFAULT_TABLE_PRIVILEGES (as do tables created later, by default).
TABLE_PRIVILEGES: dict[str, tuple[str, ...]] = {
    # DELETE: retention deletes finished jobs.
    "extraction_job": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    # History is append-only: no UPDATE. DELETE only because retention
    # deletes a finished job's events with it.
    "extraction_job_event": ("SELECT", "INSERT", "DELETE"),
    # Read, never written: the schema check, the cursor signing key.
    "alembic_version": ("SELECT",),
    "extraction_job_cursor_key": ("SELECT",),
    # One row, moved on (never added to) by every create.
    "extraction_job_create_clock": ("SELECT", "UPDATE"),
    # Events to publish: queued with a write, deleted once published.
    "extraction_job_outbox": ("SELECT", "INSERT", "DELETE"),
}
DEFAULT_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE")
# The passwords this function makes (secrets.token_urlsafe); anything else in
# the secret is replaced.
_APP_PASSWORD = re.compile(r"[A-Za-z0-9_-]{43,}")
SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
SCHEMA = "public"
# The same advisory lock as migrations/env.py: one migrator at a time.
MIGRATION_LOCK_ID = 0x45585452


class MigrationError(RuntimeError):
    """The migration could not run; the message says why (never a secret)."""


def _settings() -> config.Settings:
    """The function's variables, checked by settings.py (DB_APP_USER's role
    name rules included); a bad one fails the run with its one-line reason."""
    try:
        return config.settings_from_env()
    except config.ConfigError as error:
        raise MigrationError(str(error)) from None


def _required(name: str, value: str | None) -> str:
    if not value:
        raise MigrationError(f"{name} is not set")
    return value


def _secrets_client(secret_arn: str):
    import botocore.session

    # arn:aws:secretsmanager:<region>:<account>:secret:<name>
    parts = secret_arn.split(":")
    if len(parts) < 7 or parts[2] != "secretsmanager":
        raise MigrationError(f"not a Secrets Manager ARN: {secret_arn!r}")
    return botocore.session.get_session().create_client(
        "secretsmanager", region_name=parts[3]
    )


def master_credentials(secret_arn: str) -> tuple[str, str]:
    """The master user name and password from the RDS-managed secret."""
    client = _secrets_client(secret_arn)
    secret = client.get_secret_value(SecretId=secret_arn)
    try:
        values = json.loads(secret["SecretString"])
        return values["username"], values["password"]
    except (KeyError, TypeError, ValueError):
        raise MigrationError(
            f"secret {secret_arn} does not hold a JSON username and password"
        ) from None


def app_password(secret_arn: str, role: str) -> str:
    """The password RDS Proxy logs in as `role` with, from its secret: made
    (and stored) on the first run, the same on every later one."""
    client = _secrets_client(secret_arn)
    try:
        value = client.get_secret_value(SecretId=secret_arn)["SecretString"]
        stored = json.loads(value)
    except client.exceptions.ResourceNotFoundException:
        stored = None  # Terraform creates the secret without a value
    except ValueError:
        stored = None  # not this function's JSON: replaced
    if (
        isinstance(stored, dict)
        and stored.get("username") == role
        and _APP_PASSWORD.fullmatch(str(stored.get("password")))
    ):
        return stored["password"]
    password = secrets.token_urlsafe(32)
    # Stored before the role gets it: a run that fails between the two leaves
    # a password the next run reads and applies, never one no one knows.
    client.put_secret_value(
        SecretId=secret_arn,
        SecretString=json.dumps({"username": role, "password": password}),
    )
    logger.info("made a new password for role %s (kept in its secret)", role)
    return password


def scram_sha_256(password: str) -> str:
    """`password` as PostgreSQL stores it (RFC 7677's SCRAM-SHA-256 verifier):
    given to ALTER ROLE in this form, the password itself never reaches the
    server, its log or pg_stat_statements."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    salt_b64, stored_b64, server_b64 = (
        base64.b64encode(part).decode() for part in (salt, stored_key, server_key)
    )
    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{salt_b64}${stored_b64}:{server_b64}"


def master_url(url: str, username: str, password: str) -> str:
    """`url` (host, port, database, options) as the master user."""
    parsed = make_url(database.normalize_url(url))
    if parsed.get_backend_name() != "postgresql":
        raise MigrationError("DATABASE_URL must be a postgresql:// URL")
    as_master: URL = parsed.set(username=username, password=password)
    return as_master.render_as_string(hide_password=False)


def app_role_name() -> str:
    """`DB_APP_USER` (default `extraction_app`), a safe role name."""
    return _settings().db_app_user


def grant_app_role(
    connection: Connection,
    role: str,
    session_defaults: Mapping[str, str],
    password: str | None = None,
) -> None:
    """Create or update `role`: data access only, `session_defaults` as its
    defaults. It logs in with IAM tokens; or, given `password` (RDS Proxy's),
    with that password and not through IAM (RDS refuses passwords to members
    of rds_iam)."""
    quote = connection.dialect.identifier_preparer.quote
    r = quote(role)
    db = quote(connection.execute(text("SELECT current_database()")).scalar())
    s = quote(SCHEMA)
    master = connection.execute(text("SELECT current_user")).scalar()
    if master == role:
        raise MigrationError(
            f"the application role {role!r} cannot be the master user; "
            "choose another db_app_username"
        )

    exists = connection.execute(
        text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role}
    ).scalar()
    if not exists:
        connection.execute(text(f"CREATE ROLE {r} LOGIN"))
        logger.info("created role %s", role)
    connection.execute(text(f"ALTER ROLE {r} WITH LOGIN NOCREATEDB NOCREATEROLE"))
    if password is None:
        connection.execute(text(f"ALTER ROLE {r} PASSWORD NULL"))  # IAM tokens only
        connection.execute(text(f"GRANT rds_iam TO {r}"))
    else:
        connection.execute(text(f"REVOKE rds_iam FROM {r}"))
        # psycopg2 writes the value in as a literal (no parameters in ALTER).
        connection.exec_driver_sql(
            f"ALTER ROLE {r} PASSWORD %(verifier)s",
            {"verifier": scram_sha_256(password)},
        )
    for name, value in session_defaults.items():
        # Names and values are this code's own (database.session_settings).
        connection.execute(text(f"ALTER ROLE {r} SET {name} = '{value}'"))

    defaults = f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s}"
    default_privileges = ", ".join(DEFAULT_TABLE_PRIVILEGES)
    statements = [
        f"GRANT CONNECT ON DATABASE {db} TO {r}",
        f"GRANT USAGE ON SCHEMA {s} TO {r}",
        # No one but the owner creates in the schema (PostgreSQL < 15 lets
        # PUBLIC); a no-op with a warning when the master does not own it.
        f"REVOKE CREATE ON SCHEMA {s} FROM PUBLIC",
        f"REVOKE CREATE ON SCHEMA {s} FROM {r}",
        # Start from nothing each run, so a grant taken away stays away.
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {r}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM {r}",
        f"GRANT {default_privileges} ON ALL TABLES IN SCHEMA {s} TO {r}",
        *(
            statement
            for table, allowed in TABLE_PRIVILEGES.items()
            for statement in (
                f"REVOKE ALL ON {s}.{quote(table)} FROM {r}",
                f"GRANT {', '.join(allowed)} ON {s}.{quote(table)} TO {r}",
            )
        ),
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {r}",
        # Tables and sequences the master creates later get the same.
        f"{defaults} GRANT {default_privileges} ON TABLES TO {r}",
        f"{defaults} GRANT USAGE ON SEQUENCES TO {r}",
    ]
    for statement in statements:
        connection.execute(text(statement))

    attributes = connection.execute(
        text(
            "SELECT rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication "
            "OR rolbypassrls FROM pg_roles WHERE rolname = :role"
        ),
        {"role": role},
    ).scalar()
    owned = connection.execute(
        text(
            "SELECT c.relname FROM pg_class c JOIN pg_roles o ON o.oid = c.relowner "
            "WHERE o.rolname = :role ORDER BY 1"
        ),
        {"role": role},
    ).scalars()
    owned = list(owned)
    if attributes or owned:
        raise MigrationError(
            f"role {role!r} must hold no privileged attribute and own nothing; "
            f"it owns {owned} and privileged={attributes}: fix it by hand"
        )


def run() -> dict:
    """`alembic upgrade head` as the master user, then the application role."""
    settings = _settings()
    secret_arn = _required("DB_MASTER_SECRET_ARN", settings.db_master_secret_arn)
    role = settings.db_app_user
    username, password = master_credentials(secret_arn)
    proxy_password = (
        app_password(settings.db_app_secret_arn, role)
        if settings.db_app_secret_arn
        else None
    )
    url = master_url(
        _required("DATABASE_URL", settings.database_url), username, password
    )

    engine = database.migration_engine(url)
    try:
        before = database.schema_revision(engine)
        database.upgrade_schema(url)
        with engine.begin() as connection:
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID}
            )
            grant_app_role(
                connection, role, database.session_settings(settings), proxy_password
            )
            after = connection.execute(
                text("SELECT version_num FROM alembic_version")
            ).scalar()
    finally:
        engine.dispose()
    result = {"revision_before": before, "revision": after, "app_role": role}
    logger.info("migrated: %s", json.dumps(result))
    return result
