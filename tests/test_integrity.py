"""Issue 18: a job record you can trust. Each rule on SQLite and PostgreSQL.

- Finished is final: only the finishing request repeated answers 200.
- One holder per lease: a processing job always has one.
- The lease belongs to the worker_id and the token subject that took it.
- A stale worker is refused, also after a real lease expiry.
- Numbers are kept as sent, and the 64 KiB bound holds for what is returned.
- Histories are bounded, walked page by page by their Link headers.
- Heartbeats add no events; they set heartbeat_at.
- A write is never sent twice: a loopback forwarder in front of PostgreSQL
  cuts a connection after the server ran the write (SQLite has no
  connection to cut; its writes are one local transaction).
"""

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

import psycopg2
import pytest
from conftest import (
    TEST_DATABASE_URL,
    backend_url,
    empty_postgres,
    next_link,
    postgres_url,
)
from fastapi.testclient import TestClient
from jose import jwk, jwt
from pydantic_core import to_json
from sqlalchemy import make_url

import database
from main import create_app
from models import DEFAULT_LEASE_SECONDS, MAX_METADATA_BYTES
from tests.jwks_server import JwksServer, RsaTestKey, use_jwks

AUDIENCE = "https://extraction-jobs.example.invalid"
ISSUER = "https://tenant.example.invalid/"
SCOPES = "read:extraction-jobs write:extraction-jobs"


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def create(client, document_id="doc", headers=None, **fields) -> dict:
    response = client.post(
        "/extraction-jobs",
        json={"document_id": document_id, **fields},
        headers=headers or {},
    )
    assert response.status_code == 201, response.text
    return response.json()


def claim(client, worker_id, headers=None, **fields) -> list[dict]:
    response = client.post(
        "/extraction-jobs/claim",
        json={"worker_id": worker_id, **fields},
        headers=headers or {},
    )
    assert response.status_code == 200, response.text
    return response.json()


def heartbeat(client, job_id, worker_id, headers=None, **fields):
    return client.post(
        f"/extraction-jobs/{job_id}/heartbeat",
        json={"worker_id": worker_id, **fields},
        headers=headers or {},
    )


def patch(client, job_id, body, headers=None):
    return client.patch(f"/extraction-jobs/{job_id}", json=body, headers=headers or {})


def history(client, job_id, headers=None) -> list[dict]:
    response = client.get(
        f"/extraction-jobs/{job_id}/events",
        params={"limit": 1000},
        headers=headers or {},
    )
    assert response.status_code == 200, response.text
    assert "Link" not in response.headers
    return response.json()


def kinds(client, job_id, headers=None) -> list[str]:
    return [event["type"] for event in history(client, job_id, headers)]


def assert_conflict(response, *words: str) -> None:
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail


# --- finished is final -----------------------------------------------------------

FINISHES = {
    "completed": {"status": "completed", "result": {"pages": 3, "score": 0.5}},
    "completed-without-result": {"status": "completed"},
    "failed": {"status": "failed", "error_message": "OCR crashed"},
    "failed-without-message": {"status": "failed"},
}


@pytest.fixture(params=FINISHES)
def finished(request, client) -> tuple[dict, dict]:
    """A job a worker claimed and finished, and the request that finished it."""
    job = create(client)
    claim(client, "w1")
    body = {**FINISHES[request.param], "worker_id": "w1"}
    response = patch(client, job["id"], body)
    assert response.status_code == 200, response.text
    return response.json(), body


def test_the_finishing_request_repeated_answers_the_job_as_it_is(client, finished):
    job, body = finished
    before = kinds(client, job["id"])
    # A worker retrying after a timeout: the same request, with the ETag it
    # read before finishing, without one, or without its worker_id.
    stale = {"If-Match": f'"{job["version"] - 1}"'}
    for headers in ({}, stale, {"If-Match": f'"{job["version"]}"'}):
        again = patch(client, job["id"], body, headers)
        assert again.status_code == 200, again.text
        assert again.json() == job
        assert again.headers["ETag"] == f'"{job["version"]}"'
    assert patch(client, job["id"], {**body, "worker_id": None}).json() == job
    assert kinds(client, job["id"]) == before  # no new event
    assert client.get(f"/extraction-jobs/{job['id']}").json() == job


def other_requests(body: dict) -> list[dict]:
    """Every request on a finished job that is not its finishing one."""
    status = body["status"]
    other = "failed" if status == "completed" else "completed"
    variants = [
        {"status": other},
        {"status": "pending"},
        {"status": "pending", "retry_in_seconds": 0},
        {"status": "processing"},
    ]
    if status == "completed":
        variants += [
            {"status": "completed", "result": {"pages": 4}},
            {"status": "completed", "result": {}},
            {"status": "completed", "error_message": "but why"},
        ]
        if "result" in body:
            variants.append({"status": "completed"})  # without the result
    else:
        variants += [
            {"status": "failed", "error_message": "another reason"},
            {"status": "failed", "error_message": ""},
        ]
        if "error_message" in body:
            variants.append({"status": "failed"})  # without the message
    return variants


