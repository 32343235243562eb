"""Issue 11: leases, heartbeats, expiry, max_attempts, run_at, retries,
results, history, stats, cursor pages, retention and the sweep.

Every rule runs on a file SQLite and on PostgreSQL. Time is the service's
clock, moved by hand, so a lease runs out without the test sleeping.
"""

import base64
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import datetime, timedelta

import pytest
from conftest import SWEPT_NOTHING, backend_url, next_link
from fastapi.testclient import TestClient

import database
import lambda_handler
import service
from main import create_app
from models import FINISHED


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def create(client, document_id="doc", **fields):
    response = client.post(
        "/extraction-jobs", json={"document_id": document_id, **fields}
    )
    assert response.status_code == 201, response.text
    return response.json()


def claim(client, worker_id="worker-1", limit=1, **fields):
    response = client.post(
        "/extraction-jobs/claim",
        json={"worker_id": worker_id, "limit": limit, **fields},
    )
    assert response.status_code == 200, response.text
    return response.json()


def heartbeat(client, job_id, worker_id, **fields):
    return client.post(
        f"/extraction-jobs/{job_id}/heartbeat", json={"worker_id": worker_id, **fields}
    )


def events(client, job_id):
    response = client.get(f"/extraction-jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    return response.json()


def kinds(client, job_id):
    return [event["type"] for event in events(client, job_id)]


# --- leases -------------------------------------------------------------------


def test_claim_gives_each_job_a_lease(client, clock):
    create(client, "a")
    create(client, "b")
    before = clock()
    default, custom = claim(client)[0], claim(client, lease_seconds=60)[0]
    assert ts(default["lease_expires_at"]) - ts(default["started_at"]) == timedelta(
        seconds=300
    )
    assert ts(custom["lease_expires_at"]) - ts(custom["started_at"]) == timedelta(
        seconds=60
    )
    assert ts(custom["started_at"]) >= before
    assert create(client, "c")["lease_expires_at"] is None


@pytest.mark.parametrize("lease", [9, 43_201, 0, -1, 30.0, "30", True, None, 10**30])
def test_claim_lease_seconds_out_of_range_or_not_an_integer_is_422(client, lease):
    create(client)
    response = client.post(
        "/extraction-jobs/claim", json={"worker_id": "w", "lease_seconds": lease}
    )
    assert response.status_code == 422, response.text
    assert claim(client)[0]["attempts"] == 1  # nothing was claimed before


@pytest.mark.parametrize("lease", [10, 43_200])
def test_claim_lease_bounds_are_accepted(client, lease):
    create(client)
    assert len(claim(client, lease_seconds=lease)) == 1


def test_heartbeat_extends_the_lease_from_now_with_a_new_etag(client, clock):
    job = create(client)
    [claimed] = claim(client, "w1", lease_seconds=30)
    clock.advance(20)
    response = heartbeat(client, job["id"], "w1", lease_seconds=45)
    assert response.status_code == 200, response.text
    beat = response.json()
    assert beat["version"] == claimed["version"] + 1
    assert response.headers["ETag"] == f'"{beat["version"]}"'
    assert ts(beat["lease_expires_at"]) - ts(beat["updated_at"]) == timedelta(
        seconds=45
    )
    assert ts(beat["lease_expires_at"]) > ts(claimed["lease_expires_at"])
    assert claimed["heartbeat_at"] is None
    assert beat["heartbeat_at"] == beat["updated_at"]
    default = heartbeat(client, job["id"], "w1").json()
    assert ts(default["lease_expires_at"]) - ts(default["updated_at"]) == timedelta(
        seconds=300
    )
    assert default["heartbeat_at"] == default["updated_at"] > beat["heartbeat_at"]
    # The last heartbeat is on the job; the history does not grow with them.
    assert kinds(client, job["id"]) == ["created", "claimed"]


def test_heartbeat_keeps_a_job_alive_past_its_first_lease(client, clock):
    job = create(client)
    claim(client, "w1", lease_seconds=10)
    for _ in range(3):
        clock.advance(8)
        assert heartbeat(client, job["id"], "w1", lease_seconds=10).status_code == 200
    clock.advance(8)  # 32 s after a 10 s lease, alive thanks to the heartbeats
    assert claim(client, "w2") == []
    assert client.get("/extraction-jobs/stats").json()["expired_leases"] == 0
    current = client.get(f"/extraction-jobs/{job['id']}").json()
    assert (current["status"], current["worker_id"], current["attempts"]) == (
        "processing",
        "w1",
        1,
    )


def test_heartbeat_by_another_worker_or_on_a_job_not_processing_is_409(client):
    job = create(client)
    assert heartbeat(client, job["id"], "w1").status_code == 409  # pending
    [claimed] = claim(client, "w1")
    response = heartbeat(client, job["id"], "intruder")
    assert response.status_code == 409
    assert "another worker" in response.json()["detail"]
    assert client.get(f"/extraction-jobs/{job['id']}").json() == claimed
    client.patch(f"/extraction-jobs/{job['id']}", json={"status": "completed"})
    assert heartbeat(client, job["id"], "w1").status_code == 409
    assert heartbeat(client, str(uuid.uuid4()), "w1").status_code == 404
    assert heartbeat(client, "not-a-uuid", "w1").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"worker_id": ""},
        {"worker_id": 7},
        {"worker_id": "w", "lease_seconds": 9},
        {"worker_id": "w", "lease_seconds": 10.5},
        {"worker_id": "w", "lease_seconds": "60"},
        {"worker_id": "w", "extra": 1},
        {"worker_id": "w\u0000"},
    ],
)
def test_heartbeat_bad_body_is_422(client, body):
    job = create(client)
    claim(client, "w")
    response = client.post(f"/extraction-jobs/{job['id']}/heartbeat", json=body)
    assert response.status_code == 422, response.text
    assert "detail" in response.json()


