"""Claim, cursor-page, offset-page and stats latency at 10k and 1M jobs on
PostgreSQL, as ratios to a floor measured in the same run (this machine is
shared, so absolute numbers drift; ratios much less).

Usage:
    TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python scripts/bench_lifecycle.py [--sizes 10000 1000000] [--repeat 200]

It creates (and drops again) a database of its own, `<that database>_lifecycle`,
fills it with generate_series (60 % completed, 10 % failed, 30 % pending over
1000 document ids, some processing with expired leases), and times calls
through the service layer (JobService -> repository -> PostgreSQL), so every
figure includes the Python around the SQL:

- floor: `SELECT 1` through the same engine, one round trip doing nothing;
- claim: POST /claim's work, limit 1 and 10 (sweep of expired leases included);
- cursor page: 50 jobs, first page and a page in the middle of the table;
- offset page: 50 jobs at offset 10 000 (the deepest allowed) for comparison;
- stats: GET /stats's one query.

Each figure is the median of --repeat calls.
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

import database
from models import ClaimRequest
from repository import ExtractionJobRepository
from service import JobService

FILL = """
INSERT INTO extraction_job (id, document_id, status, priority, metadata,
    created_at, updated_at, attempts, worker_id, started_at, finished_at,
    version, max_attempts, run_at, lease_expires_at)
SELECT gen_random_uuid(),
       'doc-' || (g % 1000),
       s.status,
       g % 11,
       '{"pages": 3}'::jsonb,
       t.created,
       t.created,
       CASE WHEN s.status = 'pending' THEN 0 ELSE 1 END,
       CASE WHEN s.status = 'pending' THEN NULL ELSE 'bench-worker' END,
       CASE WHEN s.status = 'pending' THEN NULL ELSE t.created END,
       CASE WHEN s.status IN ('completed', 'failed') THEN t.created END,
       1, 3, t.created,
       CASE WHEN s.status = 'processing' THEN now() - interval '1 minute' END
FROM generate_series(1, :n) AS g,
LATERAL (SELECT now() - (:n - g) * interval '1 millisecond' AS created) AS t,
LATERAL (SELECT CASE WHEN g % 10 < 6 THEN 'completed'
                     WHEN g % 10 < 7 THEN 'failed'
                     WHEN g % 1000 = 7 THEN 'processing'
                     ELSE 'pending' END AS status) AS s
"""


def median_ms(call: Callable[[], object], repeat: int) -> float:
    call()  # warm: compiled statement cache, pool
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run_size(url: str, size: int, repeat: int) -> dict[str, float]:
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE extraction_job, extraction_job_event"))
        connection.execute(text(FILL), {"n": size})
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE extraction_job")
        )
        first_seq = connection.execute(
            text("SELECT min(seq) FROM extraction_job")
        ).scalar()
    engine.dispose()
    database.reset_engines()
    service = JobService(ExtractionJobRepository(url))
    app_engine = database.get_engine(url)

    def floor() -> None:
        with app_engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    middle = service.list_jobs(
        document_id=None, status=None, limit=50, offset=0, cursor=None
    )
    # A cursor half-way through the table, as a client walking would hold.
    seq_middle = first_seq + size // 2
    cursor_middle = service.cursors.encode(seq_middle, [None, None])

    def write_floor() -> None:
        with app_engine.begin() as connection:
            connection.execute(
                text("UPDATE extraction_job SET version = version WHERE seq = :s"),
                {"s": first_seq},
            )

    figures = {
        "floor (SELECT 1)": median_ms(floor, repeat),
        "write floor (1-row UPDATE, commit)": median_ms(write_floor, repeat),
        "claim limit 1": median_ms(
            lambda: service.claim(ClaimRequest(worker_id="b", limit=1)), repeat
        ),
        "claim limit 10": median_ms(
            lambda: service.claim(ClaimRequest(worker_id="b", limit=10)), repeat
        ),
        "cursor page 50, first": median_ms(
            lambda: service.list_jobs(
                document_id=None, status=None, limit=50, offset=0
            ),
            repeat,
        ),
        "cursor page 50, middle": median_ms(
            lambda: service.list_jobs(
                document_id=None,
                status=None,
                limit=50,
                offset=0,
                cursor=cursor_middle,
            ),
            repeat,
        ),
        "offset page 50 at 10000": median_ms(
            lambda: service.list_jobs(
                document_id=None, status=None, limit=50, offset=10_000
            ),
            repeat,
        ),
        "stats": median_ms(service.stats, max(10, repeat // 10)),
    }
    assert middle.next_cursor is not None
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
    name = f"{base.database}_lifecycle"
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        database.upgrade_schema(url)
        results = {size: run_size(url, size, args.repeat) for size in args.sizes}
    finally:
        database.reset_engines()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    header = "| operation | " + " | ".join(f"{size:,} jobs" for size in args.sizes)
    print(header + " |")
    print("|---" * (len(args.sizes) + 1) + "|")
    for operation in results[args.sizes[0]]:
        cells = []
        for size in args.sizes:
            value = results[size][operation]
            floor = results[size][
                "write floor (1-row UPDATE, commit)"
                if operation.startswith("claim")
                else "floor (SELECT 1)"
            ]
            cells.append(f"{value:.2f} ms ({value / floor:.1f}x floor)")
        print(f"| {operation} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
