"""Lists said once: the job columns, the event columns and the statuses.

A job's row is its `Job` fields plus `schemas.ROW_ONLY`, an event's its
`JobEvent` fields plus `schemas.EVENT_ROW_ONLY`; the statuses
(models.JobStatus) drive StatusCounts, the finished set, the state machine,
the CHECK constraint and the partial indexes (their SQL is compared with the
migrated databases by tests/test_migrations.py).
"""

import pytest
from fastapi.testclient import TestClient

import repository
import schemas
import service
from db_models import EVENTS, JOBS
from main import create_app
from models import FINISHED, EventType, Job, JobEvent, JobStatus, StatusCounts

STATUSES = [status.value for status in JobStatus]


def test_a_jobs_row_is_its_contract_fields_and_the_row_only_columns():
    columns = [column.name for column in JOBS.c]
    assert len(columns) == len(set(columns))
    assert set(schemas.ROW_ONLY).isdisjoint(Job.model_fields)
    assert set(columns) == set(Job.model_fields) | set(schemas.ROW_ONLY)
    assert schemas.JOB_FIELDS == tuple(Job.model_fields)


def test_an_events_row_is_its_contract_fields_and_the_row_only_columns():
    columns = [column.name for column in EVENTS.c]
    assert len(columns) == len(set(columns))
    assert set(schemas.EVENT_FIELDS) == set(JobEvent.model_fields)
    assert set(schemas.EVENT_ROW_ONLY).isdisjoint(schemas.EVENT_FIELDS.values())
    assert set(columns) == set(schemas.EVENT_FIELDS.values()) | set(
        schemas.EVENT_ROW_ONLY
    )


def test_status_counts_are_one_field_per_status_in_the_enums_order():
    assert list(StatusCounts.model_fields) == STATUSES


def test_stats_answer_a_count_for_every_status(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    counts = TestClient(create_app()).get("/extraction-jobs/stats").json()["counts"]
    assert list(counts) == STATUSES


def test_the_state_machine_covers_every_status_and_finished_is_final():
    assert set(service.TRANSITIONS) == set(JobStatus)
    assert FINISHED < set(JobStatus)
    for status in FINISHED:
        assert service.TRANSITIONS[status] == frozenset()
    for status in set(JobStatus) - FINISHED:
        assert service.TRANSITIONS[status]  # an unfinished job can move
    for target, sources in service.SOURCES.items():
        assert {s for s in JobStatus if target in service.TRANSITIONS[s]} == sources


def test_every_status_a_patch_reaches_records_an_event_kind():
    reachable = set().union(*service.TRANSITIONS.values())
    assert set(repository.MOVED_TO) == reachable
    assert {kind.type for kind in repository.MOVED_TO.values()} <= set(EventType)


def _constraint(name: str) -> str:
    [check] = [c for c in JOBS.constraints if c.name == name]
    return str(check.sqltext)


def _index_predicate(name: str) -> str:
    [index] = [i for i in JOBS.indexes if i.name == name]
    return str(index.partial_where)


@pytest.mark.parametrize("status", STATUSES)
def test_the_status_check_allows_each_status_and_only_those(status):
    check = _constraint("ck_extraction_job_status")
    assert f"'{status}'" in check
    assert check.count("'") == 2 * len(STATUSES)


def test_the_partial_indexes_are_derived_from_the_statuses():
    finished = _index_predicate("ix_extraction_job_finished")
    assert all(f"'{s.value}'" in finished for s in FINISHED)
    assert finished.count("'") == 2 * len(FINISHED)
    assert _index_predicate("ix_extraction_job_pending_claim") == "status = 'pending'"
    assert _index_predicate("ix_extraction_job_lease") == "status = 'processing'"
