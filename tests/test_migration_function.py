"""The migration function (`lambda_handler.migrate`) as AWS runs it, locally:
the master secret is held by moto's Secrets Manager (a real server on
loopback), the database is a scratch PostgreSQL database owned by a master
role that, as on RDS, is not a superuser.

It must migrate, create the application role, and that role must read and
write jobs through the API but fail to CREATE, DROP or ALTER, asserted by
trying as that role.
"""

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from conftest import postgres_url, require
from fastapi.testclient import TestClient
from faults import PgBouncer, tool
from psycopg2.errors import InsufficientPrivilege
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.pool import NullPool
from terraform_helpers import EMULATOR_REGION, moto_server

import database
import lambda_handler
import migration
import settings
from db_models import SCHEMA_REVISIONS
from main import create_app


@pytest.fixture(scope="module")
def secrets_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


def admin_engine():
    return create_engine(
        postgres_url(), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )


def drop(admin, name: str, roles: list[str]) -> None:
    database.reset_engines()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        for role in roles:
            connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))


@pytest.fixture
def deployment(secrets_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """A scratch database owned by a non-superuser master whose password only
    the moto secret holds; the function's environment as Terraform sets it."""
    base = make_url(postgres_url())
    name = f"{base.database}_migration_fn"  # test_<x>_... locally, test_... in CI
    master, app = f"{name}_master", f"{name}_app"
    admin = admin_engine()
    drop(admin, name, [app, master])
    with admin.connect() as connection:
        # RDS has this role; a local server needs a stand-in (roles are
        # shared by the whole server, so it is created once and kept).
        connection.execute(
            text(
                "DO $$ BEGIN CREATE ROLE rds_iam NOLOGIN; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
        )
        # Like the RDS master: may create roles and databases, not a superuser.
        connection.execute(text(f'CREATE ROLE "{master}" LOGIN CREATEROLE CREATEDB'))
        connection.execute(text(f'GRANT rds_iam TO "{master}" WITH ADMIN OPTION'))
        connection.execute(text(f'CREATE DATABASE "{name}" OWNER "{master}"'))

    client = boto3.client(
        "secretsmanager",
        endpoint_url=secrets_endpoint,
        region_name=EMULATOR_REGION,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    password = secrets.token_urlsafe(24)
    secret_arn = client.create_secret(
        Name=f"rds!db-{secrets.token_hex(8)}",
        SecretString=json.dumps({"username": master, "password": password}),
    )["ARN"]

    function_env = {
        "DB_MASTER_SECRET_ARN": secret_arn,
        "DATABASE_URL": base.set(username=None, password=None, database=name)
        .render_as_string(hide_password=False)
        .replace("postgresql+psycopg2://", "postgresql://"),
        "DB_APP_USER": app,
        "AWS_REGION": EMULATOR_REGION,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": secrets_endpoint,
    }
    for key, value in function_env.items():
        monkeypatch.setenv(key, value)
    app_url = base.set(username=app, password=None, database=name)
    master_url = base.set(username=master, password=None, database=name)
    yield {
        "password": password,
        "env": function_env,
        "app": app,
        "app_url": app_url.render_as_string(hide_password=False),
        "master_url": master_url.render_as_string(hide_password=False),
        "secrets": client,
    }
    drop(admin, name, [app, master])
    admin.dispose()


def refused(url: str, statement: str) -> bool:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement))
    except ProgrammingError as error:
        assert isinstance(error.orig, InsufficientPrivilege), error
        return True
    finally:
        engine.dispose()
    return False


def run_as(url: str, statement: str):
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(statement))
            return result.all() if result.returns_rows else result.rowcount
    finally:
        engine.dispose()


