"""Conversion between stored rows and the HTTP contract, so no row leaves
the repository. The contract's fields are the column list: a job's row is
its `Job` fields plus the columns only the service reads (`ROW_ONLY`), an
event's row its `JobEvent` fields plus `EVENT_ROW_ONLY`, and
tests/test_schemas.py keeps the tables and the models in step.

Jobs are built by pydantic's compiled validator from a plain dict of the
row's values: for a row of the table it is about a third faster than
`model_construct`, which loops over the fields in Python, and it checks on
the way out what the table's constraints already hold.
"""

import uuid
from collections.abc import Mapping
from typing import Any

from models import Job, JobEvent

JOB_FIELDS = tuple(Job.model_fields)
# Columns of a job's row that the contract does not show.
ROW_ONLY = ("seq", "idempotency_key", "lease_owner")
# An event's fields, by its row's columns (`id` is the event's `seq`).
EVENT_FIELDS = {name: name for name in JobEvent.model_fields} | {"id": "seq"}
# Columns of an event's row that the contract does not show: `xid`, the
# writing transaction's id, orders the change feed (repository._feed) and
# travels only inside its signed cursor; it means nothing to a client (and
# is 0 on SQLite).
EVENT_ROW_ONLY = ("xid",)

_validate_job = Job.__pydantic_validator__.validate_python
_validate_event = JobEvent.__pydantic_validator__.validate_python


def job_from_row(row: Mapping[str, Any]) -> Job:
    """A job from a Core result row (its mapping, keyed by column name)."""
    values = {name: row[name] for name in JOB_FIELDS}
    values["id"] = str(values["id"])
    return _validate_job(values)


def to_values(job: Job, idempotency_key: str | None = None) -> dict[str, Any]:
    """The column values (by column name) of a new job's row."""
    values: dict[str, Any] = {name: getattr(job, name) for name in JOB_FIELDS}
    values["id"] = uuid.UUID(job.id)
    values["status"] = job.status.value
    return {**values, "idempotency_key": idempotency_key, "lease_owner": None}


def to_event(row: Mapping[str, Any]) -> JobEvent:
    """An event from a Core result row of `extraction_job_event`."""
    values = {field: row[column] for field, column in EVENT_FIELDS.items()}
    values["job_id"] = str(values["job_id"])
    return _validate_event(values)
