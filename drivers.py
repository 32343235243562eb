"""How a write runs on each database: the one seam between SQLite and PostgreSQL.

A write is described once, as data (repository.py): the jobs it picks, the
values it gives them (expressions over the row as it was), and the events it
records (expressions over the row before and after). A driver renders that
description, and the repository chooses its driver once, by URL:

- PostgreSQL: ONE statement of data-modifying CTEs (the rows picked `FOR
  UPDATE` in a MATERIALIZED CTE, the UPDATE, one INSERT of all the events),
  run in autocommit: one round trip, concurrency settled by row locks.
- SQLite: the same SELECT, INSERT and UPDATE as steps of one `BEGIN
  IMMEDIATE` transaction, whose write lock serialises writers.

Both evaluate the same expressions. Where the SQL itself must differ
(GREATEST or a registered function, json_build_object or json_object,
`= ANY(array)` or `IN json_each`), the difference is one compiled function
below.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any, Protocol

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Connection,
    Integer,
    Select,
    String,
    Text,
    TypeDecorator,
    bindparam,
    func,
    insert,
    literal,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.functions import FunctionElement

from database import prepared
from db_models import CREATE_CLOCK, EVENTS, JOBS, OUTBOX, UTCDateTime
from models import EventType

# --- SQL that differs by database ----------------------------------------------


class strictly_after(FunctionElement):
    """`max(now, earlier + 1 µs)`: a change's timestamp, strictly after the
    last one whatever the clock says, computed where the row is."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(strictly_after, "postgresql")
def _strictly_after_postgresql(element, compiler, **kw):
    now, earlier = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"GREATEST({now}, {earlier} + INTERVAL '1 microsecond')"


@compiles(strictly_after, "sqlite")
def _strictly_after_sqlite(element, compiler, **kw):
    now, earlier = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"strictly_after({now}, {earlier})"  # see register_sqlite_functions


_SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores DATETIME on SQLite


def _sqlite_strictly_after(now: str | None, earlier: str | None) -> str | None:
    if earlier is None:
        return now
    after = datetime.fromisoformat(earlier) + timedelta(microseconds=1)
    if now is not None and datetime.fromisoformat(now) > after:
        return now
    return after.strftime(_SQLITE_DATETIME)


def register_sqlite_functions(dbapi_connection: Any) -> None:
    """The functions SQLite's side of this module calls (on every connection)."""
    dbapi_connection.create_function(
        "strictly_after", 2, _sqlite_strictly_after, deterministic=True
    )


class greatest(FunctionElement):
    """The later of two timestamps."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(greatest, "postgresql")
def _greatest_postgresql(element, compiler, **kw):
    return f"GREATEST({compiler.process(element.clauses, **kw)})"


@compiles(greatest, "sqlite")
def _greatest_sqlite(element, compiler, **kw):
    # Stored as text of one fixed width (_SQLITE_DATETIME): max() compares it.
    return f"max({compiler.process(element.clauses, **kw)})"


class iso_text(FunctionElement):
    """A timestamp as the API writes it: 2026-01-01T00:00:00.000000+00:00."""

    type = String()
    inherit_cache = True


@compiles(iso_text, "postgresql")
def _iso_text_postgresql(element, compiler, **kw):
    (value,) = (compiler.process(clause, **kw) for clause in element.clauses)
    return (
        f"""to_char(timezone('UTC', {value}), 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')"""
    )


@compiles(iso_text, "sqlite")
def _iso_text_sqlite(element, compiler, **kw):
    # Stored as naive UTC, always with six fractional digits (_SQLITE_DATETIME).
    (value,) = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"(replace({value}, ' ', 'T') || '+00:00')"


class _json_object(FunctionElement):
    type = Text()
    inherit_cache = True


@compiles(_json_object, "postgresql")
def _json_object_postgresql(element, compiler, **kw):
    return f"json_build_object({compiler.process(element.clauses, **kw)})"


@compiles(_json_object, "sqlite")
def _json_object_sqlite(element, compiler, **kw):
    return f"json_object({compiler.process(element.clauses, **kw)})"


