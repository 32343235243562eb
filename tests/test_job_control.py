"""Issue 19: cancel, retry and release of one job, on SQLite and PostgreSQL.

Most rules run on the test clock (tests/conftest.py `Clock`, the service's
clock moved by hand). The cooperative cancel runs on the real clock: real
heartbeats, leases that really run out (the minimum lease, 10 s), one wait
per database.
"""

import json
from datetime import timedelta

import pytest
from conftest import Clock
from fastapi.testclient import TestClient

import observability
import settings
from main import run_sweep
from tests.operator_helpers import (
    cancel,
    claim,
    create,
    events,
    heartbeat,
    job,
    kinds,
    make_app,
    ok,
    patch,
    release,
    retry,
    sleep_past,
    ts,
)

LAPSED_REASON = "the lease ran out after the cancel request"


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)


def last_event(client, job_id) -> dict:
    return events(client, job_id)[-1]


# --- cancel ---------------------------------------------------------------------


def test_cancel_of_a_pending_job_is_at_once_with_its_event(client):
    pending = create(client)
    cancelled = ok(cancel(client, pending["id"], reason="uploaded the wrong file"))
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    assert cancelled["cancel_requested_at"] == cancelled["finished_at"]
    assert cancelled["version"] == pending["version"] + 1
    assert job(client, pending["id"]) == cancelled
    event = last_event(client, pending["id"])
    assert (event["type"], event["from_status"], event["to_status"]) == (
        "cancelled",
        "pending",
        "cancelled",
    )
    assert event["detail"] == {"reason": "uploaded the wrong file"}
    assert event["at"] == cancelled["updated_at"]
    assert claim(client) == []  # never runs


def test_cancel_without_a_reason_records_a_null_reason(client):
    pending = create(client)
    ok(cancel(client, pending["id"]))
    assert last_event(client, pending["id"])["detail"] == {"reason": None}


def test_cancel_of_a_processing_job_asks_its_holder(client):
    created = create(client)
    [held] = claim(client, "w1")
    asked = ok(cancel(client, created["id"], reason="stop"))
    assert asked["status"] == "processing"
    assert asked["cancel_requested_at"] is not None
    assert asked["finished_at"] is None
    assert (asked["worker_id"], asked["lease_expires_at"]) == (
        "w1",
        held["lease_expires_at"],
    )
    assert asked["version"] == held["version"] + 1
    event = last_event(client, created["id"])
    assert (event["type"], event["from_status"], event["to_status"]) == (
        "cancelled",
        "processing",
        "processing",
    )
    assert event["detail"] == {"reason": "stop"}


def test_cancel_asked_twice_or_of_a_cancelled_job_answers_it_unchanged(client):
    running = create(client, "running")
    waiting = create(client, "waiting")
    claim(client, "w1")
    asked = ok(cancel(client, running["id"], reason="first"))
    cancelled = ok(cancel(client, waiting["id"]))
    history = [kinds(client, running["id"]), kinds(client, waiting["id"])]
    assert ok(cancel(client, running["id"], reason="second")) == asked
    assert ok(cancel(client, waiting["id"], reason="again")) == cancelled
    assert [kinds(client, running["id"]), kinds(client, waiting["id"])] == history
    assert last_event(client, running["id"])["detail"] == {"reason": "first"}


@pytest.mark.parametrize("finish", ["completed", "failed"])
def test_cancel_of_a_finished_job_is_409(client, finish):
    created = create(client)
    claim(client, "w1")
    finished = ok(patch(client, created["id"], status=finish, worker_id="w1"))
    refused = cancel(client, created["id"], reason="too late")
    assert refused.status_code == 409, refused.text
    assert "finished" in refused.json()["detail"]
    assert job(client, created["id"]) == finished


def test_the_holder_honours_a_cancel_request_by_patching_cancelled(client):
    created = create(client)
    claim(client, "w1")
    ok(cancel(client, created["id"], reason="stop"))
    beat = ok(heartbeat(client, created["id"], "w1"))
    assert beat["cancel_requested_at"] is not None
    done = ok(patch(client, created["id"], status="cancelled", worker_id="w1"))
    assert done["status"] == "cancelled"
    assert done["finished_at"] is not None
    assert done["lease_expires_at"] is None
    event = last_event(client, created["id"])
    assert (event["type"], event["from_status"], event["to_status"]) == (
        "cancelled",
        "processing",
        "cancelled",
    )
    assert event["worker_id"] == "w1"