def test_a_worker_that_dies_loses_the_job_and_another_finishes_it(client, clock):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    [first] = claim(client, "dies", lease_seconds=10)
    clock.advance(11)
    stats = client.get("/extraction-jobs/stats").json()
    assert stats["expired_leases"] == 1
    [second] = claim(client, "lives", lease_seconds=60)  # at once, no sweep needed
    assert second["id"] == job["id"]
    assert (second["worker_id"], second["attempts"]) == ("lives", 2)
    assert second["version"] > first["version"]
    # The dead worker comes back: every way of acting on the job is refused.
    assert heartbeat(client, job["id"], "dies").status_code == 409
    stale = client.patch(url, json={"status": "completed", "worker_id": "dies"})
    assert stale.status_code == 409
    stale = client.patch(
        url,
        json={"status": "completed"},
        headers={"If-Match": f'"{first["version"]}"'},
    )
    assert stale.status_code == 412
    assert client.get(url).json() == second  # nothing changed
    done = client.patch(
        url,
        json={"status": "completed", "worker_id": "lives", "result": {"pages": 3}},
    )
    assert done.status_code == 200, done.text
    assert done.json()["result"] == {"pages": 3}
    assert done.json()["lease_expires_at"] is None
    history = events(client, job["id"])
    assert [e["type"] for e in history] == [
        "created",
        "claimed",
        "lease_expired",
        "claimed",
        "completed",
    ]
    expired = history[2]
    assert (expired["from_status"], expired["to_status"]) == ("processing", "pending")
    assert expired["worker_id"] == "dies"
    assert expired["detail"] == {
        "attempts": 1,
        "max_attempts": 3,
        "lease_expires_at": first["lease_expires_at"],
    }
    assert [e["worker_id"] for e in history[3:]] == ["lives", "lives"]


def test_patch_with_the_holders_worker_id_works_and_another_is_409(client):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    [claimed] = claim(client, "w1")
    refused = client.patch(url, json={"status": "failed", "worker_id": "w2"})
    assert refused.status_code == 409
    assert client.get(url).json() == claimed
    ok = client.patch(url, json={"status": "failed", "worker_id": "w1"})
    assert ok.status_code == 200


def test_exhausted_attempts_end_failed_and_are_never_claimed_again(client, clock):
    job = create(client, max_attempts=2)
    assert job["max_attempts"] == 2
    claim(client, "a", lease_seconds=10)
    clock.advance(11)
    assert claim(client, "b", lease_seconds=10)[0]["attempts"] == 2
    clock.advance(11)
    assert claim(client, "c") == []  # the claim's sweep fails it
    failed = client.get(f"/extraction-jobs/{job['id']}").json()
    assert failed["status"] == "failed"
    assert failed["error_message"] == "lease expired after 2 attempts"
    assert failed["finished_at"] is not None
    assert failed["lease_expires_at"] is None
    assert failed["updated_by"] is None  # the sweep, not a caller
    history = events(client, job["id"])
    assert [(e["type"], e["from_status"], e["to_status"]) for e in history] == [
        ("created", None, "pending"),
        ("claimed", "pending", "processing"),
        ("lease_expired", "processing", "pending"),
        ("claimed", "pending", "processing"),
        ("failed", "processing", "failed"),
    ]
    assert history[-1]["worker_id"] == "b"
    assert history[-1]["actor"] is None  # the sweep, not a caller
    assert history[-1]["detail"] == {
        "error_message": "lease expired after 2 attempts",
        "attempts": 2,
    }
    clock.advance(3600)
    assert claim(client, "d") == []


