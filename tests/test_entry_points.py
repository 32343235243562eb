"""What the entry points around the service say (issue 20): `make migrate`
names the database and the revisions, `make plan` needs only what planning
needs and says in one line what is missing, `scripts/invoke_local.py` prints
the response apart from the logs."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require, scratch_postgres_database, without_make_errors
from sqlalchemy.engine import make_url
from terraform_helpers import require_terraform
from test_tf_mirror import environment as terraform_environment
from test_tf_mirror import find_mirror

import database
import settings

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
HEAD = database.SCHEMA_HEAD


def clean_env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in settings.ENV_NAMES}
    env.update(DB_PATH=str(tmp_path / "jobs.db"), **values)
    return env


def make(target: str, env: dict[str, str], cwd: Path = ROOT):
    return subprocess.run(
        ["make", "-s", target],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


# --- make migrate -------------------------------------------------------------


def test_make_migrate_says_which_database_and_which_revisions(tmp_path):
    env = clean_env(tmp_path)
    first = make("migrate", env)
    assert first.returncode == 0, first.stderr
    where = f"SQLite at {tmp_path / 'jobs.db'}"
    assert first.stdout.splitlines() == [
        f"make migrate: {where}: upgrading from <none> (never migrated) to {HEAD}",
        f"make migrate: {where} is now at {HEAD}",
    ]
    again = make("migrate", env)
    assert again.stdout.splitlines() == [
        f"make migrate: {where} is already at head ({HEAD}); nothing to do"
    ]
    assert first.stderr == again.stderr == ""


@pytest.fixture
def scratch_postgres() -> Iterator[str]:
    with scratch_postgres_database("make_migrate") as url:
        yield url


def test_make_migrate_on_postgresql_from_a_revision_without_the_password(
    tmp_path, scratch_postgres
):
    from alembic import command

    command.upgrade(database._alembic_config(url=scratch_postgres), "0001_initial")
    url = make_url(scratch_postgres).set(password="s3cret-pw")  # trust auth: ignored
    result = make(
        "migrate", clean_env(tmp_path, DATABASE_URL=url.render_as_string(False))
    )
    assert result.returncode == 0, result.stderr
    where = f"PostgreSQL at {url.username}@{url.host}:{url.port}/{url.database}"
    assert result.stdout.splitlines()[0] == (
        f"make migrate: {where}: upgrading from 0001_initial to {HEAD}"
    )
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_make_migrate_with_the_database_unreachable_is_one_line(tmp_path):
    url = "postgresql://app:s3cret-pw@127.0.0.1:9/jobs"  # the discard port: closed
    result = make("migrate", clean_env(tmp_path, DATABASE_URL=url))
    assert result.returncode != 0
    assert result.stdout == ""
    [line] = without_make_errors(result.stderr)
    assert line.startswith(
        "make migrate: cannot reach PostgreSQL at app@127.0.0.1:9/jobs"
    )
    assert "s3cret-pw" not in result.stderr


# --- make plan ------------------------------------------------------------------


def test_make_plan_installs_no_python_packages(tmp_path):
    dry = subprocess.run(
        ["make", "-n", "plan", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "pip" not in dry.stdout and "venv" not in dry.stdout, dry.stdout
    assert "scripts/terraform.sh plan" in dry.stdout


@pytest.fixture
def planning_copy(tmp_path: Path) -> Path:
    """The Makefile, scripts/ and terraform/ (no state, no variables) in a
    folder of their own, where terraform init finds the provider mirror."""
    require_terraform()
    mirror = find_mirror(terraform_environment())
    require(mirror.stdout.strip() != "", "no Terraform provider mirror on this machine")
    shutil.copy(ROOT / "Makefile", tmp_path)
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copytree(
        ROOT / "terraform",
        tmp_path / "terraform",
        ignore=shutil.ignore_patterns(".terraform", "*.tfstate*", "*.tfvars"),
    )
    with zipfile.ZipFile(tmp_path / "lambda.zip", "w") as package:
        package.writestr("lambda_handler.py", "")
    return tmp_path


def no_aws_credentials(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in terraform_environment().items()
        if not k.startswith(("AWS_", "TF_VAR_auth0"))
    }
    env.update(
        HOME=str(home),
        AWS_CONFIG_FILE=str(home / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",  # nor an instance role
    )
    return env


def test_make_plan_without_tfvars_says_what_to_do_in_one_line(planning_copy):
    result = make("plan", no_aws_credentials(planning_copy), cwd=planning_copy)
    assert result.returncode != 0
    wanted = (
        "terraform/terraform.tfvars not found: cp terraform/terraform.tfvars.example "
        "terraform/terraform.tfvars and fill in auth0_domain and auth0_audience"
    )
    assert without_make_errors(result.stderr) == [wanted], result.stderr
    assert "Enter a value" not in result.stdout  # no Terraform prompt


def test_make_plan_without_lambda_zip_says_what_to_do_in_one_line(planning_copy):
    module = planning_copy / "terraform"
    shutil.copy(module / "terraform.tfvars.example", module / "terraform.tfvars")
    (planning_copy / "lambda.zip").unlink()
    result = make("plan", no_aws_credentials(planning_copy), cwd=planning_copy)
    assert result.returncode != 0
    assert without_make_errors(result.stderr) == [
        "lambda.zip not found: run make build first (make deploy builds it itself)"
    ], result.stderr


def test_make_plan_without_aws_credentials_ends_on_a_line_of_ours(planning_copy):
    module = planning_copy / "terraform"
    shutil.copy(module / "terraform.tfvars.example", module / "terraform.tfvars")
    result = make("plan", no_aws_credentials(planning_copy), cwd=planning_copy)
    assert result.returncode != 0
    lines = without_make_errors(result.stderr)
    assert "No valid credential sources found" in result.stderr  # the provider's
    assert lines[-1].startswith("no AWS credentials found: set AWS_PROFILE"), lines
    assert sum("AWS_PROFILE" in line for line in lines) == 1


# --- scripts/invoke_local.py -------------------------------------------------------


def invoke(tmp_path: Path, *args: str, **values: str):
    return subprocess.run(
        [sys.executable, "scripts/invoke_local.py", *args],
        cwd=ROOT,
        env=clean_env(tmp_path, AUTH_DISABLED="1", **values),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_invoke_local_json_chains_and_keeps_logs_on_stderr(tmp_path):
    body = '{"document_id": "invoice-42.pdf", "priority": 5}'
    created = invoke(
        tmp_path,
        "POST",
        "/extraction-jobs",
        "--body",
        body,
        "--json",
        "--show-event",
        METRICS_ENABLED="1",  # EMF lines would go to stdout: not here
    )
    answer = json.loads(created.stdout)  # the whole of stdout: one object
    assert answer["statusCode"] == 201
    assert answer["headers"]["etag"] == '"1"'
    assert answer["body"]["document_id"] == "invoice-42.pdf"
    logged = created.stderr.split("\n}\n", 1)[1]  # after the event, JSON lines
    assert any(
        json.loads(line).get("message") == "request" for line in logged.splitlines()
    )

    job_id = answer["body"]["id"]
    shown = invoke(tmp_path, "GET", f"/extraction-jobs/{job_id}").stdout
    status, rest = shown.split("\n", 1)
    headers, decoded = rest.split("\n\n", 1)
    assert status == "HTTP 200"
    assert "content-type: application/json" in headers.splitlines()
    assert json.loads(decoded)["id"] == job_id


# --- make sweep (two fixes the lead makes in repository.py and main.run_sweep) --


def sweep(tmp_path: Path) -> tuple[dict, dict]:
    """`make sweep` on the SQLite file: its counts, and its `job gauges` line."""
    result = make("sweep", clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    [gauges] = [line for line in lines if line["message"] == "job gauges"]
    return json.loads(result.stdout), gauges


def test_make_sweep_logs_no_oldest_pending_age_when_none_waits(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from main import create_app

    monkeypatch.setenv("DB_PATH", str(tmp_path / "jobs.db"))
    monkeypatch.setenv("AUTH_DISABLED", "1")
    stats = TestClient(create_app()).get("/extraction-jobs/stats").json()
    _, gauges = sweep(tmp_path)
    assert stats["oldest_pending_age_seconds"] is None
    # Powertools' formatter leaves a null field out of the line.
    assert gauges.get("oldest_pending_age_seconds") is None


def test_make_sweep_fails_a_last_expired_lease_as_one_attempt(tmp_path, monkeypatch):
    import sqlite3

    from fastapi.testclient import TestClient

    from main import create_app

    monkeypatch.setenv("DB_PATH", str(tmp_path / "jobs.db"))
    monkeypatch.setenv("AUTH_DISABLED", "1")
    client = TestClient(create_app())
    job = client.post(
        "/extraction-jobs", json={"document_id": "d.pdf", "max_attempts": 1}
    ).json()
    client.post("/extraction-jobs/claim", json={"worker_id": "w", "lease_seconds": 10})
    with sqlite3.connect(tmp_path / "jobs.db") as connection:  # the lease ran out
        connection.execute(
            "UPDATE extraction_job SET lease_expires_at = '2000-01-01 00:00:00.000000'"
        )
    counts, _ = sweep(tmp_path)
    assert counts["leases_failed"] == 1
    failed = client.get(f"/extraction-jobs/{job['id']}").json()
    assert failed["status"] == "failed"
    assert failed["error_message"] == "lease expired after 1 attempt"