def test_only_the_holder_may_patch_a_processing_job_cancelled(client):
    created = create(client)
    claim(client, "w1")
    ok(cancel(client, created["id"]))
    refused = patch(client, created["id"], status="cancelled", worker_id="w2")
    assert refused.status_code == 409, refused.text
    assert job(client, created["id"])["status"] == "processing"


def test_a_pending_job_is_cancelled_through_cancel_not_patch(client):
    created = create(client)
    refused = patch(client, created["id"], status="cancelled")
    assert refused.status_code == 409, refused.text
    assert job(client, created["id"])["status"] == "pending"


@pytest.mark.parametrize("finish", ["completed", "failed"])
def test_a_holder_that_finishes_first_wins_and_the_request_stays_in_history(
    client, finish
):
    created = create(client)
    claim(client, "w1")
    ok(cancel(client, created["id"], reason="stop"))
    body = {"result": {"pages": 2}} if finish == "completed" else {}
    finished = ok(patch(client, created["id"], status=finish, worker_id="w1", **body))
    assert finished["status"] == finish
    assert kinds(client, created["id"]) == ["created", "claimed", "cancelled", finish]
    assert cancel(client, created["id"]).status_code == 409
    assert job(client, created["id"])["status"] == finish


@pytest.mark.parametrize("how", ["release", "patch pending"])
def test_a_holder_giving_back_a_cancel_requested_job_cancels_it(client, how):
    created = create(client)
    claim(client, "w1")
    ok(cancel(client, created["id"], reason="stop"))
    if how == "release":
        given_back = ok(release(client, created["id"], "w1"))
    else:
        given_back = ok(patch(client, created["id"], status="pending", worker_id="w1"))
    assert given_back["status"] == "cancelled"
    assert given_back["lease_expires_at"] is None
    assert given_back["finished_at"] is not None
    assert kinds(client, created["id"]) == [
        "created",
        "claimed",
        "cancelled",
        "cancelled",
    ]
    assert claim(client, "w2") == []


def test_lease_expiry_of_a_cancel_requested_job_cancels_it_on_the_test_clock(
    app, client, clock: Clock
):
    """The same rule as the real-time test below, for each way a lapse is
    handled: by a claim, by the sweep, and for a job out of attempts."""
    by_claim = create(client, "by-claim")
    by_sweep = create(client, "by-sweep")
    last_try = create(client, "last-try", max_attempts=1)
    for job_id, worker in [
        (by_claim["id"], "a"),
        (by_sweep["id"], "b"),
        (last_try["id"], "c"),
    ]:
        [held] = claim(client, worker, lease_seconds=10)
        assert held["id"] == job_id
    for job_id in (by_claim["id"], last_try["id"]):
        ok(cancel(client, job_id))
    ok(heartbeat(client, by_sweep["id"], "b", lease_seconds=30))
    ok(cancel(client, by_sweep["id"]))
    clock.advance(11)
    assert claim(client, "next", limit=10) == []
    for job_id in (by_claim["id"], last_try["id"]):
        lapsed = job(client, job_id)
        assert (lapsed["status"], lapsed["error_message"]) == ("cancelled", None)
        event = last_event(client, job_id)
        assert (event["type"], event["actor"], event["to_status"]) == (
            "cancelled",
            None,
            "cancelled",
        )
        assert event["detail"] == {"reason": LAPSED_REASON}
    assert job(client, by_sweep["id"])["status"] == "processing"
    clock.advance(30)
    assert run_sweep(app)["leases_cancelled"] == 1
    assert job(client, by_sweep["id"])["status"] == "cancelled"
    assert "lease_expired" not in kinds(client, by_sweep["id"])


# --- the cooperative cancel, in real time -------------------------------------


