"""Every line the service writes is one JSON object (issue 20), on stdout and
stderr alike: under `uvicorn main:app`, under `make run` (scripts/serve.py and
its reloader process) and in Lambda (where the runtime has put a plain-text
handler on the root logger), in each failure mode an operator greps for: the
database unreachable, the JWKS unreachable, the schema out of date, a
configuration error; and a normal start and stop."""

import base64
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    scratch_postgres_database,
    start_server,
    stop_server,
    wait_until_listening,
    without_make_errors,
)

import settings

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CLOSED = f"127.0.0.1:{free_port()}"  # nothing listens there
# An RS256 token with a kid: enough for the app to fetch the signing keys.
_HEADER = {"alg": "RS256", "kid": "key-1", "typ": "JWT"}
TOKEN = ".".join(
    base64.urlsafe_b64encode(part).decode().rstrip("=")
    for part in (json.dumps(_HEADER).encode(), b"{}", b"signature")
)


def environment(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in settings.ENV_NAMES}
    env.update(PYTHONPATH=f"{ROOT}:{TESTS}", DB_PATH=str(tmp_path / "jobs.db"))
    env.update(values)
    return env


def json_records(output: str) -> list[dict]:
    """Every line of `output` parsed: each must be one JSON object."""
    records = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n{output}") from None
        assert isinstance(record, dict), line
        records.append(record)
    return records


def messages(records: list[dict]) -> list[str]:
    return [record.get("message", "") for record in records]


# --- servers -------------------------------------------------------------------


def uvicorn_command(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port)]


def make_run_command(port: int) -> list[str]:
    return ["make", "-s", "run", f"PORT={port}"]


ENTRY_POINTS = {"uvicorn main:app": uvicorn_command, "make run": make_run_command}


def serve(
    command: list[str], env: dict[str, str], port: int, work: Callable[[str], None]
) -> tuple[list[dict], list[dict]]:
    """Start the server, wait for it to answer, `work(base_url)`, stop it with
    SIGINT (Ctrl-C); the JSON records of its stdout and stderr."""
    server = start_server(command, env)
    output: dict[str, str] = {}
    readers = [
        threading.Thread(
            target=lambda n=n: output.update({n: getattr(server, n).read()})
        )
        for n in ("stdout", "stderr")
    ]
    for reader in readers:
        reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_listening(server, port)
        httpx.get(f"{base}/openapi.json", timeout=60)  # answered once it serves
        work(base)
    finally:
        stop_server(server)
        for reader in readers:
            reader.join(timeout=30)
    stdout, stderr = output["stdout"], output["stderr"]
    assert server.returncode == 0, stderr
    return json_records(stdout), json_records(stderr)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_start_and_stop_are_json_lines(entry, tmp_path):
    port = free_port()
    env = environment(tmp_path, AUTH_DISABLED="1")

    def work(base: str) -> None:
        assert httpx.get(f"{base}/health").status_code == 200

    stdout, stderr = serve(ENTRY_POINTS[entry](port), env, port, work)
    assert stdout == []  # metrics are off outside Lambda: nothing on stdout
    said = messages(stderr)
    for line in ("Started server process", "Application startup complete"):
        assert any(message.startswith(line) for message in said), said
    assert any(message.startswith("Finished server process") for message in said)
    if entry == "make run":
        assert said[0] == f"Local development: SQLite at {tmp_path / 'jobs.db'}"
        assert said[1].startswith("AUTH IS DISABLED")
        assert any(m.endswith("using WatchFiles") for m in said), said
        assert any(m.startswith("Stopping reloader process") for m in said), said


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_database_unreachable_is_json_lines(entry, tmp_path):
    port = free_port()
    env = environment(
        tmp_path,
        AUTH_DISABLED="1",
        DATABASE_URL=f"postgresql://postgres@{CLOSED}/jobs",
        DB_CONNECT_TIMEOUT="2",
    )

    def work(base: str) -> None:
        assert httpx.get(f"{base}/health?deep=1").status_code == 503
        created = httpx.post(f"{base}/extraction-jobs", json={"document_id": "d"})
        assert created.status_code == 503

    _, stderr = serve(ENTRY_POINTS[entry](port), env, port, work)
    failures = [m for m in messages(stderr) if m.startswith("database unavailable")]
    assert len(failures) == 2, stderr
    assert "Connection refused" in failures[0]


def test_jwks_unreachable_is_json_lines(tmp_path):
    port = free_port()
    env = environment(
        tmp_path,
        AUTH0_DOMAIN="tenant.example.com",
        AUTH0_AUDIENCE="https://extraction-jobs.example.com",
        AUTH0_JWKS_URL=f"http://{CLOSED}/.well-known/jwks.json",
    )

    def work(base: str) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        answer = httpx.get(f"{base}/extraction-jobs", headers=headers)
        assert answer.status_code == 503

    _, stderr = serve(uvicorn_command(port), env, port, work)
    assert any(m.startswith("JWKS fetch from") for m in messages(stderr)), stderr


