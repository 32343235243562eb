"""Claim by priority, optimistic concurrency with ETag/If-Match, idempotent create.

Each rule runs on a file SQLite and on PostgreSQL, with real threads where
the rule is about concurrency.
"""

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

import database
from models import JobCreate
from repository import ExtractionJobRepository
from service import IdempotencyKeyReused, JobService


def create(client, document_id="doc", **fields):
    response = client.post(
        "/extraction-jobs", json={"document_id": document_id, **fields}
    )
    assert response.status_code == 201, response.text
    return response.json()


def claim(client, worker_id="worker-1", limit=1):
    response = client.post(
        "/extraction-jobs/claim", json={"worker_id": worker_id, "limit": limit}
    )
    assert response.status_code == 200, response.text
    return response.json()


# --- claim ------------------------------------------------------------------


def test_claim_with_nothing_pending_is_an_empty_array(client):
    assert claim(client) == []
    job = create(client)
    client.patch(f"/extraction-jobs/{job['id']}", json={"status": "completed"})
    assert claim(client, limit=10) == []


def test_claim_takes_highest_priority_first_then_oldest(client):
    jobs = [
        create(client, f"d{i}", priority=p) for i, p in enumerate([0, 5, 10, 5, 10, 0])
    ]
    order = [
        j["id"] for j in sorted(jobs, key=lambda j: -j["priority"])
    ]  # stable: oldest first
    first = claim(client, limit=3)
    assert [j["id"] for j in first] == order[:3]
    rest = claim(client, limit=10)
    assert [j["id"] for j in rest] == order[3:]


def test_claimed_job_records_worker_start_attempts_and_version(client):
    job = create(client)
    [claimed] = claim(client, worker_id="ocr-7")
    assert claimed["id"] == job["id"]
    assert claimed["status"] == "processing"
    assert claimed["worker_id"] == "ocr-7"
    assert claimed["attempts"] == 1
    assert claimed["version"] == job["version"] + 1
    assert claimed["started_at"] == claimed["updated_at"] > job["updated_at"]
    assert claimed["finished_at"] is None
    assert client.get(f"/extraction-jobs/{job['id']}").json() == claimed


def test_a_job_is_claimed_again_after_a_release_never_once_finished(client):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    assert len(claim(client)) == 1
    assert claim(client) == []  # already processing
    released = client.patch(url, json={"status": "pending", "worker_id": "worker-1"})
    assert released.status_code == 200, released.text
    [again] = claim(client, worker_id="worker-2")
    assert again["attempts"] == 2
    assert again["worker_id"] == "worker-2"
    assert again["finished_at"] is None
    client.patch(url, json={"status": "failed", "error_message": "OCR crashed"})
    failed = client.get(url).json()
    assert failed["finished_at"] is not None
    retry = client.patch(url, json={"status": "pending"})
    assert retry.status_code == 409, retry.text  # final: no retry by PATCH
    assert claim(client, worker_id="worker-3") == []
    assert client.get(url).json() == failed


def test_finished_at_is_set_on_completion(client):
    job = create(client)
    claim(client)
    done = client.patch(
        f"/extraction-jobs/{job['id']}", json={"status": "completed"}
    ).json()
    assert done["finished_at"] == done["updated_at"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"worker_id": ""},
        {"worker_id": "w" * 256},
        {"worker_id": "nul\u0000"},
        {"worker_id": 7},
        {"worker_id": "w", "limit": 0},
        {"worker_id": "w", "limit": 101},
        {"worker_id": "w", "limit": "2"},
        {"worker_id": "w", "limit": 1.5},
        {"worker_id": "w", "limit": True},
    ],
)
def test_claim_invalid_body_is_422_and_claims_nothing(client, body):
    create(client)
    response = client.post("/extraction-jobs/claim", json=body)
    assert response.status_code == 422, response.text
    assert client.get("/extraction-jobs", params={"status": "pending"}).json() != []


def test_claim_limit_bounds_are_accepted(client):
    for i in range(101):
        create(client, f"d{i}")
    assert len(claim(client, limit=1)) == 1
    assert len(claim(client, limit=100)) == 100