def test_default_max_attempts_is_3(client, clock):
    job = create(client)
    assert job["max_attempts"] == 3
    for attempt in range(3):
        assert (
            claim(client, f"w{attempt}", lease_seconds=10)[0]["attempts"] == attempt + 1
        )
        clock.advance(11)
    assert claim(client, "w4") == []
    assert client.get(f"/extraction-jobs/{job['id']}").json()["error_message"] == (
        "lease expired after 3 attempts"
    )


@pytest.mark.parametrize("value", [0, 101, -1, 3.0, "3", True, None])
def test_max_attempts_out_of_range_or_not_an_integer_is_422(client, value):
    response = client.post(
        "/extraction-jobs", json={"document_id": "d", "max_attempts": value}
    )
    assert response.status_code == 422, response.text
    assert client.get("/extraction-jobs").json() == []


@pytest.mark.parametrize("value", [1, 100])
def test_max_attempts_bounds_are_accepted(client, value):
    assert create(client, max_attempts=value)["max_attempts"] == value


# --- the sweep ------------------------------------------------------------------


def test_the_sweep_releases_lapsed_leases_and_fails_exhausted_ones(app, client, clock):
    again = create(client, "again")
    once = create(client, "once", max_attempts=1)
    held = create(client, "held")
    claim(client, "w", limit=2, lease_seconds=10)
    claim(client, "w2", lease_seconds=600)
    clock.advance(11)
    counts = lambda_handler.run_sweep(app)
    assert counts == {**SWEPT_NOTHING, "leases_failed": 1, "leases_released": 1}
    released = client.get(f"/extraction-jobs/{again['id']}").json()
    assert (released["status"], released["lease_expires_at"]) == ("pending", None)
    failed = client.get(f"/extraction-jobs/{once['id']}").json()
    assert (failed["status"], failed["error_message"]) == (
        "failed",
        "lease expired after 1 attempt",
    )
    assert client.get(f"/extraction-jobs/{held['id']}").json()["status"] == "processing"
    assert kinds(client, again["id"])[-1] == "lease_expired"
    assert kinds(client, once["id"])[-1] == "failed"
    assert lambda_handler.run_sweep(app)["leases_released"] == 0  # once only
    [reclaimed] = claim(client, "w3")
    assert (reclaimed["id"], reclaimed["attempts"]) == (again["id"], 2)


def test_lambda_routes_the_scheduled_sweep_event_to_the_sweep(
    app, client, clock, monkeypatch
):
    create(client)
    claim(client, "w", lease_seconds=10)
    clock.advance(11)
    monkeypatch.setattr(lambda_handler, "app", app)
    result = lambda_handler.handler(lambda_handler.SWEEP_EVENT, None)
    assert result == {**SWEPT_NOTHING, "leases_released": 1}


def test_retention_deletes_only_finished_jobs_past_it_with_their_events(
    app, client, clock
):
    app.state.service.retention_days = 7
    old_done = create(client, "old-done")
    old_failed = create(client, "old-failed")
    create(client, "old-pending")
    create(client, "old-processing", priority=10)
    client.patch(f"/extraction-jobs/{old_done['id']}", json={"status": "completed"})
    client.patch(f"/extraction-jobs/{old_failed['id']}", json={"status": "failed"})
    [held] = claim(client, "w", lease_seconds=43_200)
    clock.advance(6 * 86_400)
    recent = create(client, "recent-done")
    client.patch(f"/extraction-jobs/{recent['id']}", json={"status": "completed"})
    clock.advance(2 * 86_400)  # the old ones finished 8 days ago, recent 2
    assert heartbeat(client, held["id"], "w").status_code == 200
    assert lambda_handler.run_sweep(app)["jobs_deleted"] == 2
    remaining = {j["document_id"] for j in client.get("/extraction-jobs").json()}
    assert remaining == {"old-pending", "old-processing", "recent-done"}
    for gone in (old_done, old_failed):
        assert client.get(f"/extraction-jobs/{gone['id']}/events").status_code == 404
    assert kinds(client, recent["id"]) == ["created", "completed"]
    assert lambda_handler.run_sweep(app)["jobs_deleted"] == 0


def test_retention_deletes_in_bounded_batches(app, client, clock, monkeypatch):
    import repository

    monkeypatch.setattr(repository, "RETENTION_BATCH", 3)
    app.state.service.retention_days = 1
    for n in range(8):
        job = create(client, f"d{n}")
        client.patch(f"/extraction-jobs/{job['id']}", json={"status": "failed"})
    clock.advance(2 * 86_400)
    deleted = app.state.service.repository.delete_finished(
        clock() - timedelta(days=1), FINISHED
    )
    assert deleted == 3
    assert lambda_handler.run_sweep(app)["jobs_deleted"] == 5
    assert client.get("/extraction-jobs").json() == []


def test_retention_unset_keeps_everything(app, client, clock):
    job = create(client)
    client.patch(f"/extraction-jobs/{job['id']}", json={"status": "completed"})
    clock.advance(3650 * 86_400)
    assert lambda_handler.run_sweep(app)["jobs_deleted"] == 0
    assert client.get(f"/extraction-jobs/{job['id']}").status_code == 200