@pytest.fixture
def behind_head() -> Iterator[str]:
    """A PostgreSQL database with no schema yet (`make migrate` never ran)."""
    with scratch_postgres_database("json_logs") as url:
        yield url


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_schema_out_of_date_is_json_lines(entry, tmp_path, behind_head):
    port = free_port()
    env = environment(tmp_path, AUTH_DISABLED="1", DATABASE_URL=behind_head)

    def work(base: str) -> None:
        health = httpx.get(f"{base}/health?deep=1")
        assert health.json()["database"] == "schema_out_of_date"

    _, stderr = serve(ENTRY_POINTS[entry](port), env, port, work)
    assert any("this code needs" in m for m in messages(stderr)), stderr


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_configuration_error_is_json_lines(entry, tmp_path):
    result = subprocess.run(
        ENTRY_POINTS[entry](free_port()),
        cwd=ROOT,
        env=environment(tmp_path, DB_POOL_SIZE="ten"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    # make adds its own line after the service's: "make: *** [...] Error 1".
    service = "\n".join(without_make_errors(result.stderr))
    records = json_records(service)
    # make run sets AUTH_DISABLED=1, so the two AUTH0_ lines are not due there.
    expected = 1 if entry == "make run" else 3
    assert [r["level"] for r in records] == ["CRITICAL"] * expected, service
    assert messages(records)[0].startswith("configuration error: DB_POOL_SIZE")
    assert json_records(result.stdout) == []


# --- Lambda ----------------------------------------------------------------------

# What the Lambda runtime does before it imports the handler: a plain-text
# handler on the root logger. Then one invocation; its answer on stdout.
LAMBDA_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    runtime = logging.StreamHandler(sys.stdout)
    runtime.setFormatter(logging.Formatter("[%(levelname)s]\\t%(message)s"))
    logging.getLogger().addHandler(runtime)
    from lambda_events import LambdaContext, http_api_event
    from lambda_handler import handler
    headers = json.loads(sys.argv[2])
    path, _, query = sys.argv[1].partition("?")
    event = http_api_event("GET", path, query=query, headers=headers)
    answer = handler(event, LambdaContext())
    print(json.dumps({"answer": answer["statusCode"]}))
    """
)


def invoke_lambda(tmp_path: Path, path: str, headers=None, **values: str):
    env = environment(tmp_path, AWS_LAMBDA_FUNCTION_NAME="extraction-jobs-api")
    env.update(values)
    return subprocess.run(
        [sys.executable, "-c", LAMBDA_SCRIPT, path, json.dumps(headers or {})],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def lambda_records(result: subprocess.CompletedProcess) -> tuple[int, list[str]]:
    """The invocation's status code and the messages of every line written."""
    assert result.returncode == 0, result.stderr
    out, err = json_records(result.stdout), json_records(result.stderr)
    [answer] = [record["answer"] for record in out if "answer" in record]
    # stdout also carries the EMF metrics (METRICS_ENABLED is on in Lambda).
    assert all("_aws" in r for r in out if "answer" not in r), result.stdout
    return answer, messages(err)


def test_lambda_database_unreachable_is_json_lines(tmp_path):
    result = invoke_lambda(
        tmp_path,
        "/health?deep=1",
        AUTH_DISABLED="1",
        DATABASE_URL=f"postgresql://postgres@{CLOSED}/jobs",
        DB_CONNECT_TIMEOUT="2",
    )
    status, said = lambda_records(result)
    assert status == 503
    assert any(m.startswith("database unavailable") for m in said), said
    # auth.py's warning that auth is off inside Lambda, through the same.
    assert any("AUTH_DISABLED" in m for m in said), said


def test_lambda_jwks_unreachable_is_json_lines(tmp_path):
    result = invoke_lambda(
        tmp_path,
        "/extraction-jobs",
        {"authorization": f"Bearer {TOKEN}"},
        AUTH0_DOMAIN="tenant.example.com",
        AUTH0_AUDIENCE="https://extraction-jobs.example.com",
        AUTH0_JWKS_URL=f"http://{CLOSED}/.well-known/jwks.json",
    )
    status, said = lambda_records(result)
    assert status == 503
    assert any(m.startswith("JWKS fetch from") for m in said), said


def test_lambda_schema_out_of_date_is_json_lines(tmp_path, behind_head):
    result = invoke_lambda(
        tmp_path, "/health?deep=1", AUTH_DISABLED="1", DATABASE_URL=behind_head
    )
    status, said = lambda_records(result)
    assert status == 503
    assert any("this code needs" in m for m in said), said


def test_lambda_configuration_error_is_json_lines(tmp_path):
    result = invoke_lambda(tmp_path, "/health", DB_POOL_SIZE="ten")
    assert result.returncode == 1
    assert json_records(result.stdout) == []
    said = messages(json_records(result.stderr))
    assert len(said) == 3 and all(m.startswith("configuration error") for m in said)
