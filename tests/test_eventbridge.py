"""Job events on EventBridge, against moto's EventBridge with a rule to an
SQS queue (a real moto server on loopback), on both databases: a completion
arrives, an outage is caught up by the sweep, and no job data is sent."""

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from terraform_helpers import moto_server

import database
from db_models import OUTBOX
from main import create_app, run_sweep

BUS = "extraction-jobs-test"
SECRET_METADATA = "metadata-that-must-not-travel"
SECRET_RESULT = "result-that-must-not-travel"


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.fixture
def aws(moto, monkeypatch) -> dict:
    """Credentials and endpoints for moto; the bus, a queue and a rule to it."""
    import boto3

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_EVENTS": moto,
        "AWS_ENDPOINT_URL_SQS": moto,
        "EVENT_BUS_NAME": BUS,
    }.items():
        monkeypatch.setenv(name, value)
    events = boto3.client("events", endpoint_url=moto)
    sqs = boto3.client("sqs", endpoint_url=moto)
    if BUS not in [bus["Name"] for bus in events.list_event_buses()["EventBuses"]]:
        events.create_event_bus(Name=BUS)
    queue = sqs.create_queue(QueueName=f"downstream-{uuid.uuid4().hex}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
    events.put_rule(
        Name="to-downstream",
        EventBusName=BUS,
        EventPattern=json.dumps({"source": ["extraction-jobs"]}),
    )
    events.put_targets(
        Rule="to-downstream",
        EventBusName=BUS,
        Targets=[{"Id": "queue", "Arn": arn["Attributes"]["QueueArn"]}],
    )
    return {"sqs": sqs, "queue": queue}


def received(aws: dict) -> list[dict]:
    """Every message the downstream queue holds now."""
    messages = []
    while True:
        batch = aws["sqs"].receive_message(
            QueueUrl=aws["queue"], MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        if not batch.get("Messages"):
            return messages
        for message in batch["Messages"]:
            messages.append(json.loads(message["Body"]))
            aws["sqs"].delete_message(
                QueueUrl=aws["queue"], ReceiptHandle=message["ReceiptHandle"]
            )


def queued(url: str) -> int:
    with database.get_engine(url).connect() as connection:
        return connection.execute(select(func.count()).select_from(OUTBOX)).scalar()


def finished_job(client: TestClient, status: str = "completed") -> dict:
    created = client.post(
        "/extraction-jobs",
        json={"document_id": "invoice.pdf", "metadata": {"note": SECRET_METADATA}},
    ).json()
    client.post("/extraction-jobs/claim", json={"worker_id": "ocr-7"})
    body = {"status": status, "worker_id": "ocr-7"}
    if status == "completed":
        body["result"] = {"text": SECRET_RESULT}
    finished = client.patch(f"/extraction-jobs/{created['id']}", json=body)
    assert finished.status_code == 200, finished.text
    return finished.json()


def test_a_completion_arrives_with_the_documented_detail_and_no_job_data(
    aws, database_url, monkeypatch
):
    monkeypatch.setenv("DATABASE_URL", database_url)
    client = TestClient(create_app())
    job = finished_job(client)
    (message,) = received(aws)
    assert message["source"] == "extraction-jobs"
    assert message["detail-type"] == "job.completed"
    (completed,) = [
        event
        for event in client.get(f"/extraction-jobs/{job['id']}/events").json()
        if event["type"] == "completed"
    ]
    assert message["detail"] == {
        "event_id": completed["id"],
        "job_id": job["id"],
        "document_id": "invoice.pdf",
        "status": "completed",
        "attempts": 1,
        "worker_id": "ocr-7",
        "at": completed["at"],
    }
    text = json.dumps(message)
    assert SECRET_METADATA not in text and SECRET_RESULT not in text
    assert queued(database_url) == 0


def test_only_outcomes_are_published_failed_cancelled_and_retried_too(
    aws, database_url, monkeypatch
):
    monkeypatch.setenv("DATABASE_URL", database_url)
    client = TestClient(create_app())
    failed = finished_job(client, "failed")
    client.post(f"/extraction-jobs/{failed['id']}/retry", json={})
    pending = client.post("/extraction-jobs", json={"document_id": "p"}).json()
    client.post(f"/extraction-jobs/{pending['id']}/cancel", json={"reason": "r"})
    kinds = sorted(message["detail-type"] for message in received(aws))
    # Not created, claimed or any move that is not an outcome.
    assert kinds == ["job.cancelled", "job.failed", "job.retried"]


def test_an_outage_answers_normally_and_the_sweep_delivers_later(
    aws, moto, database_url, monkeypatch
):
    monkeypatch.setenv("DATABASE_URL", database_url)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_EVENTS", dead_endpoint)
    down = TestClient(create_app())
    jobs = [finished_job(down) for _ in range(3)]
    assert all(job["status"] == "completed" for job in jobs)
    assert queued(database_url) == 3
    assert received(aws) == []

    monkeypatch.setenv("AWS_ENDPOINT_URL_EVENTS", moto)
    app = create_app()
    counts = run_sweep(app)
    assert counts["events_published"] == 3
    assert queued(database_url) == 0
    arrived = sorted(message["detail"]["job_id"] for message in received(aws))
    assert arrived == sorted(job["id"] for job in jobs)


def test_without_a_bus_nothing_is_queued_and_boto3_is_never_imported(
    database_url, monkeypatch
):
    """(botocore may be: Powertools' user-agent probe imports it where it is
    installed, as in this venv and in the Lambda runtime.)"""
    monkeypatch.delenv("EVENT_BUS_NAME", raising=False)
    monkeypatch.setenv("DATABASE_URL", database_url)
    finished_job(TestClient(create_app()))
    assert queued(database_url) == 0
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import main; "
        "from fastapi.testclient import TestClient; "
        "client = TestClient(main.create_app()); "
        "client.post('/extraction-jobs', json={'document_id': 'd'}); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'boto3'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)],
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "AUTH_DISABLED": "1",
            "DATABASE_URL": f"sqlite:///{Path(database_url.split('///')[-1])}"
            if database_url.startswith("sqlite")
            else database_url,
        },
        check=True,
    )
    assert result.stdout.strip() == "[]"