# --- run_at and retries -----------------------------------------------------------


def test_a_future_run_at_is_not_claimed_until_due(client, clock):
    due_at = clock() + timedelta(seconds=120)
    later = create(client, "later", priority=10, run_at=due_at.isoformat())
    now = create(client, "now")
    assert ts(later["run_at"]) == due_at
    assert ts(now["run_at"]) == ts(now["created_at"])  # absent is now
    assert [j["id"] for j in claim(client, limit=10)] == [now["id"]]
    clock.advance(119)
    assert claim(client) == []
    clock.advance(2)
    assert [j["id"] for j in claim(client)] == [later["id"]]
    assert events(client, later["id"])[0]["detail"] == {"run_at": later["run_at"]}


def test_a_past_run_at_means_now_and_offsets_are_normalised_to_utc(client, clock):
    past = create(client, run_at="2001-02-03T04:05:06+00:00")
    assert past["run_at"] == past["created_at"]
    future = (clock() + timedelta(hours=1)).astimezone(
        __import__("datetime").timezone(timedelta(hours=5, minutes=30))
    )
    job = create(client, "f", run_at=future.isoformat())
    assert job["run_at"].endswith("+00:00")
    assert ts(job["run_at"]) == future


@pytest.mark.parametrize(
    "value",
    [
        "tomorrow",
        "2030-01-01T00:00:00",  # no offset
        "2030-01-01",
        "2030-13-01T00:00:00Z",
        "2030-01-01T00:00:00+25:00",
        "0001-01-01T00:00:00+14:00",
        1_900_000_000,
        1.5,
        True,
        {},
        "",
        "1900000000",
    ],
)
def test_a_malformed_run_at_is_422(client, value):
    response = client.post(
        "/extraction-jobs", json={"document_id": "d", "run_at": value}
    )
    assert response.status_code == 422, response.text
    assert "detail" in response.json()
    assert client.get("/extraction-jobs").json() == []


def test_claim_order_is_priority_then_oldest_among_due_jobs(client, clock):
    a = create(client, "a", priority=1)
    b = create(client, "b", priority=5, run_at=(clock() + timedelta(60)).isoformat())
    c = create(client, "c", priority=5)
    d = create(client, "d", priority=1)
    assert [j["id"] for j in claim(client, limit=10)] == [c["id"], a["id"], d["id"]]
    assert b["status"] == "pending"


def test_retry_in_seconds_releases_a_processing_job_with_backoff(client, clock):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    claim(client, "w")
    released = client.patch(
        url, json={"status": "pending", "retry_in_seconds": 30, "worker_id": "w"}
    )
    assert released.status_code == 200, released.text
    body = released.json()
    assert ts(body["run_at"]) - ts(body["updated_at"]) == timedelta(seconds=30)
    assert body["lease_expires_at"] is None
    assert claim(client, "w2") == []
    clock.advance(31)
    assert claim(client, "w2")[0]["attempts"] == 2
    released_event = events(client, job["id"])[2]
    assert (
        released_event["type"],
        released_event["from_status"],
        released_event["to_status"],
        released_event["worker_id"],
    ) == ("released", "processing", "pending", "w")
    assert released_event["detail"] == {
        "run_at": body["run_at"],
        "attempts": 1,
        "error_message": None,
    }


@pytest.mark.parametrize("error_message", [None, "not yet"])
def test_retry_in_seconds_on_a_pending_job_is_409_and_changes_nothing(
    client, error_message
):
    # Issue 11: retry_in_seconds applies "from processing or failed".
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    body = {"status": "pending", "retry_in_seconds": 60}
    response = client.patch(url, json={**body, "error_message": error_message})
    assert response.status_code == 409, response.text
    assert "processing" in response.json()["detail"]
    assert client.get(url).json() == job
    assert kinds(client, job["id"]) == ["created"]
    assert len(claim(client)) == 1


def test_retry_in_seconds_bounds_release_for_now_or_a_day_later(client, clock):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    claim(client, "w")
    response = client.patch(url, json={"status": "pending", "retry_in_seconds": 0})
    assert response.status_code == 200, response.text
    assert len(claim(client, "w")) == 1
    client.patch(url, json={"status": "pending", "retry_in_seconds": 86_400})
    clock.advance(86_399)
    assert claim(client) == []
    clock.advance(2)
    assert len(claim(client)) == 1


@pytest.mark.parametrize("retry_in_seconds", [None, 0])
def test_a_failed_job_is_not_retried_by_patch(client, retry_in_seconds):
    # Finished is final: only the explicit retry (the job-control issue) may.
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    failed = client.patch(url, json={"status": "failed", "error_message": "boom"})
    body = {"status": "pending", "retry_in_seconds": retry_in_seconds}
    response = client.patch(url, json=body)
    assert response.status_code == 409, response.text
    assert "finished" in response.json()["detail"]
    assert client.get(url).json() == failed.json()
    assert claim(client) == []
    assert kinds(client, job["id"]) == ["created", "failed"]