def test_cooperative_cancel_with_real_heartbeats_and_real_lease_expiry(
    database_url, monkeypatch
):
    """Really waited: about 14 s per database. One job of each branch:
    - honoured: the heartbeat answer carries the request, the holder PATCHes;
    - lapsed (claim): the lease runs out, the next claim cancels it, and a
      job out of attempts is cancelled too, not failed;
    - lapsed (sweep): a real heartbeat extended its lease past the claim's
      moment; when that runs out, the scheduled sweep cancels it;
    - a job with no cancel request lapses to the next claimer, as before;
    - finished first: completed (or failed) stands.
    """
    client = TestClient(make_app(database_url, monkeypatch))  # the real clock
    names = ["honoured", "by-claim", "last-try", "by-sweep", "control"]
    names += ["completes", "fails"]
    ids = {}
    for name in names:
        fields = {"max_attempts": 1} if name == "last-try" else {}
        ids[name] = create(client, name, **fields)["id"]
    held = {}
    for name in names:
        [taken] = claim(client, f"w-{name}", lease_seconds=10)
        assert taken["id"] == ids[name]
        held[name] = taken

    before = ok(heartbeat(client, ids["honoured"], "w-honoured", lease_seconds=10))
    assert before["cancel_requested_at"] is None
    asked = {
        name: ok(cancel(client, ids[name], reason=f"stop {name}"))
        for name in names
        if name != "control"
    }
    assert {job["status"] for job in asked.values()} == {"processing"}

    # Honoured: the next heartbeat answer says so, the holder stops.
    beat = ok(heartbeat(client, ids["honoured"], "w-honoured", lease_seconds=10))
    assert beat["status"] == "processing"
    assert beat["cancel_requested_at"] == asked["honoured"]["cancel_requested_at"]
    honoured = ok(
        patch(client, ids["honoured"], status="cancelled", worker_id="w-honoured")
    )
    assert (honoured["status"], honoured["lease_expires_at"]) == ("cancelled", None)

    # Finished first: that stands, the request stays in the history.
    ok(patch(client, ids["completes"], status="completed", worker_id="w-completes"))
    ok(patch(client, ids["fails"], status="failed", worker_id="w-fails"))

    # A real heartbeat moves by-sweep's lease past the others'.
    extended = ok(heartbeat(client, ids["by-sweep"], "w-by-sweep", lease_seconds=14))
    assert extended["cancel_requested_at"] == asked["by-sweep"]["cancel_requested_at"]
    assert ts(extended["lease_expires_at"]) > ts(held["by-sweep"]["lease_expires_at"])

    sleep_past(
        max(
            held[name]["lease_expires_at"]
            for name in ("by-claim", "last-try", "control")
        )
    )
    taken = claim(client, "w-next", limit=10, lease_seconds=60)
    # Only the job nobody asked to cancel runs again.
    assert [(job["id"], job["attempts"]) for job in taken] == [(ids["control"], 2)]
    for name in ("by-claim", "last-try"):
        lapsed = job(client, ids[name])
        assert lapsed["status"] == "cancelled", name
        assert (lapsed["lease_expires_at"], lapsed["error_message"]) == (None, None)
        assert kinds(client, ids[name]) == [
            "created",
            "claimed",
            "cancelled",
            "cancelled",
        ]
        event = last_event(client, ids[name])
        assert (event["from_status"], event["to_status"], event["actor"]) == (
            "processing",
            "cancelled",
            None,
        )
        assert event["detail"] == {"reason": LAPSED_REASON}
    assert job(client, ids["by-sweep"])["status"] == "processing"

    sleep_past(extended["lease_expires_at"])
    stats = ok(client.get("/extraction-jobs/stats"))
    assert stats["expired_leases"] == 1
    counts = run_sweep(client.app)
    assert counts["leases_cancelled"] == 1
    assert (counts["leases_failed"], counts["leases_released"]) == (0, 0)
    swept = job(client, ids["by-sweep"])
    assert (swept["status"], swept["lease_expires_at"]) == ("cancelled", None)
    assert kinds(client, ids["by-sweep"]) == [
        "created",
        "claimed",
        "cancelled",
        "cancelled",
    ]
    assert run_sweep(client.app)["leases_cancelled"] == 0

    for name, finish in (("completes", "completed"), ("fails", "failed")):
        assert job(client, ids[name])["status"] == finish
        history = events(client, ids[name])
        assert [event["type"] for event in history] == [
            "created",
            "claimed",
            "cancelled",
            finish,
        ]
        assert history[2]["detail"] == {"reason": f"stop {name}"}
    final = ok(client.get("/extraction-jobs/stats"))["counts"]
    assert final == {
        "pending": 0,
        "processing": 1,
        "completed": 1,
        "failed": 1,
        "cancelled": 4,
    }


