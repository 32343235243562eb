"""Alembic migrations on SQLite and a scratch PostgreSQL database.

The revisions must build exactly the models' schema, go down and up again,
stamp (not recreate) a database made by release 1's create_all, and the app
must refuse to serve a PostgreSQL database behind its head revision.
"""

import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import ROOT, postgres_url
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, make_url, text
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateIndex

import database
from db_models import SCHEMA_REVISIONS, metadata
from main import create_app

LEGACY_DIR = Path(__file__).parent / "legacy"
LEGACY_JOB_ID = "0b7c9a52-5a4e-4f7e-9d55-6f7f4b1d2c3e"


@pytest.fixture
def scratch_postgres() -> Iterator[str]:
    """An empty PostgreSQL database of its own, dropped afterwards."""
    base = make_url(postgres_url())
    name = f"{base.database}_migrations"
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)

    def drop() -> None:
        database.reset_engines()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    drop()
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield base.set(database=name).render_as_string(hide_password=False)
    drop()
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    return request.getfixturevalue("scratch_postgres")


def schema_differences(url: str) -> list:
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as connection, warnings.catch_warnings():
        # Alembic cannot compare expression indexes and says so; the
        # column-based ones and every column, type and constraint it compares.
        warnings.simplefilter("ignore")
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = [
            difference
            for difference in compare_metadata(context, metadata)
            if not same_sqlite_index(connection, difference)
        ]
    engine.dispose()
    return differences


def same_sqlite_index(connection, difference: tuple) -> bool:
    """SQLite reflects `priority DESC` as a plain column, so Alembic reports an
    expression index as removed and added again; compare its DDL instead."""
    kind, index = difference[0], difference[1]
    if connection.dialect.name != "sqlite" or kind not in ("add_index", "remove_index"):
        return False
    stored = connection.execute(
        text("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"),
        {"name": index.name},
    ).scalar()
    model = next(
        (i for i in metadata.tables[index.table.name].indexes if i.name == index.name),
        None,
    )
    if stored is None or model is None:
        return False
    expected = str(CreateIndex(model).compile(dialect=connection.dialect))
    return " ".join(stored.split()) == " ".join(expected.split())


def _sqlite_checks(table_sql: str) -> dict[str, str]:
    """`CONSTRAINT name CHECK (...)` clauses of a CREATE TABLE, by name."""
    checks = {}
    for match in re.finditer(r"CONSTRAINT (\w+) CHECK \(", table_sql):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(table_sql[end], 0)
            end += 1
        checks[match[1]] = " ".join(table_sql[match.end() : end - 1].split())
    return checks


def checks_and_indexes(connection, schema: str) -> dict[str, str]:
    """Every CHECK constraint and index of `schema`, by name, as the
    database itself writes them (predicates of partial indexes included):
    what Alembic's comparison cannot see."""
    if connection.dialect.name == "postgresql":
        checks = connection.execute(
            text(
                "SELECT conname, pg_get_constraintdef(c.oid) FROM pg_constraint c "
                "JOIN pg_namespace n ON n.oid = c.connamespace "
                "WHERE contype = 'c' AND nspname = :schema"
            ),
            {"schema": schema},
        ).all()
        indexes = connection.execute(
            text(
                "SELECT indexname, replace(indexdef, :prefix, '') FROM pg_indexes "
                "WHERE schemaname = :schema"
            ),
            {"schema": schema, "prefix": f"{schema}."},
        ).all()
        return {f"check {name}": sql for name, sql in checks} | {
            f"index {name}": sql for name, sql in indexes
        }
    rows = connection.execute(
        text(
            f"SELECT type, name, sql FROM {schema}.sqlite_master WHERE sql IS NOT NULL"
        )
    ).all()
    found = {}
    for kind, name, sql in rows:
        if kind == "table":
            found |= {f"check {n}": c for n, c in _sqlite_checks(sql).items()}
        elif kind == "index":
            found[f"index {name}"] = " ".join(sql.replace(f"{schema}.", "").split())
    return found


def model_checks_and_indexes(url: str) -> tuple[dict[str, str], dict[str, str]]:
    """The migrated database's CHECKs and indexes, and those the models make
    when created side by side in a scratch schema of the same database."""
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            scratch, main = "model_schema", "public"
            connection.execute(text(f"DROP SCHEMA IF EXISTS {scratch} CASCADE"))
            connection.execute(text(f"CREATE SCHEMA {scratch}"))
        else:
            scratch, main = "model_schema", "main"
            connection.execute(text(f"ATTACH DATABASE ':memory:' AS {scratch}"))
        metadata.create_all(
            connection.execution_options(schema_translate_map={None: scratch})
        )
        # Alembic's own table is no model's.
        migrated = {
            name: sql
            for name, sql in checks_and_indexes(connection, main).items()
            if "alembic_version" not in name
        }
        modelled = checks_and_indexes(connection, scratch)
        connection.rollback()
    engine.dispose()
    return migrated, modelled


