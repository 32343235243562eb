"""The change feed, GET /extraction-jobs/events: every job's events in
commit order, resumable from the Link header, on both databases."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient


def next_link(response) -> str:
    link = response.headers["link"]
    assert link.endswith('>; rel="next"'), link
    return link[link.index("<") + 1 : link.index(">")]


def create(client: TestClient, document_id: str) -> str:
    response = client.post("/extraction-jobs", json={"document_id": document_id})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def walk(client: TestClient, url: str) -> tuple[list[dict], str]:
    """Every event from `url` on, and the link to resume from."""
    events = []
    while True:
        response = client.get(url)
        assert response.status_code == 200, response.text
        page = response.json()
        events += page
        url = next_link(response)
        if not page:
            return events, url


def test_every_page_links_on_and_a_stored_link_resumes_with_newer_events(client):
    first = [create(client, f"doc-{n}") for n in range(5)]
    events, resume = walk(client, "/extraction-jobs/events?limit=2")
    assert [event["job_id"] for event in events] == first
    assert [event["type"] for event in events] == ["created"] * 5
    ids = [event["id"] for event in events]
    assert ids == sorted(ids) and len(set(ids)) == 5

    # The last page is empty and links on; nothing new, nothing again.
    again = client.get(resume)
    assert again.json() == [] and next_link(again)

    later = create(client, "later")
    claimed = client.post("/extraction-jobs/claim", json={"worker_id": "w", "limit": 1})
    assert claimed.json()[0]["id"] == first[0]
    newer, _ = walk(client, resume)
    assert [(event["job_id"], event["type"]) for event in newer] == [
        (later, "created"),
        (first[0], "claimed"),
    ]


def test_events_carry_the_per_job_fields_and_a_stable_id(client):
    job_id = create(client, "fields")
    (event,) = client.get("/extraction-jobs/events").json()
    (own,) = client.get(f"/extraction-jobs/{job_id}/events").json()
    assert event == own
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


def test_type_filters_the_feed_and_is_repeatable(client):
    job_id = create(client, "typed")
    client.post("/extraction-jobs/claim", json={"worker_id": "w"})
    client.patch(
        f"/extraction-jobs/{job_id}", json={"status": "completed", "worker_id": "w"}
    )
    finished = client.get("/extraction-jobs/events", params={"type": "completed"})
    assert [event["type"] for event in finished.json()] == ["completed"]
    both = client.get(
        "/extraction-jobs/events", params=[("type", "created"), ("type", "claimed")]
    )
    assert [event["type"] for event in both.json()] == ["created", "claimed"]
    # The types stay in the link.
    assert "type=created" in next_link(both) and "type=claimed" in next_link(both)


@pytest.mark.parametrize(
    "params",
    [
        {"type": "no-such-type"},
        {"cursor": "not-a-cursor"},
        {"cursor": "WzIsWzAsMF0sImFiIl0"},  # well-formed, not signed by us
        {"limit": 0},
        {"limit": 1001},
    ],
)
def test_a_bad_cursor_type_or_limit_is_422(client, params):
    response = client.get("/extraction-jobs/events", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_a_cursor_of_another_type_filter_or_of_the_job_list_is_422(client):
    for n in range(3):
        create(client, f"doc-{n}")
    feed = client.get("/extraction-jobs/events", params={"limit": 1})
    cursor = next_link(feed).split("cursor=")[1]
    other = client.get(
        "/extraction-jobs/events", params={"cursor": cursor, "type": "created"}
    )
    assert other.status_code == 422
    listed = client.get("/extraction-jobs", params={"limit": 1})
    list_cursor = next_link(listed).split("cursor=")[1]
    assert (
        client.get(
            "/extraction-jobs/events", params={"cursor": list_cursor}
        ).status_code
        == 422
    )
    assert (
        client.get(
            "/extraction-jobs", params={"limit": 1, "cursor": cursor}
        ).status_code
        == 422
    )


def test_walked_while_four_writers_change_jobs_every_event_is_seen_once(client):
    """Two writers create jobs and two claim and finish them, while a reader
    walks the feed: at the end it has seen every event of every job's
    history exactly once (no gaps, no duplicates), also on PostgreSQL where
    the writers' transactions commit out of their id order."""
    creates_per_writer = 40
    created: list[str] = []
    lock = threading.Lock()
    creating = threading.Event()

    def creator(number: int) -> None:
        for n in range(creates_per_writer):
            job_id = create(client, f"w{number}-{n}")
            with lock:
                created.append(job_id)
        creating.set()

    def finisher(number: int) -> None:
        worker = f"finisher-{number}"
        while (
            not creating.is_set()
            or client.get("/extraction-jobs/stats").json()["counts"]["pending"]
        ):
            claimed = client.post(
                "/extraction-jobs/claim", json={"worker_id": worker, "limit": 3}
            ).json()
            for job in claimed:
                finished = client.patch(
                    f"/extraction-jobs/{job['id']}",
                    json={"status": "completed", "worker_id": worker},
                )
                assert finished.status_code == 200, finished.text

    seen: list[dict] = []
    url = "/extraction-jobs/events?limit=7"
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(creator, n) for n in range(2)]
        futures += [pool.submit(finisher, n) for n in range(2)]
        while not all(future.done() for future in futures):
            response = client.get(url)
            seen += response.json()
            url = next_link(response)
        for future in futures:
            future.result()
    rest, _ = walk(client, url)
    seen += rest
    ids = [event["id"] for event in seen]
    assert len(ids) == len(set(ids)), "an event was seen twice"
    history = [
        event
        for job_id in created
        for event in client.get(f"/extraction-jobs/{job_id}/events").json()
    ]
    assert sorted(ids) == sorted(event["id"] for event in history), "a gap"
    assert len(created) == 2 * creates_per_writer
    assert {event["type"] for event in seen} == {"created", "claimed", "completed"}