# --- retry ------------------------------------------------------------------------


def exhaust(client, clock: Clock, job_id: str, max_attempts: int) -> dict:
    """Let the job's lease run out `max_attempts` times: it ends failed."""
    for attempt in range(1, max_attempts + 1):
        [taken] = claim(client, f"dies-{attempt}", lease_seconds=10)
        assert (taken["id"], taken["attempts"]) == (job_id, attempt)
        clock.advance(11)
    assert claim(client, "after") == []
    return job(client, job_id)


def test_retry_of_an_exhausted_job_gives_a_fresh_allowance(client, clock):
    created = create(client, max_attempts=2)
    failed = exhaust(client, clock, created["id"], 2)
    assert (failed["status"], failed["attempts"]) == ("failed", 2)
    assert failed["error_message"] == "lease expired after 2 attempts"

    retried = ok(retry(client, created["id"]))
    assert retried["status"] == "pending"
    assert retried["attempts"] == 0
    assert retried["max_attempts"] == 2
    for cleared in ("error_message", "cancel_requested_at", "finished_at"):
        assert retried[cleared] is None, cleared
    assert retried["lease_expires_at"] is None
    assert ts(retried["run_at"]) == ts(retried["updated_at"])
    event = last_event(client, created["id"])
    assert (event["type"], event["from_status"], event["to_status"]) == (
        "retried",
        "failed",
        "pending",
    )
    assert event["detail"] == {"run_at": retried["run_at"], "priority": 0}

    # Claimable, and its attempts restart: two more leases may run out.
    again = exhaust(client, clock, created["id"], 2)
    assert (again["status"], again["attempts"]) == ("failed", 2)


def test_retry_of_a_cancelled_job_clears_the_request(client):
    created = create(client)
    claim(client, "w1")
    ok(cancel(client, created["id"]))
    ok(patch(client, created["id"], status="cancelled", worker_id="w1"))
    retried = ok(retry(client, created["id"]))
    assert (retried["status"], retried["cancel_requested_at"]) == ("pending", None)
    [taken] = claim(client, "w2")
    assert (taken["id"], taken["attempts"]) == (created["id"], 1)
    beat = ok(heartbeat(client, created["id"], "w2"))
    assert beat["cancel_requested_at"] is None


def test_retry_takes_a_run_at_and_a_priority(client, clock):
    created = create(client, priority=1)
    ok(cancel(client, created["id"]))
    later = clock() + timedelta(hours=1)
    retried = ok(retry(client, created["id"], run_at=later.isoformat(), priority=9))
    assert (retried["priority"], ts(retried["run_at"])) == (9, later)
    assert last_event(client, created["id"])["detail"] == {
        "run_at": retried["run_at"],
        "priority": 9,
    }
    assert claim(client) == []
    clock.advance(3601)
    assert [job["id"] for job in claim(client)] == [created["id"]]


def test_retry_with_a_past_run_at_runs_now(client, clock):
    created = create(client)
    ok(cancel(client, created["id"]))
    retried = ok(retry(client, created["id"], run_at="2001-01-01T00:00:00Z"))
    assert ts(retried["run_at"]) == ts(retried["updated_at"])
    assert [job["id"] for job in claim(client)] == [created["id"]]


@pytest.mark.parametrize("status", ["pending", "processing", "completed"])
def test_retry_of_a_job_that_is_not_failed_or_cancelled_is_409(client, status):
    created = create(client)
    if status != "pending":
        claim(client, "w1")
    if status == "completed":
        ok(patch(client, created["id"], status="completed", worker_id="w1"))
    before = job(client, created["id"])
    refused = retry(client, created["id"])
    assert refused.status_code == 409, refused.text
    if status == "completed":
        assert "new job" in refused.json()["detail"]
    assert job(client, created["id"]) == before


def test_a_retried_job_is_not_retried_twice(client):
    created = create(client)
    ok(cancel(client, created["id"]))
    ok(retry(client, created["id"]))
    assert retry(client, created["id"]).status_code == 409
    assert kinds(client, created["id"]).count("retried") == 1