def assert_models_schema(url: str) -> None:
    """The database at `url` holds exactly the models' schema."""
    assert schema_differences(url) == []
    migrated, modelled = model_checks_and_indexes(url)
    assert migrated == modelled


def revision(url: str) -> str | None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return database.schema_revision(engine)
    finally:
        engine.dispose()


def alembic_command(url: str, command_name: str, target: str) -> None:
    from alembic import command

    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["url"] = url
    getattr(command, command_name)(config, target)


def test_revisions_in_code_match_the_migrations_folder():
    script = ScriptDirectory(str(ROOT / "migrations"))
    history = [rev.revision for rev in script.walk_revisions()][::-1]
    assert tuple(history) == SCHEMA_REVISIONS
    assert script.get_heads() == [database.SCHEMA_HEAD]


def test_upgrade_of_an_empty_database_gives_exactly_the_models_schema(empty_url):
    database.upgrade_schema(empty_url)
    assert revision(empty_url) == database.SCHEMA_HEAD
    assert_models_schema(empty_url)
    # Expression indexes escape reflection; the catalogs name them all.
    catalog = {
        "sqlite": "SELECT name FROM sqlite_master WHERE type = 'index'",
        "postgresql": "SELECT indexname FROM pg_indexes WHERE tablename = 'extraction_job'",
    }
    engine = create_engine(empty_url, poolclass=NullPool)
    with engine.connect() as connection:
        names = set(connection.execute(text(catalog[engine.dialect.name])).scalars())
    engine.dispose()
    assert {index.name for index in metadata.tables["extraction_job"].indexes} <= names


def test_downgrade_to_base_and_upgrade_again(empty_url):
    database.upgrade_schema(empty_url)
    alembic_command(empty_url, "downgrade", "base")
    engine = create_engine(empty_url, poolclass=NullPool)
    assert inspect(engine).get_table_names() == ["alembic_version"]
    assert revision(empty_url) is None
    alembic_command(empty_url, "upgrade", "head")
    assert revision(empty_url) == database.SCHEMA_HEAD
    assert_models_schema(empty_url)
    engine.dispose()


def build_release_1_schema(url: str) -> None:
    """What release 1's create_all made, with one job in it."""
    engine = create_engine(url, poolclass=NullPool)
    ddl = (LEGACY_DIR / f"schema_v1_{engine.dialect.name}.sql").read_text()
    statements = [part for part in ddl.split(";") if part.strip(" \n-")]
    with engine.begin() as connection:
        for statement in statements:
            lines = [
                line for line in statement.splitlines() if not line.startswith("--")
            ]
            connection.exec_driver_sql("\n".join(lines))
        connection.execute(
            text(
                "INSERT INTO extraction_job (id, document_id, status, priority, "
                "created_at, updated_at, attempts, version) VALUES "
                "(:id, 'kept.pdf', 'pending', 3, :now, :now, 0, 1)"
            ),
            {
                "id": LEGACY_JOB_ID
                if engine.dialect.name == "postgresql"
                else LEGACY_JOB_ID.replace("-", ""),
                "now": "2026-01-01 00:00:00",
            },
        )
    engine.dispose()


def test_a_release_1_database_is_stamped_not_recreated(empty_url, monkeypatch):
    build_release_1_schema(empty_url)
    alembic_command(empty_url, "upgrade", "head")
    assert revision(empty_url) == database.SCHEMA_HEAD
    assert_models_schema(empty_url)
    monkeypatch.setenv("DATABASE_URL", empty_url)
    job = TestClient(create_app()).get(f"/extraction-jobs/{LEGACY_JOB_ID}")
    assert job.status_code == 200, job.text
    assert (job.json()["document_id"], job.json()["priority"]) == ("kept.pdf", 3)