def json_object(fields: Mapping[str, Any]) -> Any:
    """A JSON object built where the row is; NULL when it has no fields.
    Timestamps are written as the API writes them."""
    if not fields:
        return null()
    arguments: list[Any] = []
    for name, value in fields.items():
        if isinstance(getattr(value, "type", None), UTCDateTime):
            value = iso_text(value)
        arguments += [literal(name), value]
    return _json_object(*arguments)


class current_xid(FunctionElement):
    """The writing transaction's id (PostgreSQL); 0 on SQLite, whose single
    writer makes `seq` commit order by itself."""

    type = BigInteger()
    inherit_cache = True


@compiles(current_xid, "postgresql")
def _current_xid_postgresql(element, compiler, **kw):
    return "pg_current_xact_id()::text::bigint"


@compiles(current_xid, "sqlite")
def _current_xid_sqlite(element, compiler, **kw):
    return "0"


class commit_horizon(FunctionElement):
    """Every transaction with a smaller id has ended: the oldest still
    running when this statement's snapshot was taken (PostgreSQL). On
    SQLite nothing written is ever behind it."""

    type = BigInteger()
    inherit_cache = True


@compiles(commit_horizon, "postgresql")
def _commit_horizon_postgresql(element, compiler, **kw):
    return "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


@compiles(commit_horizon, "sqlite")
def _commit_horizon_sqlite(element, compiler, **kw):
    return str(2**63 - 1)


class _estimated_count(FunctionElement):
    type = BigInteger()
    inherit_cache = True


@compiles(_estimated_count, "postgresql")
def _estimated_count_postgresql(element, compiler, **kw):
    # What the planner believes, from the statistics ANALYZE (autovacuum)
    # keeps: the value's share of the column's most common values times
    # the table's row count. NULL before the first ANALYZE, or for a value
    # too rare to be listed.
    table, column, value = (
        compiler.process(clause, **kw) for clause in element.clauses
    )
    return (
        "(SELECT (s.most_common_freqs[array_position("
        f"s.most_common_vals::text::text[], CAST({value} AS text))] "
        "* c.reltuples)::bigint FROM pg_stats s JOIN pg_class c "
        f"ON c.oid = CAST({table} AS regclass) WHERE s.schemaname = current_schema() "
        f"AND s.tablename = {table} AND s.attname = {column})"
    )


@compiles(_estimated_count, "sqlite")
def _estimated_count_sqlite(element, compiler, **kw):
    return "NULL"  # SQLite keeps no such statistics: counts stay exact


def estimated_count(column: Any, value: str) -> Any:
    """The database's estimate of how many rows have `column = value`, or
    NULL where it has none."""
    return _estimated_count(
        literal(column.table.name), literal(column.name), literal(value)
    )


class ListOf(TypeDecorator[list]):
    """A list bound as ONE parameter, however long: an array on PostgreSQL,
    JSON text on SQLite (read there with json_each). The statement is then
    the same for every list, so it is compiled, and prepared, once."""

    impl = Text
    cache_ok = True

    def __init__(self, item_type: Any) -> None:
        super().__init__()
        self.item_type = item_type

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(self.item_type))
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if dialect.name == "postgresql" or value is None:
            return value
        item = self.item_type.dialect_impl(dialect).bind_processor(dialect)
        return json.dumps([item(v) if item else v for v in value])


class one_of(FunctionElement):
    """`column` is one of the values of a `ListOf` parameter."""

    type = Integer()  # a condition; the type is never read
    inherit_cache = True


@compiles(one_of, "postgresql")
def _one_of_postgresql(element, compiler, **kw):
    column, values = element.clauses
    array = compiler.dialect.type_compiler_instance.process(
        values.type.load_dialect_impl(compiler.dialect)
    )
    return (
        f"{compiler.process(column, **kw)} = "
        f"ANY(CAST({compiler.process(values, **kw)} AS {array}))"
    )