def test_migrates_creates_the_role_and_the_role_has_data_access_only(
    deployment: dict, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    result = lambda_handler.migrate({}, None)
    assert result == {
        "revision_before": None,
        "revision": SCHEMA_REVISIONS[-1],
        "app_role": deployment["app"],
    }
    assert deployment["password"] not in caplog.text

    # The role: may log in (with IAM tokens on RDS), nothing privileged.
    app = deployment["app"]
    flags = run_as(
        deployment["master_url"],
        "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, "
        f"pg_has_role(rolname, 'rds_iam', 'MEMBER') FROM pg_roles WHERE rolname = '{app}'",
    )
    assert flags == [(True, False, False, False, True)]

    # The app, connected as that role, reads and writes jobs.
    app_url = deployment["app_url"]
    monkeypatch.setenv("DATABASE_URL", app_url)
    database.reset_engines()
    with TestClient(create_app()) as client:
        assert client.get("/health?deep=1").status_code == 200
        created = client.post("/extraction-jobs", json={"document_id": "a.pdf"})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        assert client.get(f"/extraction-jobs/{job_id}").status_code == 200
        updated = client.patch(
            f"/extraction-jobs/{job_id}", json={"status": "processing"}
        )
        assert updated.status_code == 200, updated.text
    database.reset_engines()

    # ...but changes no schema.
    for statement in (
        "CREATE TABLE intruder (id int)",
        "CREATE INDEX intruder_ix ON extraction_job (document_id)",
        "DROP TABLE extraction_job",
        "ALTER TABLE extraction_job ADD COLUMN intruder int",
        "ALTER TABLE extraction_job DROP COLUMN priority",
        "TRUNCATE extraction_job",
        "UPDATE alembic_version SET version_num = 'x'",
        "DELETE FROM alembic_version",
        "CREATE SCHEMA intruder",
    ):
        assert refused(app_url, statement), statement
    # DELETE only where a feature needs it (TABLE_PRIVILEGES: retention).
    assert "DELETE" in migration.TABLE_PRIVILEGES["extraction_job"]
    run_as(app_url, "DELETE FROM extraction_job WHERE document_id = 'none'")
    assert run_as(app_url, "SELECT count(*) FROM extraction_job") == [(1,)]

    # History is append-only: written and read, never changed; deleted only
    # with its job, by retention.
    assert run_as(app_url, "SELECT count(*) FROM extraction_job_event") == [(2,)]
    assert refused(app_url, "UPDATE extraction_job_event SET actor = 'forger'")
    run_as(app_url, "DELETE FROM extraction_job_event WHERE job_id IS NULL")
    for table, allowed in migration.TABLE_PRIVILEGES.items():
        granted = run_as(
            deployment["master_url"],
            "SELECT privilege_type FROM information_schema.role_table_grants "
            f"WHERE grantee = '{app}' AND table_name = '{table}' ORDER BY 1",
        )
        assert sorted(row[0] for row in granted) == sorted(allowed), table

    # The session settings a pooler cannot pass on are the role's defaults.
    [(defaults,)] = run_as(
        deployment["master_url"],
        "SELECT setconfig FROM pg_db_role_setting s JOIN pg_roles r "
        f"ON r.oid = s.setrole WHERE r.rolname = '{app}'",
    )
    assert sorted(defaults) == sorted(
        f"{name}={value}"
        for name, value in database.session_settings(
            settings.settings_from_env()
        ).items()
    )


def test_a_second_run_is_a_no_op_and_later_tables_are_covered(
    deployment: dict,
) -> None:
    lambda_handler.migrate({}, None)
    second = lambda_handler.migrate({}, None)
    assert second["revision_before"] == second["revision"] == SCHEMA_REVISIONS[-1]

    # A table a later revision creates (as the master) is usable at once...
    run_as(deployment["master_url"], "CREATE TABLE later_table (id serial, v int)")
    run_as(deployment["app_url"], "INSERT INTO later_table (v) VALUES (1)")
    run_as(deployment["app_url"], "UPDATE later_table SET v = 2")
    assert run_as(deployment["app_url"], "SELECT v FROM later_table") == [(2,)]
    # ...without DELETE unless TABLE_PRIVILEGES says so.
    assert refused(deployment["app_url"], "DELETE FROM later_table")


def test_a_failure_is_raised_with_its_text_and_no_secret(
    deployment: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = deployment["env"]["DB_MASTER_SECRET_ARN"] + "-gone"
    monkeypatch.setenv("DB_MASTER_SECRET_ARN", missing)
    with pytest.raises(Exception, match="ResourceNotFoundException"):
        lambda_handler.migrate({}, None)

    monkeypatch.setenv(
        "DB_MASTER_SECRET_ARN", deployment["env"]["DB_MASTER_SECRET_ARN"]
    )
    monkeypatch.setenv("DATABASE_URL", "postgresql://127.0.0.1:1/nowhere")
    with pytest.raises(Exception) as raised:
        lambda_handler.migrate({}, None)
    assert deployment["password"] not in str(raised.value)
    assert "127.0.0.1" in str(raised.value)


def test_master_url_keeps_the_options_and_encodes_the_password() -> None:
    url = migration.master_url(
        "postgresql://db.example.internal:5432/jobs?sslmode=require",
        "admin",
        "p@ss:w/rd#1",
    )
    parsed = make_url(url)
    assert (parsed.username, parsed.password) == ("admin", "p@ss:w/rd#1")
    assert (parsed.host, parsed.port, parsed.database) == (
        "db.example.internal",
        5432,
        "jobs",
    )
    assert parsed.query == {"sslmode": "require"}


def test_an_unsafe_role_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_APP_USER", 'app"; DROP TABLE x; --')
    with pytest.raises(migration.MigrationError, match="DB_APP_USER"):
        migration.app_role_name()


def test_the_package_leaves_boto_to_the_runtime() -> None:
    """migration.py imports botocore inside the function only."""
    source = Path(migration.__file__).read_text()
    top_level = [line for line in source.splitlines() if line.startswith("import")]
    assert not any("boto" in line for line in top_level)


def test_with_rds_proxy_the_role_logs_in_with_a_password_kept_in_its_secret(
    deployment: dict, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """RDS Proxy logs in as the application role with the password in its
    secret (Terraform makes the secret empty). The migration makes the
    password, keeps it there, and gives the role only its SCRAM verifier;
    PgBouncer, an independent SCRAM implementation, checks that the password
    opens it."""
    require(tool("pgbouncer") is not None, "pgbouncer is not installed")
    client, app = deployment["secrets"], deployment["app"]
    arn = client.create_secret(Name=f"{app}-proxy")["ARN"]  # no value, as Terraform
    monkeypatch.setenv("DB_APP_SECRET_ARN", arn)

    lambda_handler.migrate({}, None)
    stored = json.loads(client.get_secret_value(SecretId=arn)["SecretString"])
    assert stored["username"] == app
    password = stored["password"]
    assert password not in caplog.text

    superuser = postgres_url()  # pg_authid is for superusers only

    def login() -> tuple[bool, str]:
        return run_as(
            superuser,
            f"SELECT pg_has_role('{app}', 'rds_iam', 'MEMBER'), rolpassword "
            f"FROM pg_authid WHERE rolname = '{app}'",
        )[0]

    in_rds_iam, verifier = login()
    assert not in_rds_iam, "RDS refuses passwords to members of rds_iam"
    assert verifier.startswith("SCRAM-SHA-256$4096:"), "never the password itself"
    name = make_url(deployment["app_url"]).database
    bouncer = PgBouncer(name, alias=name, scram_users={app: verifier}).start()
    try:
        url = f"postgresql+psycopg2://{app}:{{}}@127.0.0.1:{bouncer.port}/{name}"
        assert run_as(url.format(password), "SELECT current_user") == [(app,)]
        with pytest.raises(OperationalError, match="SASL authentication failed"):
            run_as(url.format("not-" + password), "SELECT 1")
    finally:
        bouncer.stop()

    # Later runs keep the password; without the proxy, IAM tokens again.
    lambda_handler.migrate({}, None)
    again = json.loads(client.get_secret_value(SecretId=arn)["SecretString"])
    assert again == stored
    monkeypatch.delenv("DB_APP_SECRET_ARN")
    lambda_handler.migrate({}, None)
    assert login() == (True, None)