def test_anything_else_on_a_finished_job_is_409_finished(client, finished):
    job, body = finished
    before = history(client, job["id"])
    for variant in other_requests(body):
        for headers in ({}, {"If-Match": f'"{job["version"]}"'}):
            response = patch(client, job["id"], {**variant, "worker_id": "w1"}, headers)
            assert_conflict(response, "finished", job["status"])
    assert_conflict(heartbeat(client, job["id"], "w1"), job["status"])
    assert client.get(f"/extraction-jobs/{job['id']}").json() == job
    assert history(client, job["id"]) == before


def test_a_claim_never_takes_a_finished_job(client, finished, clock):
    job, _ = finished
    clock.advance(DEFAULT_LEASE_SECONDS + 1)
    assert claim(client, "w2", limit=10) == []
    assert client.get(f"/extraction-jobs/{job['id']}").json() == job


def test_a_late_worker_cannot_overwrite_the_new_holders_result(client, clock):
    """The issue's report: a worker whose lease was taken over finished
    after the new holder and overwrote its result."""
    job = create(client)
    claim(client, "slow", lease_seconds=10)
    clock.advance(11)
    [taken] = claim(client, "fast")
    assert (taken["worker_id"], taken["attempts"]) == ("fast", 2)
    done = patch(
        client,
        job["id"],
        {"status": "completed", "result": {"by": "fast"}, "worker_id": "fast"},
    )
    assert done.status_code == 200, done.text
    for late in (
        {"status": "completed", "result": {"by": "slow-late"}, "worker_id": "slow"},
        {"status": "completed", "result": {"by": "slow-late"}},
        {"status": "failed", "error_message": "slow gave up", "worker_id": "slow"},
    ):
        assert_conflict(patch(client, job["id"], late), "finished")
    current = client.get(f"/extraction-jobs/{job['id']}").json()
    assert current == done.json()
    assert (current["result"], current["worker_id"]) == ({"by": "fast"}, "fast")


# --- one holder per lease ------------------------------------------------------------


def processing_without_holder(database_url: str) -> int:
    engine = database.get_engine(database_url)
    with engine.connect() as connection:
        return connection.exec_driver_sql(
            "SELECT count(*) FROM extraction_job WHERE status = 'processing' "
            "AND (worker_id IS NULL OR lease_expires_at IS NULL)"
        ).scalar()


def test_the_seed_flow_patch_processing_then_completed_works(client, database_url):
    job = create(client)
    taken = patch(client, job["id"], {"status": "processing"})
    assert taken.status_code == 200, taken.text
    held = taken.json()
    # The caller holds it, leased, as a claim would make it.
    assert held["worker_id"] == "anonymous"  # auth off: no token subject
    assert held["attempts"] == 1
    assert held["started_at"] == held["updated_at"]
    assert ts(held["lease_expires_at"]) - ts(held["started_at"]) == timedelta(
        seconds=DEFAULT_LEASE_SECONDS
    )
    assert processing_without_holder(database_url) == 0
    [claimed] = [e for e in history(client, job["id"]) if e["type"] == "claimed"]
    assert (claimed["from_status"], claimed["to_status"]) == ("pending", "processing")
    assert claimed["worker_id"] == "anonymous"
    assert claimed["detail"] == {
        "attempt": 1,
        "lease_expires_at": held["lease_expires_at"],
    }
    beat = heartbeat(client, job["id"], "anonymous")  # the holder it was told
    assert beat.status_code == 200, beat.text
    done = patch(client, job["id"], {"status": "completed"})
    assert done.status_code == 200, done.text
    assert (done.json()["status"], done.json()["worker_id"]) == (
        "completed",
        "anonymous",
    )
    assert kinds(client, job["id"]) == ["created", "claimed", "completed"]


def test_patch_processing_with_a_worker_id_makes_that_worker_the_holder(
    client, database_url
):
    job = create(client)
    taken = patch(client, job["id"], {"status": "processing", "worker_id": "w7"})
    assert taken.status_code == 200, taken.text
    assert taken.json()["worker_id"] == "w7"
    assert taken.json()["lease_expires_at"] is not None
    assert claim(client, "w8", limit=10) == []  # held: not claimable
    for refused in (
        patch(client, job["id"], {"status": "processing", "worker_id": "w8"}),
        patch(client, job["id"], {"status": "completed", "worker_id": "w8"}),
        heartbeat(client, job["id"], "w8"),
    ):
        assert_conflict(refused, "another worker")
    assert client.get(f"/extraction-jobs/{job['id']}").json() == taken.json()
    assert heartbeat(client, job["id"], "w7").status_code == 200
    done = patch(client, job["id"], {"status": "completed", "worker_id": "w7"})
    assert done.status_code == 200, done.text
    assert processing_without_holder(database_url) == 0