@compiles(one_of, "sqlite")
def _one_of_sqlite(element, compiler, **kw):
    column, values = element.clauses
    return (
        f"{compiler.process(column, **kw)} IN "
        f"(SELECT value FROM json_each({compiler.process(values, **kw)}))"
    )


# --- What a write is ---------------------------------------------------------


class Row:
    """A job's columns by name, over some selectable (the table, a CTE), with
    some of them replaced by expressions: the row after a change is the row
    before with the change's values."""

    def __init__(self, columns: Any, replaced: Mapping[str, Any] | None = None):
        self._columns = columns
        self._replaced = {
            name: value if isinstance(value, ClauseElement) else literal(value)
            for name, value in (replaced or {}).items()
        }

    def __getattr__(self, name: str) -> Any:
        if name in self._replaced:
            return self._replaced[name]
        return self._columns[name]


class _NoRow:
    """The row before a job existed: every column NULL."""

    def __getattr__(self, name: str) -> Any:
        return null()


NO_ROW = _NoRow()
Expressions = Callable[[Row], Mapping[str, Any]]
Conditions = Callable[[Row], Sequence[Any]]
# The job a change to one job is about.
JOB_ID = bindparam("job_id", type_=JOBS.c.id.type)


def _none(_job: Row) -> Sequence[Any]:
    return ()


def _new_worker(_old: Row, new: Row) -> Any:
    return new.worker_id


def _no_detail(_old: Row, _new: Row) -> Mapping[str, Any]:
    return {}


@dataclass(frozen=True)
class Event:
    """An event kind: what a change records, as expressions over the job
    before (`old`) and after (`new`), where `when` holds. From and to status
    are the job's own unless given; its time is the job's new `updated_at`;
    its actor is the change's."""

    type: EventType
    detail: Callable[[Row, Row], Mapping[str, Any]] = _no_detail
    worker: Callable[[Row, Row], Any] = _new_worker
    when: Callable[[Row, Row], Any] | None = None
    from_status: str | None = None
    to_status: str | None = None

    def columns(self, old: Row, new: Row, actor: Any) -> list[Any]:
        """The event's row, in the order of `EVENT_COLUMNS`."""
        return [
            new.id,
            new.updated_at,
            literal(self.type.value),
            old.status if self.from_status is None else literal(self.from_status),
            new.status if self.to_status is None else literal(self.to_status),
            actor,
            self.worker(old, new),
            json_object(self.detail(old, new)),
            current_xid(),
        ]


EVENT_COLUMNS = [column.name for column in EVENTS.c if column.name != "seq"]


@dataclass(frozen=True)
class Pick:
    """Jobs to take: conditions, order and limit over the table.
    `skip_locked`: pass rows another writer holds (a claim) rather than wait
    for them (a change to one job, which must see its latest state)."""

    where: Conditions
    order_by: Conditions = _none
    limit: Any = None
    skip_locked: bool = False


@dataclass(frozen=True)
class Change:
    """One write to existing jobs: the jobs its picks select (with several
    picks, the best `limit` of them all by `order_by`), the values they get,
    who makes the change, and the events recorded for each. `one_job`: the
    change is to the job `JOB_ID`, and a refusal returns the job as it stood."""

    picks: tuple[Pick, ...]
    values: Expressions
    actor: Any
    events: tuple[Event, ...] = ()
    order_by: Conditions = _none
    limit: Any = None
    one_job: bool = False

    def conditions(self, pick: Pick, job: Row) -> list[Any]:
        by_id = [job.id == JOB_ID] if self.one_job else []
        return [*by_id, *pick.where(job)]

    def order(self, job: Row) -> Sequence[Any]:
        """The order changed jobs come back in (and the best are picked by)."""
        if len(self.picks) > 1:
            return self.order_by(job)
        return self.picks[0].order_by(job) or (job.seq,)


