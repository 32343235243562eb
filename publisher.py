"""Job events on EventBridge: each job's outcomes published, at least once.

With `EVENT_BUS_NAME` set, every write queues the events it records that
downstream systems act on (models.PUBLISHED_EVENTS: completed, failed,
cancelled, retried) in the outbox table, in the same statement as the write
(repository.queued_for_publishing). After the write has committed, the
request publishes them with short timeouts; a failure opens a breaker, so
while EventBridge is down or slow requests stop trying and answer in their
usual time. The sweep (the schedule, `make sweep`) publishes whatever is
still queued. An event leaves the outbox only once EventBridge accepted it,
and no transaction is open while AWS is called.

boto3 comes with the Lambda runtime (it is not in lambda.zip) and is
imported here only, when publishing is on. The standard AWS variables and
endpoint overrides are honoured (`AWS_ENDPOINT_URL_EVENTS`, settings.py, as
well as botocore's own).
"""

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import observability
from database import DatabaseUnavailable
from repository import ExtractionJobRepository, QueuedEvent

logger = logging.getLogger(__name__)

SOURCE = "extraction-jobs"
PUT_EVENTS_MAX_ENTRIES = 10
# Queued events a request publishes, and a sweep reads per batch.
BATCH = 100
MAX_SWEEP_BATCHES = 20
# A request waits at most about this long for EventBridge...
TIMEOUT_S = 1.0
# ...and after a failure, requests leave publishing to the sweep this long.
BREAKER_S = 30.0


def detail_type(event: QueuedEvent) -> str:
    return f"job.{event.type}"


def detail(event: QueuedEvent) -> dict[str, Any]:
    """What a published event says: never metadata, results or tokens."""
    return {
        "event_id": event.seq,
        "job_id": event.job_id,
        "document_id": event.document_id,
        "status": event.status,
        "attempts": event.attempts,
        "worker_id": event.worker_id,
        "at": event.at.isoformat(timespec="microseconds"),
    }


class EventPublisher:
    def __init__(
        self,
        bus_name: str,
        repository: ExtractionJobRepository,
        clock: Callable[[], float] = time.monotonic,
        *,
        endpoint_url: str | None = None,
    ) -> None:
        self.bus_name = bus_name
        self.endpoint_url = endpoint_url
        self.repository = repository
        self.clock = clock
        self._closed_until = 0.0
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.client(
                    "events",
                    endpoint_url=self.endpoint_url,
                    config=Config(
                        connect_timeout=TIMEOUT_S,
                        read_timeout=TIMEOUT_S,
                        retries={"max_attempts": 1, "mode": "standard"},
                    ),
                )
            return self._client

    def publish_for(self, job_ids: Collection[str]) -> None:
        """After a write: publish what it queued for these jobs, unless the
        breaker is open. Never raises: the sweep delivers what is left."""
        if not job_ids or self.clock() < self._closed_until:
            return
        try:
            self._publish(self.repository.queued(job_ids, BATCH))
        except DatabaseUnavailable:
            pass  # queued still; the sweep publishes it

    def publish_outstanding(self) -> int:
        """The sweep's part: publish what is queued, oldest first, in
        bounded batches; returns how many were published."""
        published = 0
        for _ in range(MAX_SWEEP_BATCHES):
            queued = self.repository.queued(None, BATCH)
            sent = self._publish(queued)
            published += sent
            if len(queued) < BATCH or sent < len(queued):
                break
        return published

    def _publish(self, queued: Sequence[QueuedEvent]) -> int:
        published = []
        failed = 0
        for start in range(0, len(queued), PUT_EVENTS_MAX_ENTRIES):
            chunk = queued[start : start + PUT_EVENTS_MAX_ENTRIES]
            try:
                answer = self.client().put_events(
                    Entries=[self._entry(e) for e in chunk]
                )
            except Exception as error:  # noqa: BLE001 - any failure to reach AWS
                failed += len(queued) - start
                self._closed_until = self.clock() + BREAKER_S
                logger.warning(
                    "EventBridge publish failed, %d events left for the sweep: %s",
                    len(queued) - start,
                    type(error).__name__,
                )
                break
            for event, result in zip(chunk, answer["Entries"], strict=True):
                if result.get("ErrorCode"):
                    failed += 1
                else:
                    published.append(event.seq)
        if published:
            self.repository.unqueue(published)
        observability.count("EventsPublished", len(published))
        observability.count("EventsPublishFailed", failed)
        return len(published)

    def _entry(self, event: QueuedEvent) -> dict[str, Any]:
        return {
            "Source": SOURCE,
            "DetailType": detail_type(event),
            "Detail": json.dumps(detail(event)),
            "EventBusName": self.bus_name,
        }