@pytest.mark.parametrize(
    "body",
    [
        {"status": "pending", "retry_in_seconds": -1},
        {"status": "pending", "retry_in_seconds": 86_401},
        {"status": "pending", "retry_in_seconds": 1.0},
        {"status": "pending", "retry_in_seconds": "10"},
        {"status": "failed", "retry_in_seconds": 10},
        {"status": "completed", "retry_in_seconds": 0},
    ],
)
def test_bad_retry_in_seconds_is_422(client, body):
    job = create(client)
    claim(client, "w")
    response = client.patch(f"/extraction-jobs/{job['id']}", json=body)
    assert response.status_code == 422, response.text
    assert client.get(f"/extraction-jobs/{job['id']}").json()["status"] == "processing"


# --- results ----------------------------------------------------------------------


def test_a_completed_job_carries_its_result_everywhere(client):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    claim(client, "w")
    result = {"text_uri": "s3://bucket/out.json", "pages": [1, 2], "score": 0.5}
    done = client.patch(url, json={"status": "completed", "result": result}).json()
    assert done["result"] == result
    assert client.get(url).json()["result"] == result
    assert client.get("/extraction-jobs").json()[0]["result"] == result
    assert create(client, "other")["result"] is None


@pytest.mark.parametrize(
    "result",
    [
        [1, 2],
        "text",
        7,
        {"big": "x" * (64 * 1024)},
        {"nul": "a\u0000b"},
        {"\u0000": 1},
        "deep",
    ],
)
def test_a_bad_result_is_422(client, result):
    if result == "deep":
        result = {}
        for _ in range(40):
            result = {"a": result}
    job = create(client)
    response = client.patch(
        f"/extraction-jobs/{job['id']}", json={"status": "completed", "result": result}
    )
    assert response.status_code == 422, response.text
    assert client.get(f"/extraction-jobs/{job['id']}").json()["status"] == "pending"


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b'"\\ud800"'])
def test_a_result_with_non_finite_numbers_or_lone_surrogates_is_422(client, raw):
    job = create(client)
    body = b'{"status": "completed", "result": {"x": ' + raw + b"}}"
    response = client.patch(
        f"/extraction-jobs/{job['id']}",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text


@pytest.mark.parametrize("status", ["pending", "processing", "failed"])
def test_result_with_another_status_is_422(client, status):
    job = create(client)
    response = client.patch(
        f"/extraction-jobs/{job['id']}", json={"status": status, "result": {"a": 1}}
    )
    assert response.status_code == 422


def test_unknown_patch_fields_are_422(client):
    job = create(client)
    response = client.patch(
        f"/extraction-jobs/{job['id']}", json={"status": "failed", "lease_seconds": 10}
    )
    assert response.status_code == 422


# --- updated_by and history -----------------------------------------------------


def test_updated_by_is_null_with_auth_off(client):
    job = create(client)
    assert job["updated_by"] is None
    assert claim(client)[0]["updated_by"] is None


def test_updated_by_and_actor_are_the_callers_sub(app, client):
    service = app.state.service
    from models import ClaimRequest, HeartbeatRequest, JobCreate, JobUpdate

    job, _ = service.create(JobCreate(document_id="d"), created_by="creator")
    assert job.updated_by == "creator"
    [claimed] = service.claim(ClaimRequest(worker_id="w"), actor="worker-bot").jobs
    assert claimed.updated_by == "worker-bot"
    beat = service.heartbeat(
        job.id, HeartbeatRequest(worker_id="w"), actor="worker-bot"
    )
    assert (beat.updated_by, beat.version) == ("worker-bot", claimed.version + 1)
    released = service.update(
        job.id, JobUpdate(status="pending", worker_id="w"), actor="worker-bot"
    )
    assert released.updated_by == "worker-bot"
    done = service.update(job.id, JobUpdate(status="completed"), actor="finisher")
    assert done.updated_by == "finisher"
    history = service.events(job.id, after=0, limit=100).page.events
    assert [(e.type, e.actor) for e in history] == [
        ("created", "creator"),
        ("claimed", "worker-bot"),
        ("released", "worker-bot"),
        ("completed", "finisher"),
    ]


def test_events_of_an_unknown_job_are_404(client):
    assert client.get(f"/extraction-jobs/{uuid.uuid4()}/events").status_code == 404
    assert client.get("/extraction-jobs/nope/events").status_code == 404


def test_each_event_has_the_documented_shape(client):
    job = create(client)
    [event] = events(client, job["id"])
    assert set(event) == {
        "id",
        "job_id",
        "at",
        "type",
        "from_status",
        "to_status",
        "actor",
        "worker_id",
        "detail",
    }
    assert event["at"] == job["created_at"]
    assert event["job_id"] == job["id"]
    assert isinstance(event["id"], int) and event["id"] > 0
    assert (event["type"], event["from_status"], event["to_status"]) == (
        "created",
        None,
        "pending",
    )
    assert event["detail"] == {"run_at": job["run_at"]}


def test_every_change_writes_one_event_in_order(client):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    claim(client, "w")
    assert heartbeat(client, job["id"], "w").status_code == 200  # no event
    note = {"status": "processing", "error_message": "bad scan"}
    assert client.patch(url, json=note).status_code == 200
    release = {"status": "pending", "error_message": "retry later"}
    for _ in range(2):  # the second changes nothing: no event
        assert client.patch(url, json=release).status_code == 200
    assert client.patch(url, json={"status": "processing"}).status_code == 200
    give_up = {"status": "failed", "error_message": "gave up"}
    for _ in range(2):  # the finishing request repeated: no event
        assert client.patch(url, json=give_up).status_code == 200
    history = events(client, job["id"])
    assert [(e["type"], e["from_status"], e["to_status"]) for e in history] == [
        ("created", None, "pending"),
        ("claimed", "pending", "processing"),
        ("updated", "processing", "processing"),
        ("released", "processing", "pending"),
        ("claimed", "pending", "processing"),
        ("failed", "processing", "failed"),
    ]
    assert history[2]["detail"] == {"error_message": "bad scan"}
    assert history[3]["detail"]["error_message"] == "retry later"
    assert history[4]["worker_id"] == "anonymous"  # taken by a PATCH, no worker_id
    assert history[4]["detail"]["attempt"] == 2
    assert history[5]["detail"] == {"error_message": "gave up", "attempts": 2}
    assert [e["at"] for e in history] == sorted(e["at"] for e in history)
    assert [e["id"] for e in history] == sorted({e["id"] for e in history})


def test_concurrent_claims_over_expired_leases_keep_events_and_jobs_in_step(
    client, clock
):
    """16 workers race over fresh jobs, lapsed leases and exhausted ones."""
    fresh = [create(client, f"fresh-{i}", priority=i % 11) for i in range(30)]
    lapsed = [create(client, f"lapsed-{i}", max_attempts=3) for i in range(15)]
    exhausted = [create(client, f"exhausted-{i}", max_attempts=1) for i in range(15)]
    # A worker that then dies takes the lapsed and exhausted ones.
    taken = claim(client, "dead", limit=100, lease_seconds=10)
    fresh_ids = {j["id"] for j in fresh}
    for job in taken:
        if job["id"] in fresh_ids:  # give those back untouched
            client.patch(f"/extraction-jobs/{job['id']}", json={"status": "pending"})
    clock.advance(11)
    claimed: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker(n):
        start.wait()
        while True:
            batch = claim(client, f"worker-{n}", limit=3, lease_seconds=600)
            if not batch:
                return
            with lock:
                claimed.extend(batch)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(worker, range(16)))
    counts = Counter(job["id"] for job in claimed)
    assert set(counts.values()) == {1}
    assert set(counts) == fresh_ids | {j["id"] for j in lapsed}
    for job in exhausted:
        current = client.get(f"/extraction-jobs/{job['id']}").json()
        assert current["status"] == "failed"
        history = events(client, job["id"])
        assert [e["type"] for e in history] == ["created", "claimed", "failed"]
    for job in claimed:
        current = client.get(f"/extraction-jobs/{job['id']}").json()
        history = events(client, job["id"])
        claims = [e for e in history if e["type"] == "claimed"]
        # The last claim event names the holder, and the counts agree.
        assert claims[-1]["worker_id"] == current["worker_id"] == job["worker_id"]
        assert len(claims) == current["attempts"]
        expiries = [e for e in history if e["type"] == "lease_expired"]
        assert len(expiries) == (1 if job["document_id"].startswith("lapsed") else 0)


