"""Throughput of one uvicorn process on PostgreSQL, as ratios to floors
measured in the same run (never as absolute numbers: this machine is shared).

Usage: make bench, or
    TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python scripts/bench.py [--seconds 5] [--rounds 3]

It creates (and drops again) a database of its own, `<that database>_bench`,
starts the app (auth disabled, a pool of 8) and a floor app in one uvicorn
process each, and drives them with 8 keep-alive connections from an asyncio
load generator in this process. Each scenario runs `--rounds` times,
interleaved with its floors, and the best round of each counts.

- GET by id, create, list of 50: against a bare FastAPI route returning a
  job-shaped model (the same `Job`, the same sync-route threadpool).
- claim, 8 workers over HTTP: against the lower of a bare FastAPI route
  answering a one-job list (same client) and the bare claim statement through
  psycopg2 in 8 threads, sent as the app sends it (a prepared statement,
  planned once per connection); no job may be claimed twice. The same
  statement sent as text, planned on every call, is printed beside it.

The load generator's own CPU use is printed: near 100 % of a core it would be
the bottleneck, and the ratios would flatter the app.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONCURRENCY = 8
HOST = "127.0.0.1"


# --- servers ---------------------------------------------------------------


def floor_app():
    """The floor: FastAPI routes that only validate and serialize a job."""
    from fastapi import FastAPI

    from models import ClaimRequest, Job, JobStatus

    now = datetime.now(UTC)
    job = Job(
        id="6f0c8f55-7d43-4c6a-9e3b-2d3f4a5b6c7d",
        document_id="invoice-2026-0042.pdf",
        status=JobStatus.PENDING,
        priority=5,
        metadata={"source": "s3://inbox/invoice-2026-0042.pdf", "pages": 3},
        error_message=None,
        created_at=now,
        updated_at=now,
        created_by=None,
        attempts=0,
        worker_id=None,
        started_at=None,
        finished_at=None,
        version=1,
        max_attempts=3,
        run_at=now,
        lease_expires_at=None,
        heartbeat_at=None,
        cancel_requested_at=None,
        result=None,
        updated_by=None,
    )
    app = FastAPI()

    @app.get("/floor/job", response_model=Job)
    def one_job() -> Job:
        return job

    @app.post("/floor/claim", response_model=list[Job])
    def one_job_list(_: ClaimRequest) -> list[Job]:
        return [job]

    return app


def serve(kind: str, port: int) -> None:
    import uvicorn

    if kind == "app":
        from main import app
    else:
        app = floor_app()
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(kind: str, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port)],
        env={**os.environ, **env},
        cwd=REPO,
        # The app's per-request log lines are part of its cost; reading them is not.
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return process, port
        except OSError:
            if process.poll() is not None:
                sys.exit(f"the {kind} server exited with {process.returncode}")
            time.sleep(0.1)
    process.kill()
    sys.exit(f"the {kind} server did not start")


# --- load generator ----------------------------------------------------------


def http_request(method: str, path: str, body: object | None = None) -> bytes:
    payload = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length) if length else b""


@dataclass
class Result:
    requests: int = 0
    seconds: float = 0.0
    client_cpu: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    bodies: list[bytes] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def load(
    port: int | list[int],
    make_request: Callable[[int], bytes],
    seconds: float,
    *,
    keep_bodies: bool = False,
    concurrency: int = CONCURRENCY,
) -> Result:
    """`concurrency` keep-alive connections (spread over the ports, if
    several), each sending its next request as soon as the previous answer is
    read, for `seconds`."""
    result = Result()
    ports = [port] if isinstance(port, int) else port

    async def connection(number: int, deadline: float) -> None:
        reader, writer = await asyncio.open_connection(HOST, ports[number % len(ports)])
        sent = number
        try:
            while time.perf_counter() < deadline:
                writer.write(make_request(sent))
                status, body = await read_response(reader)
                sent += concurrency
                result.requests += 1
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if keep_bodies:
                    result.bodies.append(body)
        finally:
            writer.close()

    async def run() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(connection(n, deadline) for n in range(concurrency)))

    cpu, started = time.process_time(), time.perf_counter()
    asyncio.run(run())
    result.seconds = time.perf_counter() - started
    result.client_cpu = (time.process_time() - cpu) / result.seconds
    return result


# --- the database ------------------------------------------------------------


def bench_database(base_url: str) -> str:
    """A fresh `<database>_bench` on the same server; returns its URL."""
    import psycopg2
    from sqlalchemy.engine import make_url

    base = make_url(base_url)
    name = f"{base.database}_bench"
    admin = psycopg2.connect(psycopg2_dsn(base_url))
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cursor.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return base.set(database=name).render_as_string(hide_password=False)


def drop_database(base_url: str, url: str) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    admin = psycopg2.connect(psycopg2_dsn(base_url))
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(
            f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'
        )
    admin.close()


def psycopg2_dsn(url: str) -> str:
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


def execute(url: str, sql: str, params: object = None) -> list[tuple]:
    import psycopg2

    connection = psycopg2.connect(psycopg2_dsn(url))
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def seed_pending(url: str, count: int) -> None:
    """`count` more pending jobs, in one statement."""
    execute(
        url,
        """
        INSERT INTO extraction_job (id, document_id, status, priority, created_at,
                                    updated_at, run_at, attempts, version)
        SELECT gen_random_uuid(), 'bench-' || n, 'pending', n %% 11, now(), now(),
               now(), 0, 1
        FROM generate_series(1, %s) AS n
        """,
        (count,),
    )


def prepared_queries(compiled, values: dict) -> tuple[str, str]:
    """What the app's connection sends for a `prepared()` statement compiled
    for psycopg2, with these DBAPI values: the first time, and every time
    after (database._run_prepared's choice, so the floor sends what the app
    sends)."""
    import database

    shape = database._shape(compiled.string, compiled, compiled.dialect)
    if shape is None:
        raise ValueError("this statement cannot run prepared")
    statement = shape.prepare(values)
    return statement.prepare_and_execute, statement.execute


def claim_floor_in_database(url: str, seconds: float, *, prepared: bool) -> Result:
    """The repository's own claim statement through bare psycopg2, 8 threads:
    `prepared` as the app sends it (PREPARE with the first EXECUTE, then
    EXECUTE, on connections set up as the app's), else as plain text."""
    import psycopg2
    from sqlalchemy.dialects.postgresql import psycopg2 as dialect

    import drivers
    import repository
    from database import GENERIC_PLANS

    now = datetime.now(UTC)
    statement = drivers._pg_changes(repository.CLAIM_CHANGES, None)
    values = {
        "worker": "floor",
        "limit": 1,
        "moment": now,
        "lease_until": now,
        "actor": None,
        "reason": repository.LAPSED_ON_CANCEL,
    }
    compiled = statement.compile(dialect=dialect.dialect())
    params = compiled.construct_params(values)
    first = later = str(compiled)
    if prepared:
        first, later = prepared_queries(compiled, params)
    counts = [0] * CONCURRENCY
    deadline = time.perf_counter() + seconds

    def worker(number: int) -> None:
        options = GENERIC_PLANS if prepared else ""
        connection = psycopg2.connect(psycopg2_dsn(url), options=options)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(first, params)
            counts[number] += len(cursor.fetchall())
            while time.perf_counter() < deadline:
                cursor.execute(later, params)
                counts[number] += len(cursor.fetchall())
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Result(requests=sum(counts), seconds=time.perf_counter() - started)


# --- the run -------------------------------------------------------------------


def check(result: Result, name: str, expected: int) -> None:
    wrong = {code: n for code, n in result.statuses.items() if code != expected}
    if wrong:
        sys.exit(f"{name}: unexpected answers {wrong}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", choices=["app", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return

    base_url = (
        os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("TEST_DATABASE_URL")
        or ""
    ).strip()
    if not base_url.startswith("postgres"):
        sys.exit("set TEST_DATABASE_URL (or BENCH_DATABASE_URL) to a PostgreSQL URL")
    import database

    base_url = database.normalize_url(base_url)
    url = bench_database(base_url)
    database.upgrade_schema(url)
    database.reset_engines()
    # One connection per concurrent client, as the psycopg2 floor has: the
    # default pool (2) is sized for Lambda, one request per environment.
    env = {"DATABASE_URL": url, "AUTH_DISABLED": "1", "DB_POOL_SIZE": str(CONCURRENCY)}
    servers = [start_server("app", env), start_server("floor", env)]
    (_, app_port), (_, floor_port) = servers
    try:
        run_scenarios(url, app_port, floor_port, args.seconds, args.rounds)
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=10)
        drop_database(base_url, url)


def run_scenarios(
    url: str, app_port: int, floor_port: int, seconds: float, rounds: int
) -> None:
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"{CONCURRENCY} connections, {rounds} rounds of {seconds:g} s, best round counts",
        flush=True,
    )
    # Jobs to read: 200 for GET by id and the list, completed so no claim takes them.
    seed_pending(url, 200)
    execute(url, "UPDATE extraction_job SET status = 'completed'")
    ids = [str(row[0]) for row in execute(url, "SELECT id FROM extraction_job")]
    scenarios: dict[str, tuple[int, Callable[[int], bytes], int]] = {
        "floor: bare route, one job": (
            floor_port,
            lambda _: http_request("GET", "/floor/job"),
            200,
        ),
        "GET by id": (
            app_port,
            lambda n: http_request("GET", f"/extraction-jobs/{ids[n % len(ids)]}"),
            200,
        ),
        "create": (
            app_port,
            lambda n: http_request(
                "POST",
                "/extraction-jobs",
                {"document_id": f"bench-create-{n}", "priority": n % 11},
            ),
            201,
        ),
        "list of 50": (
            app_port,
            lambda _: http_request("GET", "/extraction-jobs?limit=50"),
            200,
        ),
        "floor: bare route, one-job list": (
            floor_port,
            lambda n: http_request("POST", "/floor/claim", {"worker_id": f"w{n % 8}"}),
            200,
        ),
    }
    best: dict[str, Result] = {}
    claims: dict[str, Result] = {}
    for round_ in range(rounds):
        for name, (port, make_request, expected) in scenarios.items():
            load(port, make_request, min(1.0, seconds))  # warm up
            result = load(port, make_request, seconds)
            check(result, name, expected)
            if name not in best or result.rate > best[name].rate:
                best[name] = result
        for name, result in run_claims(url, app_port, seconds).items():
            if name not in claims or result.rate > claims[name].rate:
                claims[name] = result
        print(f"round {round_ + 1} of {rounds} done", file=sys.stderr, flush=True)

    floor = best["floor: bare route, one job"]
    print(f"\n{'scenario':40} {'req/s':>8} {'ratio':>6} {'goal':>6} {'client CPU':>11}")
    goals = {"GET by id": 0.5, "create": 0.4, "list of 50": 0.2}
    for name, result in best.items():
        if name.startswith("floor: bare route, one-job"):
            continue
        goal = goals.get(name)
        print(
            f"{name:40} {result.rate:8.0f} {result.rate / floor.rate:5.2f}x "
            f"{f'{goal:.1f}x' if goal else '':>6} {result.client_cpu:10.0%}"
        )
    http_floor = best["floor: bare route, one-job list"]
    db_floor = claims[DB_FLOOR]
    claim_floor = min(http_floor.rate, db_floor.rate)
    print(f"\n{'claims, 8 workers':40} {'claims/s':>8} {'ratio':>6} {'goal':>6}")
    print(f"{'floor: bare route, one-job list':40} {http_floor.rate:8.0f}")
    print(f"{DB_FLOOR:40} {db_floor.rate:8.0f}")
    print(f"{'  (the same as text, planned per call)':40} {claims[AS_TEXT].rate:8.0f}")
    app_claims = claims["claim over HTTP"]
    print(
        f"{'claim over HTTP':40} {app_claims.rate:8.0f} "
        f"{app_claims.rate / claim_floor:5.2f}x {'0.5x':>6}  "
        f"(client CPU {app_claims.client_cpu:.0%}, no job claimed twice)"
    )
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


DB_FLOOR = "floor: claim statement, psycopg2"
AS_TEXT = "claim statement as text"


def run_claims(url: str, app_port: int, seconds: float) -> dict[str, Result]:
    """Claims over HTTP, then the database floor (prepared, as the app sends
    it, and as text), each on fresh pending jobs."""
    execute(url, "DELETE FROM extraction_job WHERE status = 'processing'")
    seed_pending(url, 30_000)
    load(
        app_port,
        lambda n: http_request("POST", "/extraction-jobs/claim", {"worker_id": "warm"}),
        min(1.0, seconds),
    )
    over_http = load(
        app_port,
        lambda n: http_request(
            "POST", "/extraction-jobs/claim", {"worker_id": f"w{n % CONCURRENCY}"}
        ),
        seconds,
        keep_bodies=True,
    )
    check(over_http, "claim", 200)
    claimed = [job["id"] for body in over_http.bodies for job in json.loads(body)]
    if len(claimed) != over_http.requests:
        sys.exit(
            f"claim: {over_http.requests - len(claimed)} claims found no pending "
            "job; seed more"
        )
    if len(set(claimed)) != len(claimed):
        sys.exit(f"claim: {len(claimed) - len(set(claimed))} jobs claimed twice")
    over_http.bodies.clear()
    results = {"claim over HTTP": over_http}
    for name, prepared in ((DB_FLOOR, True), (AS_TEXT, False)):
        execute(url, "DELETE FROM extraction_job WHERE status = 'processing'")
        seed_pending(url, 60_000)
        results[name] = claim_floor_in_database(url, seconds, prepared=prepared)
    return results


if __name__ == "__main__":
    main()
