"""Claim, list, stats latency at 10k and 1M jobs on PostgreSQL, as ratios:
each figure to a floor measured in the same run (this machine is shared, so
absolute numbers drift; ratios much less), and 1M to 10k (issue 19's goal
for the operators' list shapes and /stats: within 2x).

Usage:
    TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python scripts/bench_lifecycle.py [--sizes 10000 1000000] [--repeat 200]

It creates (and drops again) a database per size, `<that database>_lifecycle_<size>`,
and fills each with generate_series: created_at spread over 30 days and never
going back in `seq` order (the create clock's invariant; the clock is left
at the newest job), 60 % completed, 10 % failed, 5 % cancelled, 25 % pending
(all due), 0.1 % processing with expired leases; 10 jobs per document id
(documents grow with the table), 50 workers; then VACUUM ANALYZE. It times calls through the service layer
(JobService -> repository -> PostgreSQL), so every figure includes the
Python around the SQL:

- floor: `SELECT 1` as the app runs a read (database.run: a pooled
  connection in autocommit), one round trip doing nothing; write floor: a
  one-row UPDATE run as the app runs a write, its own commit (the claims');
- list, no filter: 50 jobs, first page, a cursor page in the middle, and an
  offset page at 10 000 (the deepest allowed);
- each operator list shape (status one asc/desc, two statuses desc,
  document_id, worker_id, created_after desc/asc, created_before asc/desc):
  50 jobs, the first page and a cursor page inside the filtered range;
- stats: GET /stats's one query;
- claim: POST /claim's work, limit 1 and 10 (last: claims change the data).

Each figure is the median of --repeat calls (stats: a tenth of them), the
sizes' calls taken in turn, so that load which comes and goes on the
machine falls on both sides of a ratio. A
list shape or /stats over 2x from the smallest size to the largest gets its
plan printed: EXPLAIN (ANALYZE, BUFFERS) of what the app sent, on the
largest table, as a generic plan where the app runs it prepared.
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import prepared_queries  # scripts/, beside this one
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.pool import NullPool

import database
from models import ClaimRequest, JobFilter, JobStatus, ListOrder
from repository import ExtractionJobRepository
from service import JobService

SPAN = timedelta(days=30)
FILL = """
INSERT INTO extraction_job (id, document_id, status, priority, metadata,
    created_at, updated_at, attempts, worker_id, started_at, finished_at,
    version, max_attempts, run_at, lease_expires_at)
SELECT gen_random_uuid(),
       'doc-' || (g % (:n / 10)),
       s.status,
       g % 11,
       '{"pages": 3}'::json,
       t.created,
       t.created,
       CASE WHEN s.status = 'pending' THEN 0 ELSE 1 END,
       CASE WHEN s.status = 'pending' THEN NULL ELSE 'bench-worker-' || (g % 50) END,
       CASE WHEN s.status = 'pending' THEN NULL ELSE t.created END,
       CASE WHEN s.status IN ('completed', 'failed', 'cancelled') THEN t.created END,
       1, 3, t.created,
       CASE WHEN s.status = 'processing' THEN now() - interval '1 minute' END
FROM generate_series(1, :n) AS g,
LATERAL (SELECT :start + (g - 1) * (:span / :n) AS created) AS t,
LATERAL (SELECT CASE WHEN g % 1000 = 15 THEN 'processing'
                     WHEN g % 20 < 12 THEN 'completed'
                     WHEN g % 20 < 14 THEN 'failed'
                     WHEN g % 20 < 15 THEN 'cancelled'
                     ELSE 'pending' END AS status) AS s