# --- stats --------------------------------------------------------------------------


def test_stats_counts_statuses_oldest_pending_and_expired_leases(client, clock):
    empty = client.get("/extraction-jobs/stats")
    assert empty.status_code == 200
    assert empty.json() == {
        "counts": {
            "pending": 0,
            "processing": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
        },
        "estimated": [],
        "oldest_pending_age_seconds": None,
        "expired_leases": 0,
    }
    oldest = create(client, "oldest")
    clock.advance(100)
    for n in range(3):
        create(client, f"p{n}", priority=10)
    claim(client, "w", limit=2, lease_seconds=10)
    job = create(client, "done")
    client.patch(f"/extraction-jobs/{job['id']}", json={"status": "completed"})
    clock.advance(20)
    stats = client.get("/extraction-jobs/stats").json()
    assert stats["counts"] == {
        "pending": 2,
        "processing": 2,
        "completed": 1,
        "failed": 0,
        "cancelled": 0,
    }
    assert stats["estimated"] == []  # a handful of jobs: every count exact
    assert stats["expired_leases"] == 2
    assert 120 <= stats["oldest_pending_age_seconds"] < 130
    assert oldest["status"] == "pending"


# --- cursor pages -------------------------------------------------------------------


def walk(client, **params) -> list[dict]:
    jobs = []
    response = client.get("/extraction-jobs", params=params)
    while True:
        assert response.status_code == 200, response.text
        jobs.extend(response.json())
        url = next_link(response)
        if url is None:
            return jobs
        response = client.get(url)