def test_every_way_into_processing_leaves_a_holder_with_a_lease(
    client, database_url, clock
):
    jobs = [create(client, f"d{n}") for n in range(4)]
    claim(client, "claimer")
    patch(client, jobs[1]["id"], {"status": "processing"})
    patch(client, jobs[2]["id"], {"status": "processing", "worker_id": "w"})
    patch(client, jobs[2]["id"], {"status": "pending", "worker_id": "w"})  # released
    patch(client, jobs[2]["id"], {"status": "processing"})  # taken by another
    clock.advance(DEFAULT_LEASE_SECONDS + 1)
    claim(client, "after-expiry", limit=10)  # takes the lapsed and the pending
    current = [client.get(f"/extraction-jobs/{j['id']}").json() for j in jobs]
    assert {job["status"] for job in current} == {"processing"}
    assert all(job["worker_id"] and job["lease_expires_at"] for job in current)
    assert processing_without_holder(database_url) == 0


# --- the lease belongs to worker_id and subject ------------------------------------------


@pytest.fixture(scope="module")
def token_key() -> RsaTestKey:
    return RsaTestKey("integrity-key")


class Subjects:
    """Bearer headers for token subjects, signed with the JWKS server's key."""

    def __init__(self, key: RsaTestKey) -> None:
        self.key = key
        self.signing_key = jwk.construct(key.private_pem, algorithm="RS256")
        self.tokens: dict[str, str] = {}

    def __call__(self, sub: str) -> dict[str, str]:
        if sub not in self.tokens:
            now = int(time.time())
            claims = {
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": sub,
                "iat": now,
                "exp": now + 600,
                "scope": SCOPES,
            }
            self.tokens[sub] = jwt.encode(
                claims,
                self.signing_key,
                algorithm="RS256",
                headers={"kid": self.key.kid},
            )
        return {"Authorization": f"Bearer {self.tokens[sub]}"}


@pytest.fixture
def as_subject(monkeypatch, token_key) -> Iterator[Subjects]:
    """Auth on (a real JWKS server on loopback); `as_subject(sub)` is a
    bearer header for a token of that subject."""
    server = JwksServer().start()
    server.keys = [token_key.public_jwk()]
    use_jwks(monkeypatch, server, issuer=ISSUER, audience=AUDIENCE)
    yield Subjects(token_key)
    server.stop()


@pytest.fixture
def authed(as_subject, database_url, monkeypatch, clock) -> TestClient:
    monkeypatch.setenv("DATABASE_URL", database_url)
    app = create_app()
    app.state.service.clock = clock
    return TestClient(app)


def test_another_subject_is_refused_even_with_the_right_worker_id(authed, as_subject):
    alice, bob = as_subject("auth0|alice"), as_subject("auth0|bob")
    job = create(authed, headers=alice)
    [held] = claim(authed, "w", headers=alice)
    for refused in (
        patch(authed, job["id"], {"status": "completed", "worker_id": "w"}, bob),
        patch(authed, job["id"], {"status": "completed"}, bob),
        patch(authed, job["id"], {"status": "pending", "worker_id": "w"}, bob),
        patch(authed, job["id"], {"status": "processing", "worker_id": "w"}, bob),
        heartbeat(authed, job["id"], "w", bob),
    ):
        assert_conflict(refused, "subject")
    # The holder's own subject, naming another worker: refused too.
    assert_conflict(
        patch(authed, job["id"], {"status": "completed", "worker_id": "x"}, alice),
        "another worker",
    )
    assert_conflict(heartbeat(authed, job["id"], "x", alice), "another worker")
    assert authed.get(f"/extraction-jobs/{job['id']}", headers=bob).json() == held
    # The holder: with its worker_id, and without one.
    beat = heartbeat(authed, job["id"], "w", alice)
    assert beat.status_code == 200, beat.text
    done = patch(authed, job["id"], {"status": "completed"}, alice)
    assert done.status_code == 200, done.text
    assert done.json()["updated_by"] == "auth0|alice"
    assert [(e["type"], e["actor"]) for e in history(authed, job["id"], bob)] == [
        ("created", "auth0|alice"),
        ("claimed", "auth0|alice"),
        ("completed", "auth0|alice"),
    ]


def test_patch_processing_without_worker_id_holds_as_the_tokens_subject(
    authed, as_subject
):
    alice, bob = as_subject("auth0|alice"), as_subject("auth0|bob")
    job = create(authed, headers=bob)
    taken = patch(authed, job["id"], {"status": "processing"}, alice)
    assert taken.status_code == 200, taken.text
    assert taken.json()["worker_id"] == "auth0|alice"
    assert_conflict(heartbeat(authed, job["id"], "auth0|alice", bob), "subject")
    assert_conflict(patch(authed, job["id"], {"status": "failed"}, bob), "subject")
    assert heartbeat(authed, job["id"], "auth0|alice", alice).status_code == 200
    assert patch(authed, job["id"], {"status": "failed"}, alice).status_code == 200