ORDER BY g
"""
CLOCK = "UPDATE extraction_job_create_clock SET created_at = (SELECT max(created_at) FROM extraction_job)"

FLOOR = "floor (SELECT 1)"
WRITE_FLOOR = "write floor (1-row UPDATE, commit)"
STATS = "stats"


def shapes(start) -> list[tuple[str, JobFilter, ListOrder, float]]:
    """The operator list shapes: a name, the filter, the order, and where
    in `seq` (a fraction of the table) a cursor inside its range points."""
    middle = start + SPAN / 2
    pending = JobFilter(status=(JobStatus.PENDING,))
    ended = JobFilter(status=(JobStatus.FAILED, JobStatus.CANCELLED))
    return [
        ("status pending, asc", pending, ListOrder.ASC, 0.5),
        ("status pending, desc", pending, ListOrder.DESC, 0.5),
        ("status failed+cancelled, desc", ended, ListOrder.DESC, 0.5),
        ("document_id", JobFilter(document_id="doc-7"), ListOrder.ASC, 0.5),
        ("worker_id", JobFilter(worker_id="bench-worker-7"), ListOrder.ASC, 0.5),
        ("created_after, desc", JobFilter(created_after=middle), ListOrder.DESC, 0.75),
        ("created_after, asc", JobFilter(created_after=middle), ListOrder.ASC, 0.75),
        ("created_before, asc", JobFilter(created_before=middle), ListOrder.ASC, 0.25),
        (
            "created_before, desc",
            JobFilter(created_before=middle),
            ListOrder.DESC,
            0.25,
        ),
    ]


def interleaved_medians(calls: list[Callable[[], object]], repeat: int) -> list[float]:
    """The median time (ms) of each call, the calls taken in turn `repeat`
    times: load that comes and goes on the machine falls on all of them."""
    for call in calls:
        call()  # warm: compiled statement cache, pool, prepared statement
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeat):
        for call, spent in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) * 1000 for spent in times]


def load(url: str, size: int):
    """A table of `size` jobs as the docstring says; returns its first seq
    and its first created_at."""
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE extraction_job, extraction_job_event"))
        start = connection.execute(text("SELECT now() - interval '30 days'")).scalar()
        connection.execute(text(FILL), {"n": size, "start": start, "span": SPAN})
        connection.execute(text(CLOCK))
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE extraction_job")
        )
        first_seq = connection.execute(
            text("SELECT min(seq) FROM extraction_job")
        ).scalar()
    engine.dispose()
    return first_seq, start


class Bench:
    """One loaded table: the service on it, and the calls to time."""

    def __init__(self, url: str, size: int) -> None:
        self.url, self.size = url, size
        self.first_seq, self.start = load(url, size)
        self.service = JobService(ExtractionJobRepository(url))
        # The first list loads the cursor key (so cursors can be made).
        self.service.list_jobs(JobFilter(), limit=1, offset=0)

    def page(self, selection: JobFilter, order: ListOrder, **kwargs) -> Callable:
        return lambda: self.service.list_jobs(
            selection, order=order, limit=50, offset=0, **kwargs
        )

    def cursor_at(self, selection: JobFilter, order: ListOrder, fraction: float):
        """A cursor at `fraction` of the table, as a client walking holds one."""
        seq = self.first_seq + int(self.size * fraction)
        filters = [selection.model_dump(mode="json"), order.value]
        return self.service.cursors.encode((seq,), filters)

    # The floors run as the app's requests do (database.run: a pooled
    # connection in autocommit, one statement, one round trip).
    def floor(self) -> None:
        database.run(self.url, lambda connection: connection.execute(text("SELECT 1")))

    def write_floor(self) -> None:
        database.run(
            self.url,
            lambda connection: connection.execute(
                text("UPDATE extraction_job SET version = version WHERE seq = :s"),
                {"s": self.first_seq},
            ),
            write=True,
        )

    def calls(self) -> dict[str, Callable]:
        everything = JobFilter()
        calls = {
            FLOOR: self.floor,
            WRITE_FLOOR: self.write_floor,
            "list, first page": self.page(everything, ListOrder.ASC),
            "list, cursor page (middle)": self.page(
                everything,
                ListOrder.ASC,
                cursor=self.cursor_at(everything, ListOrder.ASC, 0.5),
            ),
            "list, offset page at 10000": lambda: self.service.list_jobs(
                everything, limit=50, offset=10_000
            ),
        }
        for name, selection, order, fraction in shapes(self.start):
            calls[f"{name}: first page"] = self.page(selection, order)
            calls[f"{name}: cursor page"] = self.page(
                selection, order, cursor=self.cursor_at(selection, order, fraction)
            )
        calls[STATS] = self.service.stats
        return calls

    def claims(self) -> dict[str, Callable]:
        return {
            "claim limit 1": lambda: self.service.claim(
                ClaimRequest(worker_id="b", limit=1)
            ),
            "claim limit 10": lambda: self.service.claim(
                ClaimRequest(worker_id="b", limit=10)
            ),
        }

    def explain(self, name: str) -> str:
        """The plan of what the app sends for call `name`, run for real."""
        sent = []

        def capture(conn, cursor, statement, parameters, context, executemany):
            sent.append((statement, parameters, context))

        event.listen(Engine, "before_cursor_execute", capture)
        try:
            self.calls()[name]()
        finally:
            event.remove(Engine, "before_cursor_execute", capture)
        statement, parameters, context = sent[-1]
        fresh = create_engine(self.url, poolclass=NullPool)  # nothing prepared yet
        raw = fresh.raw_connection()
        try:
            cursor = raw.cursor()
            if context.execution_options.get(database.PREPARED):
                # The first use prepares (and runs it once); EXPLAIN the next.
                prepare, execute = prepared_queries(context.compiled, parameters)
                cursor.execute("SET plan_cache_mode = force_generic_plan")
                cursor.execute(prepare, parameters)
                query = execute
            else:
                query = statement
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {query}", parameters)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            raw.rollback()
            return plan
        finally:
            raw.close()
            fresh.dispose()


def ratio_goal_applies(name: str) -> bool:
    return name == STATS or ":" in name


def measure(
    benches: list[Bench], calls: list[dict[str, Callable]], repeat: int
) -> dict[int, dict[str, float]]:
    """Every call of `calls` (one dict per bench), the benches in turn."""
    figures: dict[int, dict[str, float]] = {bench.size: {} for bench in benches}
    for name in calls[0]:
        times = max(10, repeat // 10) if name == STATS else repeat
        medians = interleaved_medians([each[name] for each in calls], times)
        for bench, median in zip(benches, medians, strict=True):
            figures[bench.size][name] = median
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    base_url = os.environ.get("TEST_DATABASE_URL", "").strip()
    if not base_url:
        raise SystemExit("TEST_DATABASE_URL must name a PostgreSQL database")
    base = make_url(database.normalize_url(base_url))
    sizes = sorted(args.sizes)
    names = {size: f"{base.database}_lifecycle_{size}" for size in sizes}
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)

    def drop_all() -> None:
        database.reset_engines()
        with admin.connect() as connection:
            for name in names.values():
                connection.execute(
                    text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                )

    drop_all()
    plans = {}
    try:
        benches = []
        for size, name in names.items():
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            url = base.set(database=name).render_as_string(hide_password=False)
            database.upgrade_schema(url)
            benches.append(Bench(url, size))
        results = measure(benches, [bench.calls() for bench in benches], args.repeat)
        small, large = results[sizes[0]], results[sizes[-1]]
        for operation in large:  # explained on the table as loaded
            if (
                ratio_goal_applies(operation)
                and large[operation] > 2 * small[operation]
            ):
                plans[operation] = benches[-1].explain(operation)
        # Last: the claims change the tables.
        claims = measure(benches, [bench.claims() for bench in benches], args.repeat)
        for size in sizes:
            results[size] |= claims[size]
    finally:
        drop_all()
        admin.dispose()
    print_table(results, sizes)
    for operation, plan in plans.items():
        print(f"\nOver 2x: {operation}, on {sizes[-1]:,} jobs\n{plan}")


def print_table(results: dict[int, dict[str, float]], sizes: list[int]) -> None:
    header = " | ".join(f"{size:,} jobs" for size in sizes)
    print(f"| operation | {header} | {sizes[-1]:,} / {sizes[0]:,} |")
    print("|---" * (len(sizes) + 2) + "|")
    for operation in results[sizes[0]]:
        cells = []
        for size in sizes:
            value = results[size][operation]
            floor = results[size][
                WRITE_FLOOR if operation.startswith("claim") else FLOOR
            ]
            cells.append(f"{value:.2f} ms ({value / floor:.1f}x floor)")
        ratio = results[sizes[-1]][operation] / results[sizes[0]][operation]
        mark = " over 2x" if ratio_goal_applies(operation) and ratio > 2 else ""
        print(f"| {operation} | " + " | ".join(cells) + f" | {ratio:.2f}x{mark} |")


if __name__ == "__main__":
    main()