def test_a_cursor_walk_equals_the_full_list(client):
    for n in range(23):
        create(client, f"d{n % 3}", priority=n % 4)
    full = client.get("/extraction-jobs", params={"limit": 1000}).json()
    assert walk(client, limit=5) == full
    assert walk(client, limit=23) == full
    assert walk(client, limit=1) == full
    filtered = client.get("/extraction-jobs", params={"document_id": "d1"}).json()
    assert walk(client, limit=2, document_id="d1") == filtered
    assert len(filtered) == 8


def test_link_header_only_when_more_rows_follow(client):
    for n in range(4):
        create(client, f"d{n}")
    first = client.get("/extraction-jobs", params={"limit": 2})
    url = next_link(first)
    assert "cursor=" in url and "limit=2" in url
    second = client.get(url)
    assert len(second.json()) == 2
    assert "Link" not in second.headers
    assert "Link" not in client.get("/extraction-jobs", params={"limit": 4}).headers
    offset_page = client.get("/extraction-jobs", params={"limit": 1, "offset": 1})
    assert "offset" not in next_link(offset_page)
    assert client.get(next_link(offset_page)).json()[0] == second.json()[0]


def test_a_cursor_walk_under_concurrent_inserts_has_no_duplicates_or_gaps(client):
    for n in range(60):
        create(client, f"before-{n}")
    stop = threading.Event()

    def writer(w):
        n = 0
        while not stop.is_set() and n < 100:
            create(client, f"during-{w}-{n}")
            n += 1

    seen: list[dict] = []
    with ThreadPoolExecutor(max_workers=3) as pool:
        writers = [pool.submit(writer, w) for w in range(3)]
        response = client.get("/extraction-jobs", params={"limit": 5})
        for _ in range(10):  # 50 of the 60 rows: the walk never runs dry here
            seen.extend(response.json())
            response = client.get(next_link(response))
        stop.set()
        for future in writers:
            future.result()
    while True:  # on to the end once the writers stopped
        seen.extend(response.json())
        url = next_link(response)
        if url is None:
            break
        response = client.get(url)
    full = client.get("/extraction-jobs", params={"limit": 1000}).json()
    ids = [job["id"] for job in seen]
    assert len(ids) == len(set(ids))
    assert ids == [job["id"] for job in full]
    assert len(full) > 60