def test_a_table_that_is_not_release_1_is_never_stamped(empty_url):
    engine = create_engine(empty_url, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(
            text("CREATE TABLE extraction_job (seq INTEGER PRIMARY KEY)")
        )
    with pytest.raises(RuntimeError, match="refusing to stamp"):
        alembic_command(empty_url, "upgrade", "head")
    assert revision(empty_url) is None
    engine.dispose()


def test_the_app_upgrades_its_own_sqlite_file_on_first_use(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    created = TestClient(create_app()).post(
        "/extraction-jobs", json={"document_id": "d"}
    )
    assert created.status_code == 201
    assert revision(url) == database.SCHEMA_HEAD


def test_an_unmigrated_postgres_database_answers_503_until_migrated(
    scratch_postgres, monkeypatch, caplog
):
    monkeypatch.setattr(database, "SCHEMA_RECHECK_S", 0.0)
    monkeypatch.setenv("DATABASE_URL", scratch_postgres)
    client = TestClient(create_app())
    caplog.set_level(logging.ERROR, logger="database")

    health = client.get("/health?deep=1")
    assert health.status_code == 503
    assert health.headers["Retry-After"]
    assert health.json() == {"status": "unavailable", "database": "schema_out_of_date"}
    listed = client.get("/extraction-jobs")
    assert listed.status_code == 503
    assert listed.headers["Retry-After"]
    assert "schema" in listed.json()["detail"]
    created = client.post("/extraction-jobs", json={"document_id": "d"})
    assert created.status_code == 503
    # The app ran no DDL: the database is still empty.
    assert (
        inspect(create_engine(scratch_postgres, poolclass=NullPool)).get_table_names()
        == []
    )
    assert f"at revision <none>, this code needs {database.SCHEMA_HEAD}" in caplog.text

    database.upgrade_schema(scratch_postgres)
    assert client.get("/health?deep=1").json() == {"status": "ok", "database": "ok"}
    assert client.post("/extraction-jobs", json={"document_id": "d"}).status_code == 201


def test_a_postgres_database_at_an_older_revision_answers_503(
    scratch_postgres, monkeypatch, caplog
):
    """Behind head is refused even when the tables exist (never half-works)."""
    database.upgrade_schema(scratch_postgres)
    engine = create_engine(scratch_postgres, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    monkeypatch.setattr(database, "SCHEMA_REVISIONS", ("older", *SCHEMA_REVISIONS))
    monkeypatch.setenv("DATABASE_URL", scratch_postgres)
    caplog.set_level(logging.ERROR, logger="database")
    response = TestClient(create_app()).get("/extraction-jobs")
    assert response.status_code == 503
    assert f"at revision older, this code needs {database.SCHEMA_HEAD}" in caplog.text
    engine.dispose()


# What a new status changes, done to the migrated database behind the
# models' back: the direct comparison must see it (Alembic's does not).
# The status is one no model has (`cancelled` is one of the models' now).
NEW_STATUS = "archived"
SCRATCH_CHANGES = {
    "check": (
        "check ck_extraction_job_status",
        {
            "postgresql": [
                "ALTER TABLE extraction_job DROP CONSTRAINT ck_extraction_job_status",
                (
                    "ALTER TABLE extraction_job ADD CONSTRAINT ck_extraction_job_status "
                    "CHECK (status IN ('pending', 'processing', 'completed', 'failed', "
                    f"'cancelled', '{NEW_STATUS}'))"
                ),
            ],
            # SQLite cannot alter a constraint; its schema text is the table's.
            "sqlite": [
                "PRAGMA writable_schema = ON",
                (
                    "UPDATE sqlite_master SET sql = replace(sql, '''cancelled'')', "
                    f"'''cancelled'', ''{NEW_STATUS}'')') WHERE name = 'extraction_job'"
                ),
                "PRAGMA writable_schema = OFF",
            ],
        },
    ),
    "partial index": (
        "index ix_extraction_job_finished",
        {
            dialect: [
                "DROP INDEX ix_extraction_job_finished",
                (
                    "CREATE INDEX ix_extraction_job_finished ON extraction_job "
                    "(finished_at) WHERE status IN "
                    f"('completed', 'failed', 'cancelled', '{NEW_STATUS}')"
                ),
            ]
            for dialect in ("postgresql", "sqlite")
        },
    ),
}


@pytest.mark.parametrize("change", SCRATCH_CHANGES)
def test_the_comparison_sees_a_changed_check_or_partial_index(empty_url, change):
    changed, statements = SCRATCH_CHANGES[change]
    database.upgrade_schema(empty_url)
    engine = create_engine(empty_url, poolclass=NullPool)
    with engine.begin() as connection:
        for statement in statements[engine.dialect.name]:
            connection.exec_driver_sql(statement)
    engine.dispose()
    migrated, modelled = model_checks_and_indexes(empty_url)
    differing = {
        name for name in migrated | modelled if migrated.get(name) != modelled.get(name)
    }
    assert differing == {changed}
    assert NEW_STATUS in migrated[changed]
    assert NEW_STATUS not in modelled[changed]
    assert schema_differences(empty_url) == []  # what Alembic alone would miss
