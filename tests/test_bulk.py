"""Issue 19: POST /extraction-jobs/bulk, on SQLite and PostgreSQL: what it
selects, what a dry run does, 1000 jobs a call with `more`, the events it
writes, bad input, and a bulk cancel racing concurrent claims.
"""

import random
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Clock
from fastapi.testclient import TestClient
from sqlalchemy import func, select

import database
from db_models import JOBS
from tests.operator_helpers import (
    assert_422,
    bulk,
    cancel,
    claim,
    create,
    events,
    heartbeat,
    histories,
    job,
    kinds,
    ok,
    patch,
    retry,
    seed,
)

UNKNOWN_ID = "0b7c3a52-8a1e-4a53-9d38-6f0a3c0d2b11"


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)


def every_state(client, document_id: str) -> dict[str, str]:
    """One job of each state a bulk action meets, all with `document_id`;
    by name: pending, processing, asked (processing, cancel requested),
    completed, failed, cancelled. Nothing else is pending when called."""
    names = ["processing", "asked", "completed", "failed", "cancelled", "pending"]
    ids = {name: create(client, document_id)["id"] for name in names}
    for name in names[:4]:
        [held] = claim(client, f"w-{name}")
        assert held["id"] == ids[name]
    ok(cancel(client, ids["asked"]))
    ok(patch(client, ids["completed"], status="completed", worker_id="w-completed"))
    ok(patch(client, ids["failed"], status="failed", worker_id="w-failed"))
    ok(cancel(client, ids["cancelled"]))
    return ids


def snapshot(client, ids) -> list:
    return [(job(client, job_id), events(client, job_id)) for job_id in ids]


# --- what a call selects and answers ----------------------------------------------


@pytest.mark.parametrize(
    "action, applies",
    [("cancel", {"pending", "processing"}), ("retry", {"failed", "cancelled"})],
)
def test_dry_run_counts_what_the_action_applies_to_and_changes_nothing(
    client, action, applies
):
    ids = every_state(client, "mixed")
    before = snapshot(client, ids.values())
    outcome = ok(
        bulk(client, action=action, filter={"document_id": "mixed"}, dry_run=True)
    )
    assert outcome == {
        "matched": len(applies),
        "changed": 0,
        "dry_run": True,
        "more": False,
    }
    assert snapshot(client, ids.values()) == before
    done = ok(bulk(client, action=action, filter={"document_id": "mixed"}))
    assert done == {
        "matched": len(applies),
        "changed": len(applies),
        "dry_run": False,
        "more": False,
    }
    after = snapshot(client, ids.values())
    changed = {
        name
        for name, (was, now) in zip(ids, zip(before, after, strict=True), strict=True)
        if was != now
    }
    assert changed == applies
    again = ok(bulk(client, action=action, filter={"document_id": "mixed"}))
    assert (again["matched"], again["changed"], again["more"]) == (0, 0, False)


def test_ids_and_filter_must_both_hold(client):
    ids = every_state(client, "both")
    other = create(client, "elsewhere")["id"]
    outcome = ok(
        bulk(
            client,
            action="cancel",
            ids=[ids["pending"], ids["completed"], other, UNKNOWN_ID],
            filter={"document_id": "both"},
        )
    )
    assert (outcome["matched"], outcome["changed"]) == (1, 1)
    assert job(client, ids["pending"])["status"] == "cancelled"
    assert job(client, other)["status"] == "pending"
    assert job(client, ids["processing"])["cancel_requested_at"] is None


def test_ids_alone_select_those_jobs(client):
    first, second, third = (create(client, f"d{n}")["id"] for n in range(3))
    outcome = ok(bulk(client, action="cancel", ids=[first, third, UNKNOWN_ID]))
    assert (outcome["matched"], outcome["changed"], outcome["more"]) == (2, 2, False)
    assert [job(client, i)["status"] for i in (first, second, third)] == [
        "cancelled",
        "pending",
        "cancelled",
    ]


