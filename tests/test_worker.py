"""The reference worker (scripts/worker.py, issue 22) as its users run it: a
subprocess against a live `uvicorn main:app`, on SQLite and PostgreSQL.

Commands are short shell lines; where a test needs to know that a command was
killed, the command would have created a marker file had it gone on.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from conftest import BACKENDS, backend_url
from jose import jwt
from jwks_server import JwksServer, RsaTestKey, use_jwks
from pydantic_core import to_json
from sqlalchemy import delete
from test_settings import free_port

import auth
import database
import models
from db_models import EVENTS, JOBS

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "scripts" / "worker.py"
DOCS = ROOT / "docs" / "workers.md"
PYTHON = sys.executable
LEASE = 10  # the API's shortest: heartbeats every 3.3 s

sys.path.insert(0, str(WORKER.parent))
import worker

# --- a live server ------------------------------------------------------------


def server_env(**values: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AUTH0_", "DATABASE_URL", "DB_PATH", "API_TOKEN"))
    }
    return env | values


class Server:
    """`uvicorn main:app` on a free port until stopped."""

    def __init__(self, database_url: str, log: Path, port: int | None = None, **env):
        self.database_url = database_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = server_env(DATABASE_URL=database_url, **env)
        self.process: subprocess.Popen | None = None

    def start(self) -> "Server":
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "uvicorn", "main:app", "--host", "127.0.0.1"]
                + ["--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                # Deep: the database answers and the schema is made, so the
                # tests can empty its tables (a shallow /health touches neither).
                ready = httpx.get(f"{self.url}/health?deep=1", timeout=2)
                if ready.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    live = Server(backend_url(request.param, folder), folder / "uvicorn.log")
    live.start()
    yield live
    live.stop()


@pytest.fixture
def api(server):
    """A client of the live server, whose database holds no jobs."""
    with database.get_engine(server.database_url).begin() as connection:
        connection.execute(delete(JOBS))
        connection.execute(delete(EVENTS))
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def create(api, document_id="doc.pdf", **fields) -> dict:
    response = api.post("/extraction-jobs", json={"document_id": document_id, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def get(api, job: dict) -> dict:
    return api.get(f"/extraction-jobs/{job['id']}").json()


def event_types(api, job: dict) -> list[str]:
    return [
        event["type"]
        for event in api.get(f"/extraction-jobs/{job['id']}/events").json()
    ]


def wait_until(condition, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


# --- the worker as a subprocess -------------------------------------------------


def worker_args(url: str, command: str, *extra: str) -> list[str]:
    return [PYTHON, str(WORKER), "--api", url, "--worker-id", "test-worker"] + [
        "--command",
        command,
        "--lease-seconds",
        str(LEASE),
        *extra,
    ]


def worker_env(**values: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "API_TOKEN"} | values


def run(args: list[str], *, cwd: Path, env=None, timeout=60):
    """A program run until it exits, its output captured."""
    return subprocess.run(
        args,
        check=False,
        cwd=cwd,
        env=env or worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_worker(url: str, command: str, *extra: str, cwd: Path, env=None):
    """The worker with --once, run until it exits."""
    return run(worker_args(url, command, "--once", *extra), cwd=cwd, env=env)


def start_worker(url: str, command: str, *, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        worker_args(url, command, "--once"),
        cwd=cwd,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def log_records(stderr: str) -> list[dict]:
    """Every stderr line is one JSON object."""
    records = []
    for line in stderr.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n{stderr}") from None
    assert all(record["service"] == "extraction_worker" for record in records)
    return records


def messages(stderr: str) -> list[str]:
    return [record["message"] for record in log_records(stderr)]


def processing(api, job: dict) -> bool:
    return get(api, job)["status"] == "processing"


# --- results --------------------------------------------------------------------


def test_a_json_object_on_stdout_becomes_the_result(api, server, tmp_path):
    """Placeholders arrive shell-quoted, the job's JSON on stdin; the token
    reaches neither the command nor the logs, and no job data is logged."""
    secret = f"jobdata-{os.urandom(8).hex()}"
    hostile = "it's $(touch pwned) `touch pwned`; rm -rf x.pdf"
    job = create(api, hostile, metadata={"pages": 3, "secret": secret})
    script = (
        "import json, os, sys; job = json.load(sys.stdin); print(json.dumps("
        "{'document': sys.argv[1], 'id': sys.argv[2], 'pages': job['metadata']['pages'],"
        " 'secret': job['metadata']['secret'], 'token': os.environ.get('API_TOKEN')}))"
    )
    token = f"token-{os.urandom(8).hex()}"
    done = run_worker(
        server.url,
        f'{PYTHON} -c "{script}" {{document_id}} {{id}}',
        cwd=tmp_path,
        env=worker_env(API_TOKEN=token),
    )
    assert done.returncode == 0, done.stderr
    finished = get(api, job)
    assert finished["status"] == "completed"
    assert finished["worker_id"] == "test-worker"
    assert finished["result"] == {
        "document": hostile,
        "id": job["id"],
        "pages": 3,
        "secret": secret,
        "token": None,
    }
    assert not (tmp_path / "pwned").exists()
    assert "job completed" in messages(done.stderr)
    assert secret not in done.stderr and token not in done.stderr


def test_other_output_is_kept_as_stdout_bounded_to_the_result_limit(
    api, server, tmp_path
):
    """Plain text, a JSON object the API cannot store (NaN), and more text
    than 64 KiB, which is cut to fit as the API measures it."""
    jobs = {name: create(api, name) for name in ("plain", "nan", "big", "silent")}
    big = 'é"\\\x01' * 40_000  # every character costs more than a byte in JSON
    command = (
        "case {document_id} in "
        "plain) echo 'hello world';; "
        "nan) echo '{\"x\": NaN}';; "
        f"big) {PYTHON} big.py;; "
        "*) ;; esac"
    )
    (tmp_path / "big.py").write_text(f"print({big!r}, end='')")
    done = run_worker(server.url, command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = {name: get(api, job)["result"] for name, job in jobs.items()}
    assert results["plain"] == {"stdout": "hello world\n"}
    assert results["nan"] == {"stdout": '{"x": NaN}\n'}
    assert results["silent"] is None
    assert list(results["big"]) == ["stdout"]
    kept = results["big"]["stdout"]
    assert kept.startswith(big[:1000]) and kept.endswith(worker.TRUNCATED)
    size = len(to_json(results["big"]))
    assert models.MAX_METADATA_BYTES - 16 < size <= models.MAX_METADATA_BYTES
    assert all(get(api, job)["status"] == "completed" for job in jobs.values())


# --- leases -----------------------------------------------------------------------


def test_a_command_longer_than_its_lease_is_never_taken_over(api, server, tmp_path):
    job = create(api)
    running = start_worker(server.url, "sleep 14; echo '{\"slept\": 14}'", cwd=tmp_path)
    wait_until(lambda: processing(api, job))
    time.sleep(LEASE + 1.5)  # past the first lease
    thief = api.post(
        "/extraction-jobs/claim", json={"worker_id": "thief", "lease_seconds": LEASE}
    )
    assert thief.json() == []
    _, stderr = running.communicate(timeout=30)
    assert running.returncode == 0, stderr
    finished = get(api, job)
    assert finished["status"] == "completed", stderr
    assert finished["worker_id"] == "test-worker"
    assert finished["attempts"] == 1
    assert finished["result"] == {"slept": 14}
    assert "lease_expired" not in event_types(api, job)


# --- failures ---------------------------------------------------------------------


def test_a_failure_on_the_last_attempt_fails_the_job_with_the_tail_of_stderr(
    api, server, tmp_path
):
    short = create(api, "short", max_attempts=1)
    long = create(api, "long", max_attempts=1)
    command = (
        "case {document_id} in "
        "short) echo 'OCR engine timed out' >&2; exit 3;; "
        f"*) {PYTHON} -c \"import sys; sys.stderr.write('x' * 30000 + 'the end')\"; "
        "exit 1;; esac"
    )
    done = run_worker(server.url, command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    failed = get(api, short)
    assert failed["status"] == "failed"
    assert failed["error_message"] == "OCR engine timed out"
    assert failed["attempts"] == 1
    tail = get(api, long)["error_message"]
    assert len(tail) == models.MAX_ERROR_MESSAGE_LENGTH
    assert tail.endswith("xxxthe end")
    assert get(api, long)["status"] == "failed"


def test_a_failure_with_attempts_left_goes_back_pending_with_backoff(
    api, server, tmp_path
):
    job = create(api, max_attempts=2)
    before = datetime.now(UTC)
    done = run_worker(server.url, "echo flaky >&2; exit 1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    retried = get(api, job)
    assert retried["status"] == "pending"
    assert retried["attempts"] == 1  # spent
    assert retried["error_message"] == "flaky"
    wait = (datetime.fromisoformat(retried["run_at"]) - before).total_seconds()
    assert worker.RETRY_BACKOFF[0] <= wait < worker.RETRY_BACKOFF[0] + 5
    assert event_types(api, job)[-1] == "released"
    assert "job failed, retrying" in messages(done.stderr)


# --- shutdown and cancel ------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_job_gives_it_back_and_exits_0(api, server, tmp_path, signum):
    job = create(api)
    started = time.monotonic()
    running = start_worker(server.url, "(sleep 2; touch marker) & wait", cwd=tmp_path)
    wait_until(lambda: processing(api, job))
    first_attempts = get(api, job)["attempts"]
    running.send_signal(signum)
    _, stderr = running.communicate(timeout=15)
    assert running.returncode == 0, stderr
    released = get(api, job)
    assert released["status"] == "pending", stderr
    assert "job released" in messages(stderr)
    again = api.post("/extraction-jobs/claim", json={"worker_id": "next"}).json()
    assert [claimed["id"] for claimed in again] == [job["id"]]
    assert again[0]["attempts"] == first_attempts
    time.sleep(max(0, started + 2.5 - time.monotonic()))
    assert not (tmp_path / "marker").exists(), "the command's group went on"


def test_a_cancel_during_a_job_kills_the_command_and_cancels_it(api, server, tmp_path):
    job = create(api)
    started = time.monotonic()
    running = start_worker(
        server.url, "(sleep 6; touch marker) & wait; touch marker", cwd=tmp_path
    )
    wait_until(lambda: processing(api, job))
    cancel = api.post(f"/extraction-jobs/{job['id']}/cancel", json={"reason": "test"})
    assert cancel.status_code == 200, cancel.text
    _, stderr = running.communicate(timeout=15)
    assert running.returncode == 0, stderr
    cancelled = get(api, job)
    assert cancelled["status"] == "cancelled", stderr
    assert cancelled["worker_id"] == "test-worker"
    assert time.monotonic() - started < 6, "the command was not stopped"
    time.sleep(max(0, started + 7 - time.monotonic()))
    assert not (tmp_path / "marker").exists(), "the command's group went on"


# --- a Python function instead of a command -------------------------------------------


def test_the_docs_python_function_example_works(api, server, tmp_path):
    text = DOCS.read_text()
    example = re.search(r"```python\n(.*?)```", text, re.DOTALL)[1]
    assert "http://127.0.0.1:8000" in example
    job = create(api, "invoice-0042.pdf", metadata={"pages": 3})
    script = tmp_path / "my_worker.py"
    script.write_text(example.replace("http://127.0.0.1:8000", server.url))
    done = run([PYTHON, str(script)], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    finished = get(api, job)
    assert finished["status"] == "completed", done.stderr
    assert finished["result"] == {"document": "invoice-0042.pdf", "pages": 3}


# --- an API that says "later", or drops the connection ----------------------------


DROP = "drop"  # close the connection without an answer
JOB = {"id": "0b7c3a52-8a1e-4a53-9d38-6f0a3c0d2b11", "document_id": "doc.pdf"}
JOB |= {"status": "processing", "attempts": 1, "max_attempts": 3}


class Scripted(BaseHTTPRequestHandler):
    """An HTTP server on loopback answering each call with the next scripted
    answer (GET /health always 200), keeping what it was sent and when.
    The real API cannot be made to answer 429 or drop a connection on cue."""

    script: ClassVar[list] = []
    calls: ClassVar[list[tuple[str, str, dict, float]]] = []

    def do_GET(self):
        self._answer(200, {"status": "ok", "database": "ok"})

    def do_POST(self):
        self._next()

    def do_PATCH(self):
        self._next()

    def _next(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Scripted.calls.append((self.command, self.path, body, time.monotonic()))
        answer = Scripted.script.pop(0)
        if answer == DROP:
            self.close_connection = True
            return
        self._answer(*answer)

    def _answer(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {
            "Content-Type": "application/json",
            **(headers or {}),
        }.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_unavailable_answers_and_dropped_connections_are_waited_out(tmp_path):
    """429/503 with Retry-After and dropped connections: the worker waits and
    goes on, for claims and for the finishing PATCH alike."""
    Scripted.calls = []
    Scripted.script = [
        (429, {"detail": "slow down"}, {"Retry-After": "2"}),
        DROP,
        (200, [JOB]),
        (503, {"detail": "database unavailable"}, {"Retry-After": "1"}),
        DROP,
        (200, JOB | {"status": "completed"}),
        (200, []),
    ]
    fake = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        done = run_worker(url, "echo '{\"pages\": 3}'", cwd=tmp_path)
    finally:
        fake.shutdown()
        fake.server_close()
    assert done.returncode == 0, done.stderr
    assert Scripted.script == []
    claim, patch = "/extraction-jobs/claim", f"/extraction-jobs/{JOB['id']}"
    assert [path for _, path, _, _ in Scripted.calls] == [claim] * 3 + [patch] * 3 + [
        claim
    ]
    at = [when for *_, when in Scripted.calls]
    assert at[1] - at[0] >= 2 and at[4] - at[3] >= 1  # Retry-After
    finish = {"status": "completed", "worker_id": "test-worker", "result": {"pages": 3}}
    assert [body for _, _, body, _ in Scripted.calls[3:6]] == [finish] * 3
    retries = [r for r in log_records(done.stderr) if "retrying" in r["message"]]
    dropped = "RemoteProtocolError"
    assert [r["error"] for r in retries] == ["429", dropped, "503", dropped]


def test_without_once_it_polls_while_idle_and_stops_on_sigterm(tmp_path):
    Scripted.calls = []
    Scripted.script = [(200, [])] * 100
    fake = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        idle = subprocess.Popen(
            worker_args(url, "true"),
            env=worker_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: len(Scripted.calls) >= 2)  # claimed again after a wait
        idle.send_signal(signal.SIGTERM)
        _, stderr = idle.communicate(timeout=5)
    finally:
        fake.shutdown()
        fake.server_close()
    assert idle.returncode == 0, stderr
    first, second = (when for *_, when in Scripted.calls[:2])
    assert second - first >= worker.IDLE_BACKOFF[0] / 2  # jitter: half to all of it
    last = log_records(stderr)[-1]
    assert (last["message"], last["signal"]) == ("worker stopped", "SIGTERM")


# --- bad input --------------------------------------------------------------------------


def one_line_exit_2(done: subprocess.CompletedProcess, words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--command", "true"], "--api"),
        (["--api", "http://127.0.0.1:8000"], "--command"),
        (["--api", "127.0.0.1:8000", "--command", "true"], "http://"),
        (["--api", "http://127.0.0.1:8000", "--command", " "], "--command"),
        (
            ["--api", "http://x", "--command", "true", "--lease-seconds", "5"],
            "10..43200",
        ),
        (["--api", "http://x", "--command", "true", "--worker-id", ""], "--worker-id"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, words):
    one_line_exit_2(run([PYTHON, str(WORKER), *args], cwd=tmp_path), words)


def test_an_api_it_cannot_reach_is_one_line_and_exit_2(tmp_path):
    done = run_worker(f"http://127.0.0.1:{free_port()}", "true", cwd=tmp_path)
    one_line_exit_2(done, "cannot reach the API")


def test_a_url_that_is_not_the_api_is_one_line_and_exit_2(tmp_path):
    elsewhere = JwksServer().start()  # answers 404 to anything but its keys
    try:
        done = run_worker(
            elsewhere.url.rsplit("/.well-known", 1)[0], "true", cwd=tmp_path
        )
    finally:
        elsewhere.stop()
    one_line_exit_2(done, "answered GET /health with 404")


# --- auth ---------------------------------------------------------------------------------


ISSUER = "https://tenant.example.invalid/"
AUDIENCE = "https://extraction-jobs.example.invalid"


def test_a_refused_token_stops_the_worker_with_a_clear_message(tmp_path, monkeypatch):
    key = RsaTestKey("worker-key")
    keys = JwksServer().start()
    keys.keys = [key.public_jwk()]
    use_jwks(monkeypatch, keys, issuer=ISSUER, audience=AUDIENCE)
    env = {k: v for k, v in os.environ.items() if k != "AUTH_DISABLED"}
    live = Server(f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path / "uvicorn.log")
    live.env = env | {"DATABASE_URL": live.database_url}
    live.start()
    now = int(time.time())
    read_only = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "auth0|reader", "iat": now}
        | {"exp": now + 300, "scope": auth.READ_SCOPE},
        key.private_pem,
        algorithm="RS256",
        headers={"kid": key.kid},
    )
    cases = [
        ("not-a-valid-token", "401", "API_TOKEN"),
        (None, "401", "API_TOKEN is not set"),
    ]
    cases.append((read_only, "403", auth.WRITE_SCOPE))
    try:
        for token, status, words in cases:
            env = worker_env() | ({"API_TOKEN": token} if token else {})
            done = run_worker(live.url, "touch ran", cwd=tmp_path, env=env)
            assert done.returncode == 1, done.stderr
            last = log_records(done.stderr)[-1]
            assert last["level"] == "ERROR"
            assert status in last["message"] and words in last["message"], last
            assert token is None or token not in done.stderr
    finally:
        live.stop()
        keys.stop()
    assert not (tmp_path / "ran").exists()


# --- the worker's copy of the API's bounds ------------------------------------------------


def test_the_workers_bounds_are_the_apis():
    assert worker.MAX_RESULT_BYTES == models.MAX_METADATA_BYTES
    assert worker.MAX_RESULT_DEPTH == models.MAX_METADATA_DEPTH
    assert worker.MAX_ERROR_MESSAGE_LENGTH == models.MAX_ERROR_MESSAGE_LENGTH
    assert worker.MAX_WORKER_ID_LENGTH == models.MAX_WORKER_ID_LENGTH
    assert (worker.MIN_LEASE_SECONDS, worker.MAX_LEASE_SECONDS) == (
        models.MIN_LEASE_SECONDS,
        models.MAX_LEASE_SECONDS,
    )
    assert worker.DEFAULT_LEASE_SECONDS == models.DEFAULT_LEASE_SECONDS


@pytest.mark.parametrize(
    "value",
    [
        {"ok": [1, 2.5, "é", None, True]},
        {"deep": json.loads("[" * 31 + "]" * 31)},
        {"deep": json.loads("[" * 32 + "]" * 32)},
        {"nul": "a\x00b"},
        {"nul\x00key": 1},
        {"lone": "\ud800"},
        {"nan": float("nan")},
        {"big": "x" * (models.MAX_METADATA_BYTES - 10)},
        {"big": "x" * (models.MAX_METADATA_BYTES - 12)},
        {"escapes": '"\\\n\x01' * 10_000},
    ],
)
def test_the_worker_refuses_a_result_exactly_when_the_api_would(value):
    try:
        models.JobUpdate(status="completed", result=value)
        api_accepts = True
    except ValueError:
        api_accepts = False
    assert (worker.refusal(value) is None) == api_accepts