# --- release ------------------------------------------------------------------------


def test_release_gives_the_attempt_back(client):
    created = create(client, max_attempts=1)
    [first] = claim(client, "w1")
    released = ok(release(client, created["id"], "w1"))
    assert released["status"] == "pending"
    assert released["attempts"] == first["attempts"] - 1
    assert (released["lease_expires_at"], released["heartbeat_at"]) == (None, None)
    assert ts(released["run_at"]) == ts(released["updated_at"])
    event = last_event(client, created["id"])
    assert (event["type"], event["from_status"], event["to_status"]) == (
        "released",
        "processing",
        "pending",
    )
    assert event["worker_id"] == "w1"
    assert event["detail"] == {
        "run_at": released["run_at"],
        "attempts": released["attempts"],
        "error_message": None,
    }
    # The next claim's attempts equals this one's, even with max_attempts 1.
    [second] = claim(client, "w2")
    assert (second["id"], second["attempts"]) == (created["id"], first["attempts"])


def test_release_with_a_delay_keeps_the_job_back_that_long(client, clock):
    created = create(client)
    [first] = claim(client, "w1")
    released = ok(release(client, created["id"], "w1", retry_in_seconds=60))
    assert (ts(released["run_at"]) - ts(released["updated_at"])).total_seconds() == 60
    assert claim(client, "w2") == []
    clock.advance(61)
    [second] = claim(client, "w2")
    assert second["attempts"] == first["attempts"]


def test_patch_pending_with_retry_in_seconds_still_spends_the_attempt(client):
    created = create(client)
    [first] = claim(client, "w1")
    ok(
        patch(
            client, created["id"], status="pending", worker_id="w1", retry_in_seconds=0
        )
    )
    [second] = claim(client, "w2")
    assert second["attempts"] == first["attempts"] + 1


def test_release_is_for_the_holder_of_a_processing_job_only(client):
    created = create(client)
    assert release(client, created["id"], "w1").status_code == 409  # pending
    claim(client, "w1")
    before = job(client, created["id"])
    refused = release(client, created["id"], "w2")
    assert refused.status_code == 409, refused.text
    assert job(client, created["id"]) == before
    ok(patch(client, created["id"], status="completed", worker_id="w1"))
    assert release(client, created["id"], "w1").status_code == 409  # finished


def test_a_stale_holder_cannot_release_a_job_another_worker_took(client, clock):
    created = create(client)
    claim(client, "w1", lease_seconds=10)
    clock.advance(11)
    [taken] = claim(client, "w2")
    assert taken["id"] == created["id"]
    assert release(client, created["id"], "w1").status_code == 409
    assert job(client, created["id"])["worker_id"] == "w2"


# --- unknown jobs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "job_id", ["0b7c3a52-8a1e-4a53-9d38-6f0a3c0d2b11", "not-a-uuid", "1"]
)
def test_actions_on_a_job_that_does_not_exist_are_404(client, job_id):
    for response in (
        cancel(client, job_id),
        retry(client, job_id),
        release(client, job_id, "w1"),
    ):
        assert response.status_code == 404, response.text
        assert job_id in response.json()["detail"]


# --- retention -------------------------------------------------------------------------


def test_retention_deletes_cancelled_jobs_like_the_other_finished_ones(
    app, client, clock: Clock
):
    app.state.service.retention_days = 7
    cancelled = create(client, "cancelled")
    completed = create(client, "completed")
    asked = create(client, "asked")  # processing, cancel requested: not finished
    waiting = create(client, "waiting")
    ok(cancel(client, cancelled["id"]))
    ok(patch(client, completed["id"], status="completed"))
    ok(patch(client, asked["id"], status="processing", worker_id="w1"))
    ok(heartbeat(client, asked["id"], "w1", lease_seconds=43_200))
    ok(cancel(client, asked["id"]))
    clock.advance(8 * 86_400)
    ok(heartbeat(client, asked["id"], "w1", lease_seconds=43_200))
    assert run_sweep(app)["jobs_deleted"] == 2
    for gone in (cancelled, completed):
        assert client.get(f"/extraction-jobs/{gone['id']}").status_code == 404
        assert client.get(f"/extraction-jobs/{gone['id']}/events").status_code == 404
    assert job(client, asked["id"])["status"] == "processing"
    assert job(client, waiting["id"])["status"] == "pending"


