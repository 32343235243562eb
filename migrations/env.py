"""Alembic environment: how `alembic upgrade` reaches the database.

The URL comes from the environment as the app reads it (`DATABASE_URL`, else
the default SQLite file), or a caller hands over a connection in
`config.attributes["connection"]` (the app upgrading its own SQLite file).

The whole upgrade is one transaction under a lock, so two processes that
migrate at once queue instead of both creating the tables: PostgreSQL takes an
advisory lock, SQLite its write lock (`BEGIN IMMEDIATE`).
"""

from alembic import context
from sqlalchemy import Connection, inspect, text

import database
from db_models import metadata

# A database made by release 1's create_all: this table, no alembic_version.
LEGACY_REVISION = "0001_initial"
LEGACY_TABLE = "extraction_job"
LEGACY_COLUMNS = frozenset(
    [
        "seq",
        "id",
        "document_id",
        "status",
        "priority",
        "metadata",
        "error_message",
        "created_at",
        "updated_at",
        "created_by",
        "attempts",
        "worker_id",
        "started_at",
        "finished_at",
        "version",
        "idempotency_key",
    ]
)
MIGRATION_LOCK_ID = 0x45585452  # "EXTR": any constant shared by all migrators


def stamp_legacy_schema(connection: Connection) -> None:
    """Stamp a release-1 database at revision 1 instead of recreating it."""
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    if "alembic_version" in tables or LEGACY_TABLE not in tables:
        return
    columns = {column["name"] for column in inspector.get_columns(LEGACY_TABLE)}
    if columns != LEGACY_COLUMNS:
        raise RuntimeError(
            f"table {LEGACY_TABLE!r} exists without alembic_version but is not "
            f"release 1's schema (columns {sorted(columns)}); refusing to stamp it"
        )
    context.get_context().stamp(context.script, LEGACY_REVISION)


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite's DDL is transactional too: one transaction for the lot.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID}
            )
        stamp_legacy_schema(connection)
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("offline (--sql) migrations are not supported")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    url = context.config.attributes.get("url") or database.database_url_from_env()
    engine = database.migration_engine(url)
    try:
        with engine.connect() as connection:
            run_migrations(connection)
    finally:
        engine.dispose()


main()