def test_concurrent_claims_take_every_job_exactly_once(client):
    """16 workers race for 300 jobs of mixed priority."""
    jobs = [create(client, f"d{i}", priority=i % 11) for i in range(300)]
    rank = {j["id"]: (-j["priority"], n) for n, j in enumerate(jobs)}
    batches: list[list[dict]] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker(n):
        start.wait()
        while True:
            batch = claim(client, worker_id=f"worker-{n}", limit=7)
            if not batch:
                return
            with lock:
                batches.append(batch)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(worker, range(16)))
    claimed = Counter(job["id"] for batch in batches for job in batch)
    assert set(claimed) == set(rank)  # none lost
    assert set(claimed.values()) == {1}  # none twice
    assert all(len(batch) <= 7 for batch in batches)  # limit honoured under contention
    assert len(batches) >= 300 // 7
    for batch in batches:  # priority order within each claim
        assert [rank[j["id"]] for j in batch] == sorted(rank[j["id"]] for j in batch)
        assert all(j["status"] == "processing" and j["attempts"] == 1 for j in batch)
    stored = client.get("/extraction-jobs", params={"limit": 1000}).json()
    assert {j["status"] for j in stored} == {"processing"}
    assert {j["worker_id"] for j in stored} == {
        j["worker_id"] for b in batches for j in b
    }


# --- ETag / If-Match ----------------------------------------------------------


def test_every_single_job_response_carries_the_version_as_etag(client):
    created = client.post("/extraction-jobs", json={"document_id": "d"})
    assert created.headers["etag"] == '"1"'
    url = created.headers["location"]
    assert client.get(url).headers["etag"] == '"1"'
    patched = client.patch(url, json={"status": "processing"})
    assert patched.headers["etag"] == '"2"' == f'"{patched.json()["version"]}"'
    assert client.get(url).headers["etag"] == '"2"'