# --- bad input -------------------------------------------------------------------------

BAD_BODIES = {
    "cancel": {
        "unknown field": {"reason": "x", "force": True},
        "reason too long": {"reason": "x" * 1001},
        "reason of wrong type": {"reason": 5},
        "NUL in reason": {"reason": "a\u0000b"},
        "body not an object": ["stop"],
    },
    "retry": {
        "unknown field": {"attempts": 0},
        "naive run_at": {"run_at": "2030-01-01T09:00:00"},
        "run_at as epoch seconds": {"run_at": 1893488400},
        "run_at not a time": {"run_at": "tomorrow"},
        "priority too high": {"priority": 11},
        "priority negative": {"priority": -1},
        "priority as text": {"priority": "5"},
        "priority as float": {"priority": 5.0},
        "priority as boolean": {"priority": True},
    },
    "release": {
        "no worker_id": {},
        "empty worker_id": {"worker_id": ""},
        "worker_id of wrong type": {"worker_id": 7},
        "unknown field": {"worker_id": "w1", "attempts": 0},
        "negative delay": {"worker_id": "w1", "retry_in_seconds": -1},
        "delay over a day": {"worker_id": "w1", "retry_in_seconds": 86_401},
        "delay as text": {"worker_id": "w1", "retry_in_seconds": "5"},
    },
}
BAD_CASES = [(route, case) for route, cases in BAD_BODIES.items() for case in cases]


@pytest.mark.parametrize("route, case", BAD_CASES)
def test_bad_bodies_are_422_with_a_detail_and_change_nothing(client, route, case):
    created = create(client)
    claim(client, "w1")
    before = job(client, created["id"])
    response = client.post(
        f"/extraction-jobs/{created['id']}/{route}", json=BAD_BODIES[route][case]
    )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and all(problem["msg"] for problem in detail)
    assert job(client, created["id"]) == before


@pytest.mark.parametrize("route", ["cancel", "retry", "release"])
def test_a_body_that_is_not_json_is_refused_with_a_detail(client, route):
    created = create(client)
    url = f"/extraction-jobs/{created['id']}/{route}"
    malformed = client.post(
        url, content=b"{", headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 422, malformed.text
    assert malformed.json()["detail"]
    as_text = client.post(
        url, content=b"reason", headers={"Content-Type": "text/plain"}
    )
    assert as_text.status_code == 415, as_text.text
    assert as_text.json()["detail"]


def test_a_reason_of_1000_characters_is_kept(client):
    created = create(client)
    ok(cancel(client, created["id"], reason="é" * 1000))
    assert last_event(client, created["id"])["detail"] == {"reason": "é" * 1000}


# --- metrics ----------------------------------------------------------------------------


@pytest.fixture
def metrics_client(database_url, monkeypatch, clock):
    monkeypatch.setattr(
        observability, "settings", settings.settings_from_env({"METRICS_ENABLED": "1"})
    )
    return TestClient(make_app(database_url, monkeypatch, clock))


def emitted(captured: str, name: str) -> float:
    total = 0.0
    for line in captured.splitlines():
        if '"_aws"' in line:
            value = json.loads(line).get(name, [])
            total += sum(value) if isinstance(value, list) else value
    return total


def test_jobs_cancelled_counts_each_job_that_became_cancelled(metrics_client, capsys):
    client = metrics_client
    running = create(client, "running")
    pending = create(client, "pending")
    assert [job["id"] for job in claim(client, "w1")] == [running["id"]]
    capsys.readouterr()
    ok(cancel(client, pending["id"]))
    assert emitted(capsys.readouterr().out, "JobsCancelled") == 1
    ok(cancel(client, running["id"]))  # only asked: not cancelled yet
    assert emitted(capsys.readouterr().out, "JobsCancelled") == 0
    ok(patch(client, running["id"], status="cancelled", worker_id="w1"))
    assert emitted(capsys.readouterr().out, "JobsCancelled") == 1
    ok(cancel(client, pending["id"]))  # already cancelled
    assert emitted(capsys.readouterr().out, "JobsCancelled") == 0