def test_a_claim_by_another_subject_takes_the_lease_from_the_first(
    authed, as_subject, clock
):
    """A stale holder under auth: once bob claimed the lapsed lease, alice,
    with her own worker_id or without, is refused."""
    alice, bob = as_subject("auth0|alice"), as_subject("auth0|bob")
    job = create(authed, headers=alice)
    claim(authed, "w-a", headers=alice, lease_seconds=10)
    clock.advance(11)
    [taken] = claim(authed, "w-b", headers=bob)
    assert (taken["id"], taken["worker_id"]) == (job["id"], "w-b")
    assert_conflict(heartbeat(authed, job["id"], "w-a", alice))
    for body in ({"status": "completed", "worker_id": "w-a"}, {"status": "completed"}):
        assert_conflict(patch(authed, job["id"], body, alice))
    assert authed.get(f"/extraction-jobs/{job['id']}", headers=alice).json() == taken
    assert patch(authed, job["id"], {"status": "completed"}, bob).status_code == 200


# --- a stale worker after a real lease expiry ----------------------------------------------


def test_a_stale_worker_is_refused_after_a_real_lease_expiry(tmp_path, monkeypatch):
    """The shortest lease (10 s) really running out, on both databases at
    once so the suite waits for it once. No test clock: the service's own."""
    clients = {}
    for backend in ("sqlite", "postgresql"):
        monkeypatch.setenv("DATABASE_URL", backend_url(backend, tmp_path))
        clients[backend] = TestClient(create_app())
    jobs, leases = {}, []
    for backend, client in clients.items():
        taken_over = create(client, "taken-over", priority=5)
        left = create(client, "left-alone")
        held = claim(client, "slow", limit=2, lease_seconds=10)
        assert [job["id"] for job in held] == [taken_over["id"], left["id"]]
        jobs[backend] = (taken_over, left)
        leases += [ts(job["lease_expires_at"]) for job in held]
    wait = (max(leases) - datetime.now(max(leases).tzinfo)).total_seconds() + 0.5
    assert 0 < wait < 11
    time.sleep(wait)
    for backend, client in clients.items():
        taken_over, left = jobs[backend]
        # Its lease ran out but nobody took it yet: the holder may finish it.
        late_but_alone = patch(
            client, left["id"], {"status": "completed", "worker_id": "slow"}
        )
        assert late_but_alone.status_code == 200, (backend, late_but_alone.text)
        [taken] = claim(client, "fast", limit=5)
        assert (taken["id"], taken["worker_id"], taken["attempts"]) == (
            taken_over["id"],
            "fast",
            2,
        )
        assert_conflict(heartbeat(client, taken_over["id"], "slow"), "another worker")
        late = {
            "status": "completed",
            "result": {"by": "slow-late"},
            "worker_id": "slow",
        }
        assert_conflict(patch(client, taken_over["id"], late), "another worker")
        assert client.get(f"/extraction-jobs/{taken_over['id']}").json() == taken
        done = {"status": "completed", "result": {"by": "fast"}, "worker_id": "fast"}
        assert patch(client, taken_over["id"], done).status_code == 200
        assert_conflict(patch(client, taken_over["id"], late), "finished")
        assert_conflict(heartbeat(client, taken_over["id"], "slow"))
        final = client.get(f"/extraction-jobs/{taken_over['id']}").json()
        assert (final["result"], final["worker_id"]) == ({"by": "fast"}, "fast")
        events = history(client, taken_over["id"])
        assert [(e["type"], e["worker_id"]) for e in events] == [
            ("created", None),
            ("claimed", "slow"),
            ("lease_expired", "slow"),
            ("claimed", "fast"),
            ("completed", "fast"),
        ], backend


# --- numbers kept as sent --------------------------------------------------------------------

SPECIAL_NUMBERS = {
    "max_float": 1e308,
    "big_float": 1.5e300,
    "float_that_looks_whole": 1000.0,
    "huge_int": 10**300,
    "big_int": 2**64 + 1,
    "negative_zero": -0.0,
    "smallest_subnormal": 5e-324,
    "one_third": 1 / 3,
    "plain_int": 1000,
    "negative": -1.5e-300,
}


def float_heavy_metadata(budget: int = MAX_METADATA_BYTES) -> dict:
    """Special numbers, then as many rows of them, then of 1e308, as fit in
    `budget` bytes as responses serialize it."""
    metadata: dict = {"special": SPECIAL_NUMBERS, "many": [], "max": []}

    def fill(name: str, item) -> None:
        while len(to_json({**metadata, name: [*metadata[name], item]})) <= budget:
            metadata[name].append(item)

    fill("many", list(SPECIAL_NUMBERS.values()))
    fill("max", 1e308)
    return metadata


def exact(value) -> str:
    """JSON that tells 1000 from 1000.0 and -0.0 from 0 (Python's == does not)."""
    return json.dumps(value, sort_keys=True)