def test_each_filter_selects_what_the_list_with_that_filter_shows(client, clock):
    """status (one, several), document_id, worker_id, created_after
    (inclusive), created_before (exclusive), together and alone."""
    made = []
    for n in range(12):
        made.append(create(client, f"doc-{n % 3}"))
        clock.advance(1)
    for n in (0, 4, 8):
        ok(patch(client, made[n]["id"], status="processing", worker_id=f"w-{n % 2}"))
    ok(cancel(client, made[1]["id"]))
    ok(patch(client, made[2]["id"], status="failed"))
    edge = made[5]["created_at"]
    filters = [
        {"status": "pending"},
        {"status": ["pending", "processing"]},
        {"document_id": "doc-1"},
        {"worker_id": "w-0"},
        {"created_after": edge},
        {"created_before": edge},
        {
            "created_after": made[3]["created_at"],
            "created_before": made[9]["created_at"],
        },
        {"status": ["processing"], "worker_id": "w-0", "document_id": "doc-2"},
    ]
    cancellable = {"pending", "processing"}
    for selection in filters:
        params = {**selection, "limit": 1000}
        listed = ok(client.get("/extraction-jobs", params=params))
        expected = {j["id"] for j in listed if j["status"] in cancellable}
        outcome = ok(bulk(client, action="cancel", filter=selection, dry_run=True))
        assert outcome["matched"] == len(expected), selection
    after = {
        j["id"]
        for j in ok(client.get("/extraction-jobs", params={"created_after": edge}))
    }
    before = {
        j["id"]
        for j in ok(client.get("/extraction-jobs", params={"created_before": edge}))
    }
    assert made[5]["id"] in after and made[5]["id"] not in before
    assert after | before == {j["id"] for j in made} and not after & before


def test_a_selection_over_1000_jobs_finishes_by_repeating_the_request(app, client):
    ids = seed(app, 2300, "many")
    request = {"action": "cancel", "filter": {"document_id": "many"}}
    dry = ok(bulk(client, **request, dry_run=True))
    assert dry == {"matched": 2300, "changed": 0, "dry_run": True, "more": True}
    answers = []
    while True:
        answers.append(ok(bulk(client, **request)))
        if not answers[-1]["more"]:
            break
        assert len(answers) < 10
    assert [(a["matched"], a["changed"], a["more"]) for a in answers] == [
        (2300, 1000, True),
        (1300, 1000, True),
        (300, 300, False),
    ]
    counts = ok(client.get("/extraction-jobs/stats"))["counts"]
    assert (counts["cancelled"], counts["pending"]) == (2300, 0)
    # Each job was changed once: one cancelled event each.
    for job_id in (ids[0], ids[999], ids[1000], ids[-1]):
        assert kinds(client, job_id) == ["created", "cancelled"]
    retried = ok(bulk(client, action="retry", filter={"document_id": "many"}))
    assert (retried["matched"], retried["changed"], retried["more"]) == (
        2300,
        1000,
        True,
    )


# --- the same events as the single actions -----------------------------------------


def comparable(event: dict, job_after: dict) -> tuple:
    """An event without what differs between jobs; its time and any run_at
    it names must be the job's own."""
    assert event["at"] == job_after["updated_at"]
    detail = dict(event["detail"] or {})
    if "run_at" in detail:
        assert detail.pop("run_at") == job_after["run_at"]
    return (
        event["type"],
        event["from_status"],
        event["to_status"],
        event["actor"],
        event["worker_id"],
        detail,
    )


def job_shape(found: dict) -> tuple:
    return (
        found["status"],
        found["attempts"],
        found["error_message"],
        found["lease_expires_at"] is None,
        found["finished_at"] is None,
        found["cancel_requested_at"] is None,
        found["priority"],
    )


def test_each_changed_job_gets_the_event_the_single_action_writes(client):
    pairs = {}
    for state in ("pending", "processing", "failed", "cancelled"):
        pair = (create(client, state)["id"], create(client, state)["id"])
        for job_id in pair if state != "pending" else ():
            ok(patch(client, job_id, status="processing", worker_id="w-same"))
            if state == "failed":
                body = {"status": "failed", "error_message": "x"}
                ok(patch(client, job_id, worker_id="w-same", **body))
            if state == "cancelled":
                ok(patch(client, job_id, status="cancelled", worker_id="w-same"))
        pairs[state] = pair
    for state, (single, bulked) in pairs.items():
        if state in ("pending", "processing"):
            ok(cancel(client, single, reason="same reason"))
            request = {"action": "cancel", "ids": [bulked], "reason": "same reason"}
        else:
            ok(retry(client, single))
            request = {"action": "retry", "ids": [bulked]}
        assert ok(bulk(client, **request))["changed"] == 1
        after = [job(client, single), job(client, bulked)]
        assert job_shape(after[0]) == job_shape(after[1]), state
        one, many = (events(client, single), events(client, bulked))
        assert [e["type"] for e in one] == [e["type"] for e in many], state
        assert comparable(one[-1], after[0]) == comparable(many[-1], after[1]), state


