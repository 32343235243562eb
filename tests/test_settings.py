"""settings.py: every variable checked at start, one JSON log line per
problem, no traceback, in the real entry points (uvicorn, the Lambda import,
`make run`); `make run`'s banner and install. (docs/configuration.md's table
is checked in tests/test_manual.py.)"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import settings

ROOT = Path(__file__).resolve().parent.parent


def clean_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """A process environment with none of the service's variables but `values`."""
    env = {k: v for k, v in os.environ.items() if k not in settings.ENV_NAMES}
    env.update(PYTHONPATH=str(ROOT), DB_PATH=str(tmp_path / "jobs.db"), **values)
    return env


def problems(**values: str) -> list[str]:
    with pytest.raises(settings.ConfigError) as raised:
        settings.load_settings(values)
    return raised.value.problems


@pytest.mark.parametrize(
    ("name", "value", "wanted"),
    [
        ("DB_POOL_SIZE", "two", "valid integer"),
        ("DB_POOL_SIZE", "0", "greater than or equal to 1"),
        ("DB_MAX_OVERFLOW", "-1", "greater than or equal to 0"),
        ("DB_STATEMENT_TIMEOUT_MS", "1.5", "integer"),
        ("AUTH_DISABLED", "maybe", "1/true/yes/on or 0/false/no/off"),
        ("AUTH_REQUIRE_SCOPES", "sometimes", "1/true/yes/on or 0/false/no/off"),
        ("AUTH0_DOMAIN", "https://tenant.example.com/path", "host name"),
        ("DATABASE_URL", "mysql://user@host/db", "postgresql://"),
        ("LOG_LEVEL", "LOUD", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("METRICS_ENABLED", "maybe", "1/true/yes/on or 0/false/no/off"),
        ("METRICS_NAMESPACE", "AWS/Lambda", "not start with 'AWS/'"),
        ("METRICS_NAMESPACE", "Jobs{prod}", "at most 255 letters"),
        ("RETENTION_DAYS", "ninety", "valid integer"),
        ("RETENTION_DAYS", "0", "greater than or equal to 1"),
        ("CURSOR_SECRET", "too-short", "at least 32 characters"),
        ("DB_APP_USER", "App-Role", "lower-case letters, digits or _"),
        ("DB_MASTER_SECRET_ARN", "rds-master", "Secrets Manager secret ARN"),
        ("DB_APP_SECRET_ARN", "app-db", "Secrets Manager secret ARN"),
        ("DB_KEEPALIVES_IDLE_S", "0", "greater than or equal to 1"),
        ("DB_KEEPALIVES_COUNT", "three", "valid integer"),
        ("DB_TCP_USER_TIMEOUT_MS", "-1", "greater than or equal to 0"),
        ("DB_POOLER", "pgbouncer", "1/true/yes/on or 0/false/no/off"),
        ("DB_SSL_ROOT_CERT", "no-such-bundle.pem", "no such file"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable_and_the_fix(name, value, wanted):
    base = {"AUTH0_DOMAIN": "tenant.example.com", "AUTH0_AUDIENCE": "https://api"}
    [line] = problems(**{**base, name: value})
    assert line.startswith(name)
    assert wanted in line
    assert f"set it like {name}=" in line
    assert "\n" not in line


def test_every_problem_is_reported_at_once():
    lines = problems(DB_POOL_SIZE="x", DB_CONNECT_TIMEOUT="y")
    assert [line.split(" ")[0] for line in lines] == [
        "DB_POOL_SIZE",
        "DB_CONNECT_TIMEOUT",
        "AUTH0_DOMAIN",
        "AUTH0_AUDIENCE",
    ]


def test_a_database_password_never_appears_in_an_error():
    [line] = problems(AUTH_DISABLED="1", DATABASE_URL="mysql://app:s3cret-pw@db/x")
    assert "s3cret-pw" not in line


def test_values_are_parsed_and_blank_means_unset():
    config = settings.load_settings(
        {"AUTH_DISABLED": "yes", "DB_POOL_SIZE": " 8 ", "DB_PATH": "  "}
    )
    assert (config.auth_disabled, config.db_pool_size) == (True, 8)
    assert config.resolved_database_url == "sqlite:///extraction_jobs.db"


def test_settings_import_no_database_driver_jwt_or_http_library():
    script = (
        "import sys, settings; settings.load_settings({'AUTH_DISABLED': '1'}); "
        "print(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'jose', 'cryptography', 'httpx', 'psycopg2', 'sqlalchemy', "
        "'aws_lambda_powertools', 'botocore'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.stdout.strip() == "[]"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


EXPECTED_LINES = [
    "configuration error: DB_POOL_SIZE (got 'ten'): ",
    "configuration error: AUTH0_DOMAIN is not set and auth is on: set it like ",
    "configuration error: AUTH0_AUDIENCE is not set and auth is on: set it like ",
]


def problem_lines(stderr: str) -> list[str]:
    """The messages of the JSON log lines on stderr (every line must be one)."""
    records = [json.loads(line) for line in stderr.splitlines()]
    assert all(record["level"] == "CRITICAL" for record in records), stderr
    return [record["message"] for record in records]


def assert_one_line_per_problem(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = problem_lines(result.stderr)
    assert len(lines) == len(EXPECTED_LINES), result.stderr
    for line, start in zip(lines, EXPECTED_LINES, strict=True):
        assert line.startswith(start), result.stderr
    assert "Traceback" not in result.stderr


def start_uvicorn(tmp_path: Path, **values: str) -> subprocess.CompletedProcess:
    """`uvicorn main:app` with only `values` set, run until it exits."""
    command = [sys.executable, "-m", "uvicorn", "main:app", "--port", str(free_port())]
    command += ["--host", "127.0.0.1"]
    return subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env(tmp_path, **values),
        timeout=60,
    )


def import_lambda_handler(tmp_path: Path, **values: str) -> subprocess.CompletedProcess:
    """`import lambda_handler` in a fresh interpreter with only `values` set."""
    return subprocess.run(
        [sys.executable, "-c", "import lambda_handler"],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(tmp_path, **values),
        timeout=60,
    )


def refused_variables(result: subprocess.CompletedProcess) -> list[str]:
    """The start failed with exit code 1 and no traceback; the problem lines,
    each cut before the value it got."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    return [line.split(" (got")[0] for line in problem_lines(result.stderr)]


def test_uvicorn_refuses_to_start_with_one_line_per_problem(tmp_path):
    assert_one_line_per_problem(start_uvicorn(tmp_path, DB_POOL_SIZE="ten"))


def test_lambda_import_refuses_to_start_with_one_line_per_problem(tmp_path):
    assert_one_line_per_problem(import_lambda_handler(tmp_path, DB_POOL_SIZE="ten"))


def test_make_run_refuses_to_start_with_one_line_per_problem(tmp_path):
    """scripts/serve.py (make run) checks the settings before uvicorn starts."""
    result = subprocess.run(
        [sys.executable, "scripts/serve.py", "--port", str(free_port())],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env(tmp_path, DB_POOL_SIZE="ten"),
        timeout=60,
    )
    assert_one_line_per_problem(result)


def banner(tmp_path: Path, **values: str) -> list[str]:
    """The first two lines `make run` writes (scripts/serve.py, stopped
    before it serves by a port that is taken)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "scripts/serve.py", "--no-reload", "--port", str(port)],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=clean_env(tmp_path, AUTH_DISABLED="1", **values),
            timeout=60,
        )
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert any("address already in use" in r["message"] for r in records), records
    assert "s3cret-pw" not in result.stderr
    return [f"{r['level']} {r['message']}" for r in records[:2]]


def test_run_banner_names_the_database_in_use_without_its_password(tmp_path):
    first, second = banner(
        tmp_path, DATABASE_URL="postgresql://app:s3cret-pw@127.0.0.1:5432/jobs"
    )
    assert first == "INFO Local development: PostgreSQL at app@127.0.0.1:5432/jobs"
    assert second.startswith("WARNING AUTH IS DISABLED")
    assert banner(tmp_path)[0] == (
        f"INFO Local development: SQLite at {tmp_path / 'jobs.db'}"
    )


def test_make_run_installs_only_what_serving_needs(tmp_path):
    """A dry run on a fresh venv: requirements-run.txt, never the dev tools."""
    result = subprocess.run(
        ["make", "-n", "run", f"VENV={tmp_path / 'venv'}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    installs = re.findall(r"pip install .*-r (\S+)", result.stdout)
    assert installs == ["requirements-run.txt"]
    run_requirements = (ROOT / "requirements-run.txt").read_text()
    for tool in ("pytest", "ruff", "moto"):
        assert tool not in run_requirements
    assert "uvicorn" in run_requirements


def test_make_test_ends_saying_how_many_postgresql_tests_skipped(tmp_path):
    env = clean_env(tmp_path)
    env.pop("TEST_DATABASE_URL", None)
    env.pop("CI", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + ["tests/test_docs.py", "-k", "realistic"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout
    closing = result.stdout.strip().splitlines()[-2:]
    assert closing[0].startswith("1 PostgreSQL tests skipped: set TEST_DATABASE_URL")
    assert "1 passed, 1 skipped" in closing[1]


# --- the variables that used to be read elsewhere ------------------------------


def test_no_module_but_settings_reads_the_environment():
    """Every variable the service reads is a `Settings` field (and so a row
    of docs/configuration.md's table): no other module of the service reads os.environ."""
    readers = re.compile(r"\bos\.environ\b|\bgetenv\(|\benviron\.get\(")
    modules = [*ROOT.glob("*.py"), *(ROOT / "migrations").glob("*.py")]
    offenders = [
        f"{path.name}:{number}"
        for path in modules
        if path.name != "settings.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if readers.search(line)
    ]
    assert offenders == []


def test_logging_and_metrics_variables_parse_and_default():
    config = settings.load_settings({"AUTH_DISABLED": "1", "LOG_LEVEL": " warning "})
    assert (config.log_level, config.metrics_enabled) == ("WARNING", False)
    assert config.metrics_namespace == "ExtractionJobs"
    in_lambda = {"AUTH_DISABLED": "1", "AWS_LAMBDA_FUNCTION_NAME": "api"}
    assert settings.load_settings(in_lambda).metrics_enabled is True
    off = settings.load_settings({**in_lambda, "METRICS_ENABLED": "off"})
    assert off.metrics_enabled is False
    assert settings.load_settings({"AUTH_DISABLED": "1"}).db_app_user == (
        "extraction_app"
    )


def test_uvicorn_names_each_bad_logging_or_metrics_variable(tmp_path):
    result = start_uvicorn(
        tmp_path, AUTH_DISABLED="1", LOG_LEVEL="LOUD", METRICS_NAMESPACE="AWS/Jobs"
    )
    assert refused_variables(result) == [
        "configuration error: LOG_LEVEL",
        "configuration error: METRICS_NAMESPACE",
    ]


def test_lambda_import_names_each_bad_metrics_or_retention_variable(tmp_path):
    result = import_lambda_handler(
        tmp_path,
        AUTH_DISABLED="1",
        METRICS_ENABLED="maybe",
        RETENTION_DAYS="90d",
        AWS_LAMBDA_FUNCTION_NAME="extraction-jobs-api",
    )
    assert refused_variables(result) == [
        "configuration error: RETENTION_DAYS",
        "configuration error: METRICS_ENABLED",
    ]


def test_the_migration_function_reads_its_variables_from_settings(monkeypatch):
    import migration

    for name in settings.ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://127.0.0.1:1/jobs")
    with pytest.raises(migration.MigrationError, match="^DB_MASTER_SECRET_ARN is not"):
        migration.run()
    monkeypatch.setenv("DB_MASTER_SECRET_ARN", "rds-master")
    with pytest.raises(migration.MigrationError) as raised:
        migration.run()
    [line] = str(raised.value).splitlines()
    assert line.startswith("DB_MASTER_SECRET_ARN (got 'rds-master'): must be")
    monkeypatch.delenv("DB_MASTER_SECRET_ARN")
    assert migration.app_role_name() == "extraction_app"
    monkeypatch.setenv("DB_APP_USER", "jobs_app")
    assert migration.app_role_name() == "jobs_app"