def test_a_float_heavy_metadata_round_trip_keeps_every_number(
    client, database_url, capsys
):
    metadata = float_heavy_metadata()
    sent = to_json(metadata)
    assert MAX_METADATA_BYTES - 8 < len(sent) <= MAX_METADATA_BYTES
    created = client.post(
        "/extraction-jobs", json={"document_id": "floats", "metadata": metadata}
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    got = client.get(f"/extraction-jobs/{job_id}")
    listed = client.get("/extraction-jobs")
    [claimed] = claim(client, "w")
    for answer in (created.json(), got.json(), listed.json()[0], claimed):
        assert exact(answer["metadata"]) == exact(metadata)
    # Byte for byte: the stored metadata is written back exactly as sent.
    assert sent.decode() in got.text
    assert len(got.content) == len(created.content)
    assert len(to_json(got.json()["metadata"])) == len(sent) <= MAX_METADATA_BYTES
    special = got.json()["metadata"]["special"]
    assert isinstance(special["float_that_looks_whole"], float)
    assert isinstance(special["huge_int"], int) and special["huge_int"] == 10**300
    assert str(special["negative_zero"]) == "-0.0"
    backend = database_url.split(":")[0]
    with capsys.disabled():
        print(
            f"\n[{backend}] float-heavy metadata {len(sent)} bytes; create answer "
            f"{len(created.content)} bytes, GET {len(got.content)}, "
            f"list {len(listed.content)}"
        )


def test_a_float_heavy_result_round_trips_too(client):
    job = create(client)
    claim(client, "w")
    result = float_heavy_metadata()
    done = patch(client, job["id"], {"status": "completed", "result": result})
    assert done.status_code == 200, done.text
    got = client.get(f"/extraction-jobs/{job['id']}")
    assert exact(got.json()["result"]) == exact(result)
    assert to_json(result).decode() in got.text
    again = patch(client, job["id"], {"status": "completed", "result": result})
    assert again.status_code == 200 and again.json() == got.json()
    other = {**result, "special": {**result["special"], "big_float": 1.5e301}}
    assert_conflict(
        patch(client, job["id"], {"status": "completed", "result": other}), "finished"
    )


# Values Python's == takes for equal, which are different JSON.
LOOK_ALIKES = [
    ({"v": True}, {"v": 1}),
    ({"v": 1000.0}, {"v": 1000}),
    ({"v": -0.0}, {"v": 0}),
    ({"v": [False]}, {"v": [0.0]}),
]
LOOK_ALIKE_IDS = ["true-1", "1000.0-1000", "-0.0-0", "false-0.0"]


@pytest.mark.parametrize(("stored", "sent"), LOOK_ALIKES, ids=LOOK_ALIKE_IDS)
def test_a_finishing_request_with_a_look_alike_result_is_409(client, stored, sent):
    job = create(client)
    done = patch(client, job["id"], {"status": "completed", "result": stored})
    assert done.status_code == 200, done.text
    response = patch(client, job["id"], {"status": "completed", "result": sent})
    assert response.status_code == 409, (response.status_code, response.json())


@pytest.mark.parametrize(("stored", "sent"), LOOK_ALIKES, ids=LOOK_ALIKE_IDS)
def test_an_idempotent_create_with_look_alike_metadata_is_not_a_replay(
    client, stored, sent
):
    headers = {"Idempotency-Key": "look-alike"}
    first = client.post(
        "/extraction-jobs",
        json={"document_id": "d", "metadata": stored},
        headers=headers,
    )
    assert first.status_code == 201, first.text
    again = client.post(
        "/extraction-jobs", json={"document_id": "d", "metadata": sent}, headers=headers
    )
    assert again.status_code == 422, (again.status_code, again.json())


def raw_create(client, metadata_json: bytes):
    body = b'{"document_id": "raw", "metadata": ' + metadata_json + b"}"
    return client.post(
        "/extraction-jobs", content=body, headers={"Content-Type": "application/json"}
    )


def test_the_64_kib_bound_holds_for_what_is_returned_not_what_is_sent(client):
    """`1e5` is 3 bytes sent and 8 written back (100000.0): the bound is on
    the stored job's representation."""

    def numbers(count: int) -> bytes:
        return b'{"n": [' + b",".join([b"1e5"] * count) + b"]}"

    fits = (MAX_METADATA_BYTES - 10) // 9
    accepted = raw_create(client, numbers(fits))
    assert accepted.status_code == 201, accepted.text
    got = client.get(f"/extraction-jobs/{accepted.json()['id']}")
    assert len(to_json(got.json()["metadata"])) <= MAX_METADATA_BYTES
    assert got.json()["metadata"]["n"] == [100000.0] * fits
    too_big = numbers(MAX_METADATA_BYTES // 8)
    assert len(too_big) < MAX_METADATA_BYTES  # small as sent...
    refused = raw_create(client, too_big)
    assert refused.status_code == 422, refused.text  # ...too big as returned
    assert [j["id"] for j in client.get("/extraction-jobs").json()] == [
        accepted.json()["id"]
    ]


@pytest.mark.parametrize(
    "metadata",
    [
        {"x": 1.5e300},
        {"x": 1e308, "y": [1000.0, -0.0, 10**300]},
        float_heavy_metadata(),
    ],
    ids=["1.5e300", "mixed", "float-heavy"],
)
def test_an_idempotent_replay_with_big_floats_replays(client, metadata):
    headers = {"Idempotency-Key": f"floats-{uuid.uuid4()}"}
    body = {"document_id": "replayed", "metadata": metadata}
    first = client.post("/extraction-jobs", json=body, headers=headers)
    assert first.status_code == 201, first.text
    again = client.post("/extraction-jobs", json=body, headers=headers)
    assert again.status_code == 201, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    changed = {**body, "metadata": {**metadata, "x": 1.5e301}}
    refused = client.post("/extraction-jobs", json=changed, headers=headers)
    assert refused.status_code == 422, refused.text
    assert len(client.get("/extraction-jobs").json()) == 1


# --- bounded histories ---------------------------------------------------------------------


def job_with_events(client, count: int) -> dict:
    """A job with `count` events: created, claimed, then updates."""
    job = create(client)
    assert patch(client, job["id"], {"status": "processing"}).status_code == 200
    for n in range(count - 2):
        note = {"status": "processing", "error_message": f"page {n}"}
        assert patch(client, job["id"], note).status_code == 200
    return job


def walk(client, url: str, **params) -> tuple[list[dict], list[int]]:
    events, sizes = [], []
    response = client.get(url, params=params)
    while True:
        assert response.status_code == 200, response.text
        events += response.json()
        sizes.append(len(response.json()))
        following = next_link(response)
        if following is None:
            return events, sizes
        assert "after=" in following
        response = client.get(following)


def test_a_history_of_150_events_walked_by_its_links(client):
    job = job_with_events(client, 150)
    url = f"/extraction-jobs/{job['id']}/events"
    events, sizes = walk(client, url)
    assert sizes == [100, 50]  # 100 per page by default
    ids = [event["id"] for event in events]
    assert len(ids) == len(set(ids)) == 150
    assert ids == sorted(ids)  # oldest first, strictly increasing
    assert all(event["job_id"] == job["id"] for event in events)
    assert [e["type"] for e in events[:3]] == ["created", "claimed", "updated"]
    assert events[-1]["detail"] == {"error_message": "page 147"}
    assert history(client, job["id"]) == events  # one page of 1000, no Link
    small, sizes = walk(client, url, limit=7)
    assert small == events
    assert sizes == [7] * 21 + [3]
    first = client.get(url, params={"limit": 7})
    assert "limit=7" in next_link(first)
    # A page starts after the event named, whoever asks.
    rest = client.get(url, params={"after": ids[120], "limit": 1000}).json()
    assert rest == events[121:]
    last = client.get(url, params={"after": ids[-1]})
    assert last.json() == [] and "Link" not in last.headers
    exact_page = client.get(url, params={"limit": 150})
    assert len(exact_page.json()) == 150 and "Link" not in exact_page.headers


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 1001}, {"limit": -1}, {"limit": "ten"}, {"after": -1}],
)
def test_event_page_bounds_are_422(client, params):
    job = create(client)
    response = client.get(f"/extraction-jobs/{job['id']}/events", params=params)
    assert response.status_code == 422, response.text
    assert "detail" in response.json()