@dataclass(frozen=True)
class NewJob:
    """A create: the new job's values are its parameters (by column name),
    but for those `stamped` gives from its new `created_at`, which the
    create clock hands out (db_models.CREATE_CLOCK); its events' actor is
    its creator."""

    stamped: Callable[[Row, Any], Mapping[str, Any]]
    events: tuple[Event, ...]

    def columns(self, created_at: Any) -> list[Any]:
        """The new row's values, for every column but `seq`."""
        given = Row({name: _given(name) for name in _NEW})
        stamped = self.stamped(given, created_at)
        return [stamped.get(name, getattr(given, name)) for name in _NEW]


def _given(name: str) -> Any:
    # Not named like the column: an UPDATE in the same statement (the clock's)
    # would take a parameter named like one of its columns as a value to SET.
    return bindparam(f"given_{name}", type_=JOBS.c[name].type)


def given(values: Mapping[str, Any]) -> dict[str, Any]:
    """A new job's column values as the parameters of `NewJob.columns`,
    and the time the create clock is moved on to."""
    return {
        **{f"given_{name}": value for name, value in values.items()},
        "now": values["created_at"],
    }


# The columns a create sets: all but the database's counter.
_NEW = [column.name for column in JOBS.c if column.name != "seq"]
# The create clock, moved on to the new job's time (a parameter of its own:
# one named like a column would be one more value for the UPDATE to SET).
_TICK = (
    update(CREATE_CLOCK)
    .values(
        created_at=greatest(
            CREATE_CLOCK.c.created_at, bindparam("now", type_=UTCDateTime())
        )
    )
    .returning(CREATE_CLOCK.c.created_at)
)


@dataclass
class Outcome:
    """Per change, the changed jobs (each with `old_status`) in pick order;
    for a change to one job that changed nothing, the job as it stood
    (None: there is no such job)."""

    changed: list[list[Mapping[str, Any]]]
    current: Mapping[str, Any] | None = None


# Which new events also go to the outbox: a condition over an event row.
Queued = Callable[[Any], Any] | None


class Driver(Protocol):
    def run(
        self, connection: Connection, changes: tuple[Change, ...], params: dict
    ) -> Outcome:
        """Run the changes, in order, with their events (and the outbox's)."""

    def insert(
        self, connection: Connection, new_job: NewJob, values: dict
    ) -> Mapping[str, Any]:
        """Insert a job (`values` by column name) with its events; returns
        the stored row."""


def driver_for(url: str, queued: Queued = None) -> Driver:
    """The driver for the database at `url`; `queued` picks the new events
    that go to the outbox too (None: none, nothing is published)."""
    if url.startswith("postgresql"):
        return PostgresDriver(queued)
    return SQLiteDriver(queued)


# --- PostgreSQL: one statement -------------------------------------------------


class PostgresDriver:
    def __init__(self, queued: Queued = None) -> None:
        self.queued = queued

    def run(
        self, connection: Connection, changes: tuple[Change, ...], params: dict
    ) -> Outcome:
        statement = _pg_changes(changes, self.queued)
        rows = connection.execute(statement, params).mappings().all()
        changed: list[list[Mapping[str, Any]]] = [[] for _ in changes]
        current = None
        for row in rows:
            if row["part"] < 0:
                current = row
            else:
                changed[row["part"]].append(row)
        return Outcome(changed, None if any(changed) else current)

    def insert(
        self, connection: Connection, new_job: NewJob, values: dict
    ) -> Mapping[str, Any]:
        return connection.execute(_pg_insert(new_job), given(values)).mappings().one()


def _pg_picked(change: Change, index: int) -> Any:
    """The jobs the change takes, locked, as a MATERIALIZED CTE: evaluated
    exactly once (as a plain subquery PostgreSQL may rescan it, locking more
    rows than it returns)."""

    def locked(pick: Pick) -> Select:
        job = Row(JOBS.c)
        query = select(JOBS).where(*change.conditions(pick, job))
        query = query.order_by(*pick.order_by(job)).limit(pick.limit)
        return query.with_for_update(skip_locked=pick.skip_locked)

    if len(change.picks) == 1:
        best = locked(change.picks[0])
    else:
        # Each pick through its own index, then the best of them all.
        parts = [
            locked(pick).cte(f"pick_{index}_{n}").prefix_with("MATERIALIZED")
            for n, pick in enumerate(change.picks)
        ]
        candidates = union_all(*(select(part) for part in parts)).subquery()
        best = (
            select(candidates)
            .order_by(*change.order_by(Row(candidates.c)))
            .limit(change.limit)
        )
    return best.cte(f"picked_{index}").prefix_with("MATERIALIZED")