def test_bulk_cancel_of_processing_jobs_asks_their_holders(client):
    created = [create(client, "held")["id"] for _ in range(2)]
    claim(client, "w1", limit=2)
    outcome = ok(bulk(client, action="cancel", filter={"worker_id": "w1"}))
    assert (outcome["matched"], outcome["changed"]) == (2, 2)
    for job_id in created:
        beat = ok(heartbeat(client, job_id, "w1"))
        assert (beat["status"], beat["cancel_requested_at"] is None) == (
            "processing",
            False,
        )
    assert ok(bulk(client, action="cancel", filter={"worker_id": "w1"}))["matched"] == 0


def test_bulk_retry_of_exhausted_jobs_restarts_their_attempts(client, clock: Clock):
    created = [create(client, "tired", max_attempts=1)["id"] for _ in range(3)]
    claim(client, "dies", limit=3, lease_seconds=10)
    clock.advance(11)
    assert claim(client, "next") == []
    assert {job(client, i)["status"] for i in created} == {"failed"}
    outcome = ok(bulk(client, action="retry", filter={"status": "failed"}))
    assert (outcome["matched"], outcome["changed"]) == (3, 3)
    taken = claim(client, "again", limit=3)
    assert sorted((j["id"], j["attempts"]) for j in taken) == sorted(
        (i, 1) for i in created
    )


# --- bad input ------------------------------------------------------------------------