def tampered(cursor: str) -> list[str]:
    """The cursor (`[2,[seq],"<filters digest>"]` and its signature) with a
    flipped byte, with another position (the filters digest kept, so only the
    signature can refuse it), unsigned, and cut or lengthened."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    assert raw.startswith(b"[2,[")
    payload = raw[: -service.CursorCodec.SIGNATURE_BYTES]
    flipped = bytearray(raw)
    flipped[5] ^= 1
    forged = raw.replace(b"[2,[", b"[2,[1", 1)
    unsigned = payload + b"0" * service.CursorCodec.SIGNATURE_BYTES
    return [
        *(
            base64.urlsafe_b64encode(bytes(token)).rstrip(b"=").decode()
            for token in (flipped, forged, unsigned)
        ),
        cursor[:-2],
        cursor + "A",
    ]


def test_a_bad_cursor_is_422_never_500(client):
    for n in range(3):
        create(client, f"d{n}")
    url = next_link(client.get("/extraction-jobs", params={"limit": 1}))
    cursor = url.split("cursor=")[1].split("&")[0]
    bad = [
        *tampered(cursor),
        "not-a-cursor",
        "%%%",
        "\u00e9",
        "A" * 600,
        # the previous release's shape: version 1, the filters in the clear
        base64.urlsafe_b64encode(b"[1,0,[null,null]]" + b"0" * 16).decode(),
    ]
    for value in bad:
        response = client.get("/extraction-jobs", params={"cursor": value})
        assert response.status_code == 422, (value, response.text)
        assert "detail" in response.json()
    other_filter = client.get(
        "/extraction-jobs", params={"cursor": cursor, "status": "pending"}
    )
    assert other_filter.status_code == 422
    with_offset = client.get("/extraction-jobs", params={"cursor": cursor, "offset": 1})
    assert with_offset.status_code == 422


def test_cursors_work_across_app_instances(client, database_url, monkeypatch):
    for n in range(3):
        create(client, f"d{n}")
    url = next_link(client.get("/extraction-jobs", params={"limit": 1}))
    monkeypatch.setenv("DATABASE_URL", database_url)
    other = TestClient(create_app())  # a fresh process: the key is read anew
    assert other.get(url).status_code == 200
    assert TestClient(create_app()).get(url + "x").status_code == 422
    monkeypatch.setenv("CURSOR_SECRET", "s" * 40)
    rekeyed = TestClient(create_app())
    assert rekeyed.get(url).status_code == 422


def test_offsets_beyond_10000_are_422_and_point_to_cursor(client):
    create(client)
    assert client.get("/extraction-jobs", params={"offset": 10_000}).status_code == 200
    response = client.get("/extraction-jobs", params={"offset": 10_001})
    assert response.status_code == 422
    assert "cursor" in response.json()["detail"]


# --- idempotent create --------------------------------------------------------------


@pytest.mark.parametrize(
    "changed", [{"max_attempts": 5}, {"run_at": "2999-01-01T00:00:00+00:00"}]
)
def test_idempotent_create_compares_the_new_fields(client, changed):
    headers = {"Idempotency-Key": "k-1"}
    body = {"document_id": "d"}
    first = client.post("/extraction-jobs", json=body, headers=headers)
    assert first.status_code == 201
    again = client.post(
        "/extraction-jobs", json={**body, "max_attempts": 3}, headers=headers
    )
    assert again.json()["id"] == first.json()["id"]
    past = client.post(
        "/extraction-jobs",
        json={**body, "run_at": "2001-01-01T00:00:00Z"},
        headers=headers,
    )
    assert past.json()["id"] == first.json()["id"]
    response = client.post(
        "/extraction-jobs", json={**body, **changed}, headers=headers
    )
    assert response.status_code == 422


def test_idempotent_create_with_a_future_run_at_replays(client, clock):
    headers = {"Idempotency-Key": "k-2"}
    body = {"document_id": "d", "run_at": (clock() + timedelta(hours=1)).isoformat()}
    first = client.post("/extraction-jobs", json=body, headers=headers).json()
    again = client.post("/extraction-jobs", json=body, headers=headers)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first["id"]


def test_postgres_creates_wait_in_line_so_seq_order_is_commit_order(monkeypatch):
    """A create takes the create clock's row lock before its `seq` and holds
    it until it commits, so no job can commit behind a later one's cursor
    position; and it takes its created_at from the clock, never before the
    job before it."""
    url = backend_url("postgresql", None)
    monkeypatch.setenv("DATABASE_URL", url)
    client = TestClient(create_app())
    engine = database.get_engine(url)
    ahead = "2999-01-01 00:00:00+00"
    with engine.connect() as holder:
        holder.exec_driver_sql(
            f"UPDATE extraction_job_create_clock SET created_at = '{ahead}'"
        )
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(create, client, "in-line")
            done, _ = wait([pending], timeout=0.5)
            assert not done  # waiting in line behind the holder
            holder.commit()
            job = pending.result(timeout=10)
    assert job["document_id"] == "in-line"
    # The clock went ahead while it waited: created_at follows it, not back.
    assert job["created_at"] == "2999-01-01T00:00:00.000000+00:00"
    assert job["run_at"] == job["created_at"] == job["updated_at"]


# --- configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RETENTION_DAYS", "0"),
        ("RETENTION_DAYS", "seven"),
        ("RETENTION_DAYS", "1.5"),
        ("RETENTION_DAYS", "-3"),
        ("CURSOR_SECRET", "too-short"),
    ],
)
def test_bad_lifecycle_configuration_refuses_to_start(
    name, value, tmp_path, monkeypatch
):
    from settings import ConfigError

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'c.db'}")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        create_app()


def test_retention_days_reaches_the_service(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'c.db'}")
    monkeypatch.setenv("RETENTION_DAYS", "30")
    assert create_app().state.service.retention_days == 30
    monkeypatch.setenv("RETENTION_DAYS", "")
    assert create_app().state.service.retention_days is None


def test_each_database_signs_cursors_with_its_own_random_key(tmp_path, monkeypatch):
    """The key is made by the migration, per database: a cursor from one
    deployment is refused by another, though both run the same code."""
    links = []
    for name in ("one", "two"):
        monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / name}.db")
        app_client = TestClient(create_app())
        for n in range(2):
            create(app_client, f"d{n}")
        links.append(next_link(app_client.get("/extraction-jobs", params={"limit": 1})))
    assert links[0] != links[1]
    assert app_client.get(links[1]).status_code == 200
    assert app_client.get(links[0]).status_code == 422