def test_patch_with_stale_if_match_is_412_and_changes_nothing(client):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    moved = client.patch(url, json={"status": "processing"}).json()
    stale = client.patch(url, json={"status": "completed"}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    assert "version is 2" in stale.json()["detail"]
    assert client.get(url).json() == moved


@pytest.mark.parametrize("if_match", ['"2"', '"7", "2"', "*"])
def test_patch_with_matching_if_match_succeeds(client, if_match):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    client.patch(url, json={"status": "processing"})
    response = client.patch(
        url, json={"status": "completed"}, headers={"If-Match": if_match}
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"3"'


@pytest.mark.parametrize("if_match", ['W/"1"', '"one"', '""'])
def test_weak_or_malformed_if_match_never_matches(client, if_match):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    response = client.patch(
        url, json={"status": "processing"}, headers={"If-Match": if_match}
    )
    assert response.status_code == 412
    assert client.get(url).json() == job


def test_if_match_on_unknown_job_is_404(client):
    response = client.patch(
        f"/extraction-jobs/{uuid.uuid4()}",
        json={"status": "failed"},
        headers={"If-Match": '"1"'},
    )
    assert response.status_code == 404


def test_patch_without_if_match_still_behaves_as_v1(client):
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"
    assert client.patch(url, json={"status": "processing"}).status_code == 200
    assert client.patch(url, json={"status": "completed"}).status_code == 200


@pytest.mark.parametrize(
    ("bodies", "refusal"),
    [
        # Two workers take the job by hand: the loser's version is stale.
        (
            [
                {"status": "processing", "worker_id": "a"},
                {"status": "processing", "worker_id": "b"},
            ],
            412,
        ),
        # Two finishing requests: the loser meets a finished job, which is
        # final whatever If-Match says.
        ([{"status": "completed"}, {"status": "failed"}], 409),
    ],
    ids=["take", "finish"],
)
def test_concurrent_patches_with_the_same_if_match_one_wins(client, bodies, refusal):
    for round_ in range(5):
        job = create(client, f"race-{round_}")
        url = f"/extraction-jobs/{job['id']}"
        barrier = threading.Barrier(2)

        def patch(body, url=url, barrier=barrier):
            barrier.wait()
            return client.patch(url, json=body, headers={"If-Match": '"1"'})

        with ThreadPoolExecutor(max_workers=2) as pool:
            responses = list(pool.map(patch, bodies))
        codes = sorted(r.status_code for r in responses)
        assert codes == sorted([200, refusal]), [r.text for r in responses]
        winner = next(r for r in responses if r.status_code == 200).json()
        assert client.get(url).json() == winner
        assert winner["version"] == 2


def test_concurrent_patches_without_if_match_lose_no_update(client):
    """Many writers, no If-Match: each accepted change gets a version of its own.

    A lost update would show as two 200s claiming the same new version, or a
    version number nobody was answered with.
    """
    job = create(client)
    url = f"/extraction-jobs/{job['id']}"

    def patch(status):
        return client.patch(url, json={"status": status})

    targets = ["processing", "completed", "failed", "pending"] * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(patch, targets))
    assert {r.status_code for r in responses} <= {200, 409}
    accepted = [r.json() for r in responses if r.status_code == 200]
    final = client.get(url).json()
    versions = {j["version"] for j in accepted} | {1}
    assert versions == set(range(1, final["version"] + 1))
    by_version = {j["version"]: j["status"] for j in accepted}
    assert by_version[final["version"]] == final["status"]


# --- idempotent create --------------------------------------------------------


def test_repeated_key_and_body_replays_the_same_job(client):
    body = {"document_id": "inv-1", "priority": 3, "metadata": {"a": [1, 2]}}
    headers = {"Idempotency-Key": "req-123"}
    first = client.post("/extraction-jobs", json=body, headers=headers)
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    second = client.post("/extraction-jobs", json=body, headers=headers)
    assert second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    assert second.headers["location"] == first.headers["location"]
    assert len(client.get("/extraction-jobs").json()) == 1


def test_replay_returns_the_job_as_it_is_now(client):
    headers = {"Idempotency-Key": "req-now"}
    job = client.post(
        "/extraction-jobs", json={"document_id": "d"}, headers=headers
    ).json()
    client.patch(f"/extraction-jobs/{job['id']}", json={"status": "processing"})
    replay = client.post("/extraction-jobs", json={"document_id": "d"}, headers=headers)
    assert replay.status_code == 201
    assert replay.json()["status"] == "processing"


@pytest.mark.parametrize(
    "changed", [{"document_id": "other"}, {"priority": 4}, {"metadata": {"a": 1}}]
)
def test_same_key_with_a_different_body_is_422(client, changed):
    headers = {"Idempotency-Key": "req-9"}
    body = {"document_id": "d", "priority": 3}
    client.post("/extraction-jobs", json=body, headers=headers)
    response = client.post(
        "/extraction-jobs", json={**body, **changed}, headers=headers
    )
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["detail"]
    assert len(client.get("/extraction-jobs").json()) == 1


def test_different_keys_create_different_jobs(client):
    for key in ("a", "b"):
        client.post(
            "/extraction-jobs",
            json={"document_id": "d"},
            headers={"Idempotency-Key": key},
        )
    client.post("/extraction-jobs", json={"document_id": "d"})
    assert len(client.get("/extraction-jobs").json()) == 3


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\there", "naïve", "\x7f"])
def test_invalid_idempotency_key_is_422(client, key):
    response = client.post(
        "/extraction-jobs",
        json={"document_id": "d"},
        headers={"Idempotency-Key": key.encode("utf-8")},
    )
    assert response.status_code == 422, response.text
    assert client.get("/extraction-jobs").json() == []


def test_idempotency_key_bounds_are_accepted(client):
    for key in ("k", "~" * 255, "a b!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"):
        response = client.post(
            "/extraction-jobs",
            json={"document_id": "d"},
            headers={"Idempotency-Key": key},
        )
        assert response.status_code == 201, (key, response.text)


def test_concurrent_creates_with_one_key_make_one_job(client):
    body = {"document_id": "once", "metadata": {"n": 1}}
    barrier = threading.Barrier(12)

    def post(_):
        barrier.wait()
        return client.post(
            "/extraction-jobs", json=body, headers={"Idempotency-Key": "dup"}
        )

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(post, range(12)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 11
    assert len(client.get("/extraction-jobs").json()) == 1


def test_idempotency_keys_are_per_caller(database_url):
    service = JobService(ExtractionJobRepository(database_url))
    data = JobCreate(document_id="d")
    alice, replayed_a = service.create(
        data, created_by="auth0|alice", idempotency_key="k"
    )
    bob, replayed_b = service.create(data, created_by="auth0|bob", idempotency_key="k")
    anon, _ = service.create(data, created_by=None, idempotency_key="k")
    assert len({alice.id, bob.id, anon.id}) == 3
    assert not replayed_a and not replayed_b
    again, replayed = service.create(data, created_by="auth0|bob", idempotency_key="k")
    assert (again.id, replayed) == (bob.id, True)
    with pytest.raises(IdempotencyKeyReused):
        service.create(
            JobCreate(document_id="x"), created_by="auth0|alice", idempotency_key="k"
        )
    database.reset_engines()