A_UUID = str(uuid.uuid4())
BAD_BODIES = {
    "unknown field": {"action": "cancel", "ids": [A_UUID], "force": True},
    "unknown filter field": {"action": "cancel", "filter": {"state": "pending"}},
    "unknown action": {"action": "delete", "ids": [A_UUID]},
    "action of wrong type": {"action": 1, "ids": [A_UUID]},
    "no action": {"ids": [A_UUID]},
    "id not a UUID": {"action": "cancel", "ids": ["not-a-uuid"]},
    "id of wrong type": {"action": "cancel", "ids": [42]},
    "ids not a list": {"action": "cancel", "ids": A_UUID},
    "more than 1000 ids": {
        "action": "cancel",
        "ids": [str(uuid.uuid4()) for _ in range(1001)],
    },
    "empty selection": {"action": "cancel"},
    "empty filter": {"action": "retry", "filter": {}},
    "empty filter and ids": {"action": "cancel", "filter": {}, "ids": []},
    "empty status list": {"action": "cancel", "filter": {"status": []}},
    "null filter fields": {"action": "cancel", "filter": {"status": None}},
    "unknown status": {"action": "cancel", "filter": {"status": "done"}},
    "status of wrong type": {"action": "cancel", "filter": {"status": ["pending", 3]}},
    "naive created_after": {
        "action": "cancel",
        "filter": {"created_after": "2030-01-01T00:00:00"},
    },
    "naive created_before": {
        "action": "retry",
        "filter": {"created_before": "2030-01-01 00:00"},
    },
    "date without a time": {
        "action": "cancel",
        "filter": {"created_after": "2030-01-01"},
    },
    "epoch seconds": {"action": "cancel", "filter": {"created_after": 1893456000}},
    "not a time": {"action": "cancel", "filter": {"created_before": "yesterday"}},
    "empty document_id": {"action": "cancel", "filter": {"document_id": ""}},
    "NUL in document_id": {"action": "cancel", "filter": {"document_id": "a\u0000b"}},
    "worker_id of wrong type": {"action": "cancel", "filter": {"worker_id": 5}},
    "dry_run as text": {"action": "cancel", "ids": [A_UUID], "dry_run": "yes"},
    "dry_run as number": {"action": "cancel", "ids": [A_UUID], "dry_run": 1},
    "reason too long": {"action": "cancel", "ids": [A_UUID], "reason": "x" * 1001},
    "reason of wrong type": {"action": "cancel", "ids": [A_UUID], "reason": 7},
    "reason with retry": {"action": "retry", "ids": [A_UUID], "reason": "why"},
    "filter not an object": {"action": "cancel", "filter": "pending"},
    "body not an object": ["cancel"],
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_bulk_requests_are_422_with_a_detail(client, case):
    bystander = create(client, "bystander")
    assert_422(client.post("/extraction-jobs/bulk", json=BAD_BODIES[case]))
    assert job(client, bystander["id"]) == bystander


def test_1000_ids_and_a_1000_character_reason_are_accepted(client):
    known = create(client, "one")["id"]
    ids = [known] + [str(uuid.uuid4()) for _ in range(999)]
    outcome = ok(bulk(client, action="cancel", ids=ids, reason="r" * 1000))
    assert (outcome["matched"], outcome["changed"]) == (1, 1)
    assert events(client, known)[-1]["detail"] == {"reason": "r" * 1000}


def test_unmatched_ids_match_nothing(client):
    outcome = ok(bulk(client, action="retry", ids=[UNKNOWN_ID]))
    assert outcome == {"matched": 0, "changed": 0, "dry_run": False, "more": False}


# --- a bulk cancel racing claims ----------------------------------------------------


def test_bulk_cancel_during_a_claim_race_never_both_claims_and_cancels(app, client):
    """12 claimers take jobs (of mixed priority, so from all over the table)
    while an operator bulk-cancels them, by ids 50 at a time in random
    order, then by a filter (1000 a call) until `more` is false. PostgreSQL
    runs them truly at once."""
    total = 1500
    ids = []
    for priority in range(10):
        ids += seed(app, total // 10, "race", priority=priority)
    claimed: list[dict] = []
    answers: list[dict] = []
    lock = threading.Lock()
    started = threading.Barrier(13)
    first_claim = threading.Event()

    def claimer(n: int) -> None:
        worker = TestClient(app)
        started.wait()
        while True:
            batch = claim(worker, f"racer-{n}", limit=3, lease_seconds=600)
            first_claim.set()
            if not batch:
                return
            with lock:
                claimed.extend(batch)

    def operator() -> None:
        admin = TestClient(app)
        started.wait()
        first_claim.wait(timeout=30)
        # Many short calls over jobs all over the table, interleaved with
        # the claims; then the whole filter, until nothing is left.
        shuffled = random.Random(19).sample(ids, len(ids))
        for start in range(0, len(shuffled), 50):
            chunk = shuffled[start : start + 50]
            answers.append(ok(bulk(admin, action="cancel", ids=chunk)))
        request = {
            "action": "cancel",
            "filter": {"status": ["pending", "processing"], "document_id": "race"},
        }
        while True:
            answer = ok(bulk(admin, **request))
            answers.append(answer)
            if not answer["more"]:
                return
            assert len(answers) < 200

    with ThreadPoolExecutor(max_workers=13) as pool:
        futures = [pool.submit(claimer, n) for n in range(12)]
        futures.append(pool.submit(operator))
        for future in futures:
            future.result()

    by_claim = Counter(j["id"] for j in claimed)
    assert set(by_claim.values()) <= {1}  # no job claimed twice
    listed = ok(client.get("/extraction-jobs", params={"limit": 1000}))
    listed += ok(client.get("/extraction-jobs", params={"limit": 1000, "offset": 1000}))
    final = {j["id"]: j for j in listed}
    assert set(final) == set(ids)  # every job accounted for
    cancelled = {i for i, j in final.items() if j["status"] == "cancelled"}
    processing = {i for i, j in final.items() if j["status"] == "processing"}
    assert cancelled | processing == set(ids)
    assert processing == set(by_claim)  # the claimed run, nothing else does
    assert not cancelled & set(by_claim)  # never both claimed and cancelled
    assert len(cancelled) > 0 and len(processing) > 0, (len(cancelled), len(processing))
    for job_id in cancelled:
        found = final[job_id]
        assert (found["lease_expires_at"], found["worker_id"], found["attempts"]) == (
            None,
            None,
            0,
        )
    changed_events = 0
    every_history = histories(app)
    for job_id in ids:
        history = every_history[job_id]
        changed_events += history.count("cancelled")
        if "cancelled" in history and "claimed" in history:
            # Asked while processing: the claim came first, never after.
            assert history == ["created", "claimed", "cancelled"], history
        else:
            assert history in (["created", "cancelled"], ["created", "claimed"]), (
                history
            )
    assert changed_events == sum(answer["changed"] for answer in answers)
    # `more: false` meant it: nothing is left to cancel, every holder asked.
    assert all(final[i]["cancel_requested_at"] is not None for i in processing)
    assert (
        ok(bulk(client, action="cancel", filter={"document_id": "race"}))["matched"]
        == 0
    )
    with database.get_engine(app.state.service.repository.url).connect() as connection:
        leased_cancelled = connection.execute(
            select(func.count()).where(
                JOBS.c.status == "cancelled", JOBS.c.lease_expires_at.is_not(None)
            )
        ).scalar()
    assert leased_cancelled == 0
