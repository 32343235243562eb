"""What resilience costs and what the pooler buys, on PostgreSQL (a benchmark,
not a test; nothing here asserts a speed).

Usage (root, for PgBouncer's user switch; Debian's pgbouncer installed):
    TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python scripts/bench_resilience.py [--seconds 5] [--apps 6] \\
        [--connections 6] [--rounds 3]

1. The statement deadline (database.py's watchdog): microseconds per
   `SELECT 1` round trip on one connection, psycopg2's own connection class
   against the app's watched one, rounds interleaved, the best of each; the
   difference is the deadline's cost per statement.

2. Scale past one database's connections: `--apps` uvicorn processes, each
   with the default pool of 2, against a database role allowed
   `--connections` connections (CONNECTION LIMIT, as max_connections caps
   RDS), driven by 4 keep-alive connections per process with a mix of
   creates and lists of 20. Once connecting straight to PostgreSQL, once
   through PgBouncer in transaction mode with a pool of `--connections`
   (DB_POOLER=1). Printed: requests per second answered 2xx, and the other
   answers by status. Ratios are to the direct run of the same round.

It creates (and drops again) a database of its own, `<that database>_res`,
and a role `<that database>_res_app`.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from bench import drop_database, execute, http_request, load

BATCH, BATCHES_PER_ROUND = 500, 20
CLIENTS_PER_APP = 4


def deadline_cost(url: str, rounds: int) -> None:
    import statistics

    import psycopg2
    from psycopg2.extensions import connection as plain

    import database
    import settings

    config = settings.settings_from_env()
    watched = database._watched_connection(
        config.db_statement_timeout_ms / 1000 + database.DEADLINE_GRACE_S,
        database._ConnectGate(slow_s=config.db_connect_timeout / 2),
    )
    database._watchdog.ensure_running()
    dsn = url.replace("postgresql+psycopg2://", "postgresql://", 1)
    cursors = {}
    for name, factory in (("psycopg2", plain), ("watched", watched)):
        connection = psycopg2.connect(dsn, connection_factory=factory)
        connection.autocommit = True
        cursors[name] = connection.cursor()
    # Short batches, alternated, so that the machine's load (shared here)
    # falls on both alike; each pair's difference is one sample. The client's
    # own CPU time is what the deadline adds to (the round trip's wait is not
    # the client's), and it is much less disturbed by others' load.
    clocks = {"CPU": time.process_time, "wall": time.perf_counter}
    samples = {(name, clock): [] for name in cursors for clock in clocks}
    for _ in range(rounds * BATCHES_PER_ROUND):
        for name, cursor in cursors.items():
            started = {clock: read() for clock, read in clocks.items()}
            for _ in range(BATCH):
                cursor.execute("SELECT 1")
            for clock, read in clocks.items():
                elapsed = read() - started[clock]
                samples[name, clock].append(elapsed / BATCH * 1e6)
    for cursor in cursors.values():
        cursor.connection.close()
    for clock in clocks:
        bare, watched_ = samples["psycopg2", clock], samples["watched", clock]
        cost = statistics.median(w - b for w, b in zip(watched_, bare, strict=True))
        print(
            f"deadline, client {clock} per SELECT 1: median {statistics.median(bare):.1f}"
            f" µs bare, {statistics.median(watched_):.1f} µs watched; median of "
            f"{len(bare)} paired batches of {BATCH}: {cost:+.2f} µs per statement "
            f"({statistics.median(watched_) / statistics.median(bare):.3f}x)"
        )


def mixed(number: int) -> bytes:
    if number % 2:
        return http_request("POST", "/extraction-jobs", {"document_id": "bench"})
    return http_request("GET", "/extraction-jobs?limit=20")


def serve_and_load(database_url: str, apps: int, seconds: float, **env: str):
    from faults import Uvicorn

    with tempfile.TemporaryDirectory() as logs:
        servers = Uvicorn(
            apps,
            {"DATABASE_URL": database_url, "LOG_LEVEL": "WARNING", **env},
            Path(logs),
        ).start()
        try:
            load(servers.ports, mixed, 1.0, concurrency=apps * CLIENTS_PER_APP)
            return load(
                servers.ports, mixed, seconds, concurrency=apps * CLIENTS_PER_APP
            )
        finally:
            servers.stop()


def pooler(url: str, args: argparse.Namespace) -> None:
    from faults import PgBouncer, app_role
    from sqlalchemy import make_url

    name = make_url(url).database
    with app_role(url, f"{name}_app", args.connections) as role:
        direct = make_url(url).set(username=role).render_as_string(False)
        print(
            f"pooler: {args.apps} app processes x a pool of 2 = {args.apps * 2} "
            f"connections wanted, the database allows {args.connections}; "
            f"{args.apps * CLIENTS_PER_APP} client connections, {args.seconds:g} s"
        )
        for round_ in range(1, args.rounds + 1):
            results = {"direct": serve_and_load(direct, args.apps, args.seconds)}
            # Started and stopped each round: its server connections count
            # against the role's limit, which the direct run needs whole.
            bouncer = PgBouncer(
                name, alias=name, pool_size=args.connections, user=role
            ).start()
            try:
                results["PgBouncer"] = serve_and_load(
                    bouncer.url(role), args.apps, args.seconds, DB_POOLER="1"
                )
            finally:
                bouncer.stop()
            report(round_, results)


def report(round_: int, results: dict) -> None:
    def answered(result) -> float:
        ok = sum(n for status, n in result.statuses.items() if status < 300)
        return ok / result.seconds

    floor = answered(results["direct"])
    for label, result in results.items():
        rate = answered(result)
        others = {status: n for status, n in result.statuses.items() if status >= 300}
        ratio = f"{rate / floor:.2f}x direct" if floor else "-"
        print(
            f"  round {round_} {label:9}: {rate:7.1f} req/s 2xx ({ratio}), "
            f"other answers {json.dumps(others)}, "
            f"load generator CPU {result.client_cpu:.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--apps", type=int, default=6)
    parser.add_argument("--connections", type=int, default=6)
    args = parser.parse_args()
    base_url = os.environ.get("TEST_DATABASE_URL", "").strip()
    if not base_url:
        sys.exit("set TEST_DATABASE_URL (a database this may create another next to)")

    from sqlalchemy import make_url

    import database

    base_url = database.normalize_url(base_url)
    name = f"{make_url(base_url).database}_res"
    execute(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    execute(base_url, f'CREATE DATABASE "{name}"')
    url = make_url(base_url).set(database=name).render_as_string(False)
    database.upgrade_schema(url)
    try:
        deadline_cost(url, args.rounds)
        pooler(url, args)
    finally:
        database.reset_engines()
        drop_database(base_url, url)


if __name__ == "__main__":
    main()