def test_event_page_bounds_1_and_1000_are_accepted(client):
    job = job_with_events(client, 3)
    url = f"/extraction-jobs/{job['id']}/events"
    one = client.get(url, params={"limit": 1})
    assert len(one.json()) == 1 and next_link(one) is not None
    assert len(client.get(url, params={"limit": 1000}).json()) == 3
    missing = client.get(f"/extraction-jobs/{uuid.uuid4()}/events", params={"limit": 1})
    assert missing.status_code == 404


def test_event_ids_are_stable_and_other_jobs_events_never_show(client):
    a, b = create(client, "a"), create(client, "b")
    patch(client, b["id"], {"status": "processing"})
    patch(client, a["id"], {"status": "processing"})
    before = history(client, a["id"])
    patch(client, a["id"], {"status": "completed"})
    after = history(client, a["id"])
    assert after[:2] == before  # the same ids, the same events
    assert {e["job_id"] for e in after} == {a["id"]}
    assert {e["id"] for e in after}.isdisjoint(
        e["id"] for e in history(client, b["id"])
    )


# --- heartbeats ------------------------------------------------------------------------------


def test_heartbeats_add_no_events_and_set_heartbeat_at(client, clock):
    job = create(client)
    [held] = claim(client, "w", lease_seconds=60)
    assert held["heartbeat_at"] is None
    versions = [held["version"]]
    for _ in range(30):
        clock.advance(1)
        beat = heartbeat(client, job["id"], "w", lease_seconds=60)
        assert beat.status_code == 200, beat.text
        versions.append(beat.json()["version"])
        assert beat.json()["heartbeat_at"] == beat.json()["updated_at"]
        assert ts(beat.json()["lease_expires_at"]) == ts(
            beat.json()["heartbeat_at"]
        ) + timedelta(seconds=60)
    assert versions == list(range(held["version"], held["version"] + 31))
    assert kinds(client, job["id"]) == ["created", "claimed"]
    current = client.get(f"/extraction-jobs/{job['id']}").json()
    assert current == beat.json()
    # A new lease starts with no heartbeat.
    clock.advance(61)
    [again] = claim(client, "w2")
    assert (again["worker_id"], again["heartbeat_at"]) == ("w2", None)
    assert kinds(client, job["id"]) == [
        "created",
        "claimed",
        "lease_expired",
        "claimed",
    ]