@cache
def _pg_changes(changes: tuple[Change, ...], queued: Queued) -> Select:
    """Every change and all their events in one statement.

    Every part sees the same snapshot, and the changes must pick disjoint
    rows (no row can be updated twice in one statement). Each row returned
    is a changed job with `part` (its change's index) and `old_status`; for
    a change to one job, also the job as the snapshot shows it (`part` -1).
    """
    parts, events = [], []
    for index, change in enumerate(changes):
        picked = _pg_picked(change, index)
        old = Row(picked.c)
        new = Row(picked.c, change.values(old))
        changed = (
            update(JOBS)
            .where(JOBS.c.seq == picked.c.seq)
            .values(change.values(Row(JOBS.c)))
            .returning(*JOBS.c, picked.c.status.label("old_status"))
            .cte(f"changed_{index}")
        )
        position = func.row_number().over(order_by=change.order(Row(changed.c)))
        parts.append(
            select(literal(index).label("part"), position.label("position"), *changed.c)
        )
        for kind in change.events:
            event = select(
                literal(len(events)).label("kind"),
                picked.c.seq.label("job_seq"),
                *kind.columns(old, new, change.actor),
            )
            if kind.when is not None:
                event = event.where(kind.when(old, new))
            events.append(event)
    if changes[0].one_job:
        parts.append(
            select(
                literal(-1).label("part"),
                literal(0).label("position"),
                *JOBS.c,
                null().label("old_status"),
            ).where(JOBS.c.id == JOB_ID)
        )
    rows = (union_all(*parts) if len(parts) > 1 else parts[0]).subquery("rows")
    query = select(rows).order_by(rows.c.part, rows.c.position)
    if events:
        every = union_all(*events).subquery("new_events")
        recorded = (
            insert(EVENTS)
            .from_select(
                EVENT_COLUMNS,
                select(*list(every.c)[2:]).order_by(every.c.kind, every.c.job_seq),
            )
            .returning(*EVENTS.c)
            .cte("events")
        )
        query = query.add_cte(recorded)
        if queued is not None:
            outbox = insert(OUTBOX).from_select(
                ["event_seq"], select(recorded.c.seq).where(queued(recorded.c))
            )
            query = query.add_cte(outbox.cte("queued"))
    return prepared(query)


@cache
def _pg_insert(new_job: NewJob) -> Any:
    """The create clock's tick, the INSERT and its events in one statement.
    The clock's row lock is held to the commit: creates commit one at a
    time, each taking its `seq` after the one before committed, so `seq`
    order is commit order and a cursor walk (a keyset on `seq`) can never
    pass a job that commits later with a smaller one."""
    clock = _TICK.cte("clock")
    inserted = (
        insert(JOBS)
        .from_select(_NEW, select(*new_job.columns(clock.c.created_at)))
        .returning(*JOBS.c)
        .cte("new_job")
    )
    new = Row(inserted.c)
    recorded = union_all(
        *(
            select(*kind.columns(NO_ROW, new, new.created_by)).select_from(inserted)
            for kind in new_job.events
        )
    )
    events = insert(EVENTS).from_select(EVENT_COLUMNS, recorded).cte("events")
    return prepared(select(inserted).add_cte(events))


# --- SQLite: steps under the write lock ----------------------------------------

# The jobs a step of a change works on (SQLite).
_PICKED = bindparam("picked", type_=ListOf(JOBS.c.seq.type))


