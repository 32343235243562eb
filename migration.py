"""The migration function: bring the database to this code's schema, then
make the application's role match what the code needs, nothing more.

It runs as the RDS master user. RDS keeps that user's password in Secrets
Manager (`manage_master_user_password`); the function's environment names the
secret (`DB_MASTER_SECRET_ARN`), never its value, and `DATABASE_URL` names the
host and database without any user or password. botocore comes with the
Lambda runtime and is imported on this path only.

The application role (`DB_APP_USER`, default `extraction_app`) logs in with
IAM tokens (`rds_iam`) and gets SELECT, INSERT and UPDATE on the tables,
DELETE only on `DELETE_TABLES`, USAGE on the sequences: no DDL, no ownership.
The grants are made again on every run, and default privileges cover the
tables later revisions create.

Any failure is raised, so the Lambda invocation (and with it `terraform
apply`) fails with its text.
"""

import json
import logging

from sqlalchemy import Connection, text
from sqlalchemy.engine import URL, make_url

import database
import settings as config

logger = logging.getLogger("extraction_jobs.migration")

# Tables the application may DELETE from; every other table is SELECT, INSERT,
# UPDATE only. The job lifecycle's retention deletes expired jobs; its events
# table is one more line here.
DELETE_TABLES: tuple[str, ...] = ("extraction_job", "extraction_job_event")
# Read, never written, by the application (its schema check).
READ_ONLY_TABLES: tuple[str, ...] = ("alembic_version", "extraction_job_cursor_key")
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


def master_credentials(secret_arn: str) -> tuple[str, str]:
    """The master user name and password from the RDS-managed secret."""
    import botocore.session

    # arn:aws:secretsmanager:<region>:<account>:secret:<name>
    parts = secret_arn.split(":")
    if len(parts) < 7 or parts[2] != "secretsmanager":
        raise MigrationError(
            f"DB_MASTER_SECRET_ARN is not a Secrets Manager ARN: {secret_arn!r}"
        )
    client = botocore.session.get_session().create_client(
        "secretsmanager", region_name=parts[3]
    )
    secret = client.get_secret_value(SecretId=secret_arn)
    try:
        values = json.loads(secret["SecretString"])
        return values["username"], values["password"]
    except (KeyError, TypeError, ValueError):
        raise MigrationError(
            f"secret {secret_arn} does not hold a JSON username and password"
        ) from None


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


def grant_app_role(connection: Connection, role: str) -> None:
    """Create or update `role`: LOGIN through IAM, data access only."""
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
    connection.execute(text(f"ALTER ROLE {r} PASSWORD NULL"))  # IAM tokens only
    connection.execute(text(f"GRANT rds_iam TO {r}"))

    defaults = f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s}"
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
        f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {s} TO {r}",
        *(
            f"REVOKE INSERT, UPDATE ON {s}.{quote(t)} FROM {r}"
            for t in READ_ONLY_TABLES
        ),
        *(f"GRANT DELETE ON {s}.{quote(t)} TO {r}" for t in DELETE_TABLES),
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {r}",
        # Tables and sequences the master creates later get the same.
        f"{defaults} GRANT SELECT, INSERT, UPDATE ON TABLES TO {r}",
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
            grant_app_role(connection, role)
            after = connection.execute(
                text("SELECT version_num FROM alembic_version")
            ).scalar()
    finally:
        engine.dispose()
    result = {"revision_before": before, "revision": after, "app_role": role}
    logger.info("migrated: %s", json.dumps(result))
    return result