# --- a write is never sent twice ---------------------------------------------------------------

READY_FOR_QUERY = b"Z\x00\x00\x00\x05"  # the server's "done, idle" message


class Link:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.cutting = False
        self.tail = b""

    def close(self) -> None:
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


class CuttingForwarder:
    """A loopback TCP forwarder in front of PostgreSQL. `cut_after(pattern)`
    arms it: the connection whose client next sends a query containing
    `pattern` is cut once the server has answered that query in full (so
    the server ran it, and in autocommit committed it), after passing on the
    answer but for its final ReadyForQuery: the client never learns whether
    its statement ran. `restart()` closes every connection, as a server
    restart would."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.pattern: bytes | None = None
        self.cuts = 0
        self.links: list[Link] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, pattern: bytes) -> None:
        with self.lock:
            self.pattern = pattern

    def restart(self) -> int:
        """Close every connection; returns how many there were."""
        with self.lock:
            links, self.links = self.links, []
        for link in links:
            link.close()
        return len(links)

    def close(self) -> None:
        self.listener.close()
        self.restart()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            link = Link(client, socket.create_connection(self.upstream))
            with self.lock:
                self.links.append(link)
            threading.Thread(target=self._to_server, args=(link,), daemon=True).start()
            threading.Thread(target=self._to_client, args=(link,), daemon=True).start()

    def _to_server(self, link: Link) -> None:
        while data := _recv(link.client):
            seen, link.tail = link.tail + data, data[-200:]
            with self.lock:
                if self.pattern is not None and self.pattern in seen:
                    self.pattern = None
                    link.cutting = True  # before the query reaches the server
            try:
                link.server.sendall(data)
            except OSError:
                break
        link.close()

    def _to_client(self, link: Link) -> None:
        answer = b""
        while data := _recv(link.server):
            if not link.cutting:
                try:
                    link.client.sendall(data)
                except OSError:
                    break
                continue
            answer += data
            done = answer.find(READY_FOR_QUERY)
            if done >= 0:
                try:
                    link.client.sendall(answer[:done])
                except OSError:
                    pass
                with self.lock:
                    self.cuts += 1
                break
        link.close()


@pytest.fixture
def forwarded(monkeypatch) -> Iterator[tuple[CuttingForwarder, TestClient, str]]:
    """An app whose database connections all go through a CuttingForwarder
    (its own pool: the first use of each statement on a connection sends its
    SQL in full), and a direct URL to look at what the server holds."""
    url = postgres_url()
    empty_postgres(url)
    direct = make_url(url)
    forwarder = CuttingForwarder((direct.host, direct.port or 5432))
    proxied = direct.set(
        host="127.0.0.1",
        port=forwarder.port,
        query={"sslmode": "disable", "gssencmode": "disable"},
    ).render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", proxied)
    yield forwarder, TestClient(create_app()), url
    forwarder.close()
    database.reset_engines()


def server_holds(url: str, sql: str):
    with database.get_engine(url).connect() as connection:
        return connection.exec_driver_sql(sql).all()


def assert_503(response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"]
    assert "unavailable" in response.json()["detail"]


def test_a_create_cut_after_the_server_ran_it_is_503_and_made_one_job(forwarded):
    forwarder, client, url = forwarded
    assert client.get("/health?deep=1").status_code == 200  # schema checked, pool warm
    forwarder.cut_after(b"extraction_job_create_clock")  # the create
    assert_503(client.post("/extraction-jobs", json={"document_id": "cut"}))
    assert forwarder.cuts == 1
    # The server did make it, once: never sent again.
    assert server_holds(url, "SELECT document_id FROM extraction_job") == [("cut",)]
    assert server_holds(url, "SELECT type FROM extraction_job_event") == [("created",)]
    again = client.post("/extraction-jobs", json={"document_id": "next"})
    assert again.status_code == 201, again.text
    assert len(server_holds(url, "SELECT 1 FROM extraction_job")) == 2


def test_a_keyed_create_cut_after_it_ran_is_safe_to_repeat(forwarded):
    forwarder, client, url = forwarded
    body, key = {"document_id": "keyed"}, {"Idempotency-Key": "cut-key"}
    assert client.get("/health?deep=1").status_code == 200  # schema checked, pool warm
    forwarder.cut_after(b"extraction_job_create_clock")
    assert_503(client.post("/extraction-jobs", json=body, headers=key))
    replay = client.post("/extraction-jobs", json=body, headers=key)
    assert replay.status_code == 201, replay.text
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert server_holds(url, "SELECT id::text FROM extraction_job") == [
        (replay.json()["id"],)
    ]


def test_a_claim_cut_after_the_server_ran_it_is_503_and_took_one_batch(forwarded):
    forwarder, client, url = forwarded
    for n in range(5):
        create(client, f"d{n}")
    forwarder.cut_after(b"SKIP LOCKED")  # the claim's statement
    response = client.post(
        "/extraction-jobs/claim", json={"worker_id": "w", "limit": 2}
    )
    assert_503(response)
    assert forwarder.cuts == 1
    taken = server_holds(
        url, "SELECT document_id FROM extraction_job WHERE status = 'processing'"
    )
    assert sorted(taken) == [("d0",), ("d1",)]  # one batch, not two
    claims = "SELECT count(*) FROM extraction_job_event WHERE type = 'claimed'"
    assert server_holds(url, claims) == [(2,)]
    next_batch = claim(client, "w", limit=2)
    assert [job["document_id"] for job in next_batch] == ["d2", "d3"]


def test_a_patch_cut_after_it_ran_is_503_and_repeating_it_answers_200(forwarded):
    forwarder, client, url = forwarded
    job = create(client)
    finish = {"status": "completed", "result": {"pages": 2}}
    forwarder.cut_after(b"UPDATE extraction_job SET")
    assert_503(patch(client, job["id"], finish))
    assert forwarder.cuts == 1
    state = "SELECT status, version FROM extraction_job"
    assert server_holds(url, state) == [("completed", 2)]  # ran once
    # The worker retries after the 503: finished is final, and this is the
    # finishing request, so it is answered with the job as it is.
    again = patch(client, job["id"], finish)
    assert again.status_code == 200, again.text
    assert (again.json()["version"], again.json()["result"]) == (2, {"pages": 2})
    assert kinds(client, job["id"]) == ["created", "completed"]


def test_a_heartbeat_cut_after_it_ran_is_503_and_ran_once(forwarded):
    forwarder, client, url = forwarded
    job = create(client)
    held = patch(client, job["id"], {"status": "processing", "worker_id": "w"}).json()
    forwarder.cut_after(b"UPDATE extraction_job SET")
    assert_503(heartbeat(client, job["id"], "w"))
    assert forwarder.cuts == 1
    version = "SELECT version, heartbeat_at IS NOT NULL FROM extraction_job"
    assert server_holds(url, version) == [(held["version"] + 1, True)]
    beat = heartbeat(client, job["id"], "w")
    assert beat.status_code == 200, beat.text
    assert beat.json()["version"] == held["version"] + 2


def test_a_read_cut_after_it_ran_is_run_once_more_and_answers(forwarded):
    forwarder, client, _ = forwarded
    job = create(client)
    forwarder.cut_after(b"SELECT extraction_job.seq")  # the GET by id
    response = client.get(f"/extraction-jobs/{job['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == job
    assert forwarder.cuts == 1


def test_after_a_restart_the_next_write_succeeds_once(forwarded):
    """Every pooled connection closed while idle (a restart, a failover):
    noticed at checkout, so the write goes out once, on a new connection."""
    forwarder, client, url = forwarded
    create(client, "before")
    assert forwarder.restart() >= 1  # the pooled connection, idle
    time.sleep(0.1)  # the closes reach the pooled sockets
    created = client.post("/extraction-jobs", json={"document_id": "after"})
    assert created.status_code == 201, created.text
    assert server_holds(
        url, "SELECT count(*) FROM extraction_job WHERE document_id = 'after'"
    ) == [(1,)]
    [taken] = claim(client, "w")
    assert taken["document_id"] == "before"


def test_after_pg_terminate_backend_the_next_write_succeeds(monkeypatch):
    url = postgres_url()
    empty_postgres(url)
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("DB_PING_AFTER_IDLE_S", "3600")  # no ping: the poll alone
    database.reset_engines()
    client = TestClient(create_app())
    create(client, "before")
    name = make_url(url).database
    admin = psycopg2.connect(TEST_DATABASE_URL)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(
                "SELECT array_agg(pid) FROM pg_stat_activity WHERE datname = %s "
                "AND application_name = 'extraction-jobs'",
                (name,),
            )
            [pids] = cursor.fetchone()
            assert pids
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM unnest(%s) pid", (pids,)
            )
            for _ in range(100):  # until the backends are gone
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
                )
                if cursor.fetchone()[0] == 0:
                    break
                time.sleep(0.05)
    finally:
        admin.close()
    created = client.post("/extraction-jobs", json={"document_id": "after"})
    assert created.status_code == 201, created.text
    names = server_holds(url, "SELECT document_id FROM extraction_job ORDER BY seq")
    assert names == [("before",), ("after",)]
    database.reset_engines()