class SQLiteDriver:
    def __init__(self, queued: Queued = None) -> None:
        self.queued = queued

    def run(
        self, connection: Connection, changes: tuple[Change, ...], params: dict
    ) -> Outcome:
        changed = []
        for change in changes:
            picked = connection.execute(_sqlite_pick(change), params).all()
            if not picked:
                changed.append([])
                continue
            step = {**params, "picked": [seq for seq, _ in picked]}
            # The events first: they are computed from the jobs as they are.
            recorded = [
                seq
                for statement in _sqlite_events(change)
                for seq in connection.execute(statement, step).scalars()
            ]
            if recorded and self.queued is not None:
                connection.execute(_sqlite_queue(self.queued), {"recorded": recorded})
            rows = connection.execute(_sqlite_update(change), step).mappings().all()
            by_seq = {row["seq"]: row for row in rows}
            changed.append(
                [{**by_seq[seq], "old_status": status} for seq, status in picked]
            )
        current = None
        if changes[0].one_job and not any(changed):
            current = (
                connection.execute(select(JOBS).where(JOBS.c.id == JOB_ID), params)
                .mappings()
                .first()
            )
        return Outcome(changed, current)

    def insert(
        self, connection: Connection, new_job: NewJob, values: dict
    ) -> Mapping[str, Any]:
        params = given(values)
        connection.execute(_TICK, {"now": params["now"]})
        for statement in _sqlite_insert(new_job):
            connection.execute(statement, params)
        by_id = select(JOBS).where(JOBS.c.id == _given("id"))
        return connection.execute(by_id, params).mappings().one()


@cache
def _sqlite_pick(change: Change) -> Select:
    """The seq and status of each job the change takes, in order."""

    def pick(pick: Pick) -> Select:
        job = Row(JOBS.c)
        query = select(JOBS).where(*change.conditions(pick, job))
        return query.order_by(*pick.order_by(job)).limit(pick.limit)

    if len(change.picks) == 1:
        best = pick(change.picks[0]).subquery()
    else:
        parts = [select(pick(part).subquery()) for part in change.picks]
        candidates = union_all(*parts).subquery()
        best = (
            select(candidates)
            .order_by(*change.order_by(Row(candidates.c)))
            .limit(change.limit)
            .subquery()
        )
    return select(best.c.seq, best.c.status).order_by(*change.order(Row(best.c)))


@cache
def _sqlite_events(change: Change) -> list[Any]:
    old = Row(JOBS.c)
    new = Row(JOBS.c, change.values(old))
    statements = []
    for kind in change.events:
        rows = select(*kind.columns(old, new, change.actor)).where(
            one_of(JOBS.c.seq, _PICKED)
        )
        if kind.when is not None:
            rows = rows.where(kind.when(old, new))
        statements.append(
            insert(EVENTS)
            .from_select(EVENT_COLUMNS, rows.order_by(JOBS.c.seq))
            .returning(EVENTS.c.seq)
        )
    return statements


@cache
def _sqlite_queue(queued: Queued) -> Any:
    recorded = bindparam("recorded", type_=ListOf(EVENTS.c.seq.type))
    return insert(OUTBOX).from_select(
        ["event_seq"],
        select(EVENTS.c.seq).where(one_of(EVENTS.c.seq, recorded), queued(EVENTS.c)),
    )


@cache
def _sqlite_update(change: Change) -> Any:
    return (
        update(JOBS)
        .where(one_of(JOBS.c.seq, _PICKED))
        .values(change.values(Row(JOBS.c)))
        .returning(*JOBS.c)
    )


@cache
def _sqlite_insert(new_job: NewJob) -> list[Any]:
    """The INSERT, its time from the clock just moved on, then its events."""
    stored = insert(JOBS).from_select(
        _NEW, select(*new_job.columns(CREATE_CLOCK.c.created_at))
    )
    new = Row(JOBS.c)
    by_id = JOBS.c.id == _given("id")
    return [
        stored,
        *(
            insert(EVENTS).from_select(
                EVENT_COLUMNS,
                select(*kind.columns(NO_ROW, new, new.created_by)).where(by_id),
            )
            for kind in new_job.events
        ),
    ]
