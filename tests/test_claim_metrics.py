"""LeasesExpired counts every expiry: those the sweep at the start of each
claim handles as well as the scheduled sweep's, one per recorded expiry (a
lease_expired event, or the failed event of a lease out of attempts).

EMF records are read from stdout as CloudWatch Logs receives them, with
metrics on as METRICS_ENABLED=1 turns them on; on both databases.
"""

import json
from typing import Any

import pytest
from conftest import Clock
from fastapi.testclient import TestClient

import observability
import settings
from main import run_sweep


@pytest.fixture
def app(app, monkeypatch: pytest.MonkeyPatch):
    """conftest's app, with metrics on."""
    monkeypatch.setattr(
        observability, "settings", settings.settings_from_env({"METRICS_ENABLED": "1"})
    )
    return app


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)


def leases_expired(captured: str) -> list[float]:
    """Every LeasesExpired value among the EMF records printed."""
    values: list[float] = []
    for line in captured.splitlines():
        if '"_aws"' in line:
            value = json.loads(line).get("LeasesExpired", [])
            values.extend(value if isinstance(value, list) else [value])
    return values


def create(client: TestClient, document_id: str, **fields: Any) -> str:
    response = client.post(
        "/extraction-jobs", json={"document_id": document_id, **fields}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def claim(client: TestClient, worker_id: str, limit: int) -> list[dict]:
    response = client.post(
        "/extraction-jobs/claim",
        json={"worker_id": worker_id, "limit": limit, "lease_seconds": 10},
    )
    assert response.status_code == 200, response.text
    return response.json()


def is_expiry(event: dict) -> bool:
    if event["type"] == "failed":
        return event["detail"]["error_message"].startswith("lease expired after")
    return event["type"] == "lease_expired"


def expiry_events(client: TestClient, job_ids: list[str]) -> int:
    return sum(
        is_expiry(event)
        for job_id in job_ids
        for event in client.get(f"/extraction-jobs/{job_id}/events").json()
    )


def test_a_claim_counts_the_leases_its_sweep_expired(
    app, client: TestClient, clock: Clock, capsys: pytest.CaptureFixture
) -> None:
    ids = [
        create(client, "last-try.pdf", max_attempts=1),
        create(client, "retry-a.pdf"),
        create(client, "retry-b.pdf"),
    ]
    assert len(claim(client, "dies", 3)) == 3
    assert leases_expired(capsys.readouterr().out) == []  # nothing had expired

    clock.advance(11)
    # The claim's sweep fails the job out of attempts and takes one expired
    # lease again: two expiries. The other expired lease waits.
    [retaken] = claim(client, "lives", 1)
    assert retaken["attempts"] == 2
    assert leases_expired(capsys.readouterr().out) == [2.0]
    assert client.get(f"/extraction-jobs/{ids[0]}").json()["status"] == "failed"

    # The scheduled sweep releases the one left, counted as before.
    assert run_sweep(app)["leases_released"] == 1
    assert leases_expired(capsys.readouterr().out) == [1.0]
    assert expiry_events(client, ids) == 3  # one count per recorded expiry


def test_a_claim_that_takes_nothing_still_counts_the_leases_it_failed(
    client: TestClient, clock: Clock, capsys: pytest.CaptureFixture
) -> None:
    ids = [create(client, f"{n}.pdf", max_attempts=1) for n in range(2)]
    assert len(claim(client, "dies", 2)) == 2
    clock.advance(11)
    assert claim(client, "next", 5) == []
    assert leases_expired(capsys.readouterr().out) == [2.0]
    assert [
        client.get(f"/extraction-jobs/{job_id}").json()["status"] for job_id in ids
    ] == ["failed", "failed"]
    assert expiry_events(client, ids) == 2
    assert claim(client, "next", 5) == []  # nothing more to expire
    assert leases_expired(capsys.readouterr().out) == []
