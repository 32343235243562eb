"""The console in a real browser: Debian's Chromium driven by Playwright,
against a live uvicorn on loopback, with no network but loopback.

Every test's page is watched: each request it makes must stay on the app's
origin (the Auth0 sign-in also reaches the tenant, and only it), no alert
or other dialog may open, and no script error or policy violation may
happen. What the console changes is checked through the API.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from auth0_tenant import Auth0Tenant
from browser import chromium, chromium_missing, claim, create, finish, live_app
from conftest import backend_url, require
from jwks_server import JwksServer, RsaTestKey, use_jwks
from sqlalchemy import delete
from test_auth import AUDIENCE, ISSUER, OMIT, sign

import database
from auth import ADMIN_SCOPE, READ_SCOPE, WRITE_SCOPE
from db_models import EVENTS, JOBS

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
CLIENT_ID = "ConsoleSpaClientId123"
OPERATOR = "auth0|operator"
XSS = "<img src=x onerror=alert(1)>"


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass
class App:
    """A live app, its database, and a client for its API."""

    base: str
    database_url: str
    log: Path
    api: httpx.Client

    def empty(self) -> None:
        engine = database.get_engine(database.normalize_url(self.database_url))
        with engine.begin() as connection:
            connection.execute(delete(EVENTS))
            connection.execute(delete(JOBS))

    def job(self, job_id: str) -> dict:
        response = self.api.get(f"/extraction-jobs/{job_id}")
        response.raise_for_status()
        return response.json()

    def events(self, job_id: str) -> list[dict]:
        response = self.api.get(f"/extraction-jobs/{job_id}/events?limit=1000")
        response.raise_for_status()
        return response.json()


@contextmanager
def serve(env: dict[str, str], folder: Path, database_url: str, **headers):
    """A live app on `database_url`, its API client authorised by `headers`."""
    log = folder / "uvicorn.log"
    with (
        live_app({**env, "DATABASE_URL": database_url}, log) as base,
        httpx.Client(base_url=base, headers=headers, timeout=30) as api,
    ):
        app = App(base, database_url, log, api)
        api.get("/extraction-jobs/stats").raise_for_status()  # the schema
        yield app


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    missing = chromium_missing()
    require(missing is None, missing or "")
    # The HTTPS errors ignored are the loopback Auth0 tenant's self-signed
    # certificate's; the app itself is plain HTTP on loopback.
    with chromium(
        tmp_path_factory.mktemp("profile"),
        viewport=DESKTOP,
        ignore_https_errors=True,
    ) as browser_context:
        yield browser_context


@pytest.fixture(scope="module")
def open_apps(tmp_path_factory) -> Iterator[Callable[[str], App]]:
    """Live apps with auth disabled, one per backend, started when first asked."""
    started: dict[str, App] = {}
    with ExitStack() as stack:

        def app(backend: str) -> App:
            if backend not in started:
                folder = tmp_path_factory.mktemp(f"console-{backend}")
                url = backend_url(backend, folder)
                env = {**os.environ, "AUTH_DISABLED": "1"}
                started[backend] = stack.enter_context(serve(env, folder, url))
            return started[backend]

        yield app


@pytest.fixture
def sqlite_app(open_apps) -> App:
    return open_apps("sqlite")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_app(request, open_apps) -> App:
    return open_apps(request.param)


@pytest.fixture
def postgres_app(open_apps) -> App:
    return open_apps("postgresql")


@pytest.fixture(scope="module")
def key() -> RsaTestKey:
    return RsaTestKey("console-key")


@pytest.fixture(scope="module")
def jwks(key) -> Iterator[JwksServer]:
    server = JwksServer().start()
    server.keys = [key.public_jwk()]
    yield server
    server.stop()


def token(key: RsaTestKey, *permissions: str, **claims) -> str:
    """An access token as Auth0 issues with RBAC: the grants in `permissions`."""
    return sign(key, sub=OPERATOR, scope=OMIT, permissions=list(permissions), **claims)


def auth_env(jwks: JwksServer, **extra: str) -> dict[str, str]:
    """The environment with auth on against `jwks` (tests/jwks_server.use_jwks)."""
    with pytest.MonkeyPatch.context() as patch:
        use_jwks(patch, jwks, issuer=ISSUER, audience=AUDIENCE)
        for name, value in extra.items():
            patch.setenv(name, value)
        return dict(os.environ)


@pytest.fixture(scope="module")
def tenant(key) -> Iterator[Auth0Tenant]:
    def issue(audience: str) -> str:
        return token(key, READ_SCOPE, ADMIN_SCOPE, aud=audience)

    server = Auth0Tenant(client_id=CLIENT_ID, issue=issue).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_app(tmp_path_factory, jwks, key, tenant) -> Iterator[App]:
    """Auth on, and the console signs in with the loopback tenant; its API
    client has every permission."""
    folder = tmp_path_factory.mktemp("console-auth")
    env = auth_env(jwks, AUTH0_DOMAIN=tenant.domain, AUTH0_CONSOLE_CLIENT_ID=CLIENT_ID)
    admin = token(key, READ_SCOPE, WRITE_SCOPE, ADMIN_SCOPE)
    with serve(
        env, folder, backend_url("sqlite", folder), Authorization=f"Bearer {admin}"
    ) as app:
        tenant.allowed_origin = app.base
        yield app


@dataclass
class Watched:
    """A page, and what it did: every request, dialog, error and violation."""

    page: object
    origins: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        page = self.page
        page.on(
            "request",
            lambda r: self.requests.append((r.method, r.url, r.post_data)),
        )
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.problems.append(str(error)))
        page.on("console", self._console)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _console(self, message) -> None:
        text = message.text
        if "Content Security Policy" in text or "Trusted Type" in text:
            self.problems.append(text)

    def open(self, app: App, hash_route: str = "") -> None:
        self.origins.add(origin(app.base))
        self.page.goto(f"{app.base}/console{hash_route}")

    def api_calls(self, path: str) -> list[tuple[str, str, str | None]]:
        return [call for call in self.requests if urlsplit(call[1]).path == path]

    def assert_clean(self) -> None:
        assert self.requests, "the page made no request"
        strays = [url for _, url, _ in self.requests if origin(url) not in self.origins]
        assert not strays, f"requests left the app's origin: {strays}"
        assert not self.dialogs, f"dialogs opened: {self.dialogs}"
        assert not self.problems, f"script errors or policy violations: {self.problems}"


@pytest.fixture
def watched(context) -> Iterator[Watched]:
    page = context.new_page()
    page.set_default_timeout(10_000)
    seen = Watched(page)
    yield seen
    page.close()
    seen.assert_clean()


def texts(watched: Watched, selector: str) -> list[str]:
    return watched.page.locator(selector).all_text_contents()


def wait_for_rows(watched: Watched, count: int) -> None:
    watched.page.wait_for_function(
        "n => document.querySelectorAll('#rows tr').length === n", arg=count
    )


def seed_one_of_each(app: App) -> None:
    """doc-0 .. doc-8, created in this order, most urgent first; doc-0 to
    doc-5 claimed in turn by worker-1: 1 completed, 2 failed, 1 cancelled by
    its holder after an operator's cancel, 2 processing; 3 pending."""
    app.empty()
    for number in range(9):
        create(app.api, f"doc-{number}.pdf", priority=9 - number)
    held = [claim(app.api, "worker-1")[0] for _ in range(6)]
    finish(app.api, held[0], "completed", result={"pages": 1})
    for job in held[1:3]:
        finish(app.api, job, "failed", error_message="OCR crashed")
    app.api.post(f"/extraction-jobs/{held[3]['id']}/cancel", json={})
    finish(app.api, held[3], "cancelled")


# --- The jobs list -------------------------------------------------------------


def test_the_list_shows_seeded_jobs_newest_first_and_the_counts(any_app, watched):
    seed_one_of_each(any_app)
    watched.open(any_app)
    wait_for_rows(watched, 9)
    assert texts(watched, "#rows a.doc") == [f"doc-{n}.pdf" for n in range(8, -1, -1)]
    tabs = dict(
        zip(texts(watched, "#tabs .label"), texts(watched, "#tabs .count"), strict=True)
    )
    assert tabs == {
        "All": "9",
        "pending": "3",
        "processing": "2",
        "completed": "1",
        "failed": "2",
        "cancelled": "1",
    }
    row = watched.page.locator("#rows tr", has_text="doc-4.pdf")
    cells = row.locator("td").all_text_contents()
    assert cells[:5] == ["doc-4.pdf", "processing", "5", "1/3", "worker-1"]
    assert all(re.fullmatch(r"just now|\d+ s ago", age) for age in cells[5:])
    assert len(watched.api_calls("/extraction-jobs/stats")) >= 1
    (listing,) = watched.api_calls("/extraction-jobs")[:1]
    assert "order=desc" in listing[1]


def test_tabs_search_and_more_follow_the_api(sqlite_app, watched):
    sqlite_app.empty()
    for number in range(60):
        create(sqlite_app.api, f"page-{number:02}.pdf")
    failed = finish(sqlite_app.api, claim(sqlite_app.api, "w")[0], "failed")
    watched.open(sqlite_app)
    wait_for_rows(watched, 50)
    more = watched.page.get_by_role("button", name="More", exact=True)
    more.click()
    wait_for_rows(watched, 60)
    assert more.is_hidden()
    shown = texts(watched, "#rows a.doc")
    assert shown == sorted(shown, reverse=True) and len(set(shown)) == 60
    (cursor_call,) = [
        c for c in watched.api_calls("/extraction-jobs") if "cursor=" in c[1]
    ]
    assert "order=desc" in cursor_call[1]

    watched.page.get_by_role("link", name=re.compile("^failed")).click()
    wait_for_rows(watched, 1)
    assert texts(watched, "#rows a.doc") == [failed["document_id"]]

    watched.page.get_by_role("link", name=re.compile("^All")).click()
    watched.page.get_by_label("Document id (exact)").fill("page-42.pdf")
    watched.page.get_by_role("button", name="Search").click()
    wait_for_rows(watched, 1)
    assert texts(watched, "#rows a.doc") == ["page-42.pdf"]
    watched.page.get_by_label("Document id (exact)").fill("page-4")
    watched.page.get_by_role("button", name="Search").click()
    watched.page.get_by_text("No jobs match.").wait_for()


def test_auto_refresh_shows_new_jobs_and_can_be_paused(sqlite_app, watched):
    sqlite_app.empty()
    create(sqlite_app.api, "first.pdf")
    watched.page.clock.install()
    watched.open(sqlite_app)
    wait_for_rows(watched, 1)
    create(sqlite_app.api, "second.pdf")
    watched.page.clock.run_for(5_000)
    wait_for_rows(watched, 2)

    toggle = watched.page.locator("#refresh-toggle")
    toggle.click()
    assert toggle.get_attribute("aria-pressed") == "true"
    assert toggle.text_content() == "Resume auto-refresh"
    create(sqlite_app.api, "third.pdf")
    listed = len(watched.api_calls("/extraction-jobs"))
    watched.page.clock.run_for(20_000)
    watched.page.wait_for_timeout(300)
    assert len(watched.api_calls("/extraction-jobs")) == listed
    assert len(texts(watched, "#rows tr")) == 2

    toggle.click()
    watched.page.clock.run_for(5_000)
    wait_for_rows(watched, 3)


# --- A job's page ----------------------------------------------------------------


def test_a_job_page_shows_every_field_its_history_and_result(sqlite_app, watched):
    sqlite_app.empty()
    job = create(
        sqlite_app.api, "report.pdf", metadata={"source": "s3", "pages": [1, 2]}
    )
    held = claim(sqlite_app.api, "worker-7", lease_seconds=60)[0]
    result = {"text": "Total: 42", "confidence": 0.97, "fields": {"total": 42}}
    finish(sqlite_app.api, held, "completed", result=result)
    stored = sqlite_app.job(job["id"])
    watched.open(sqlite_app, f"#/jobs/{job['id']}")
    watched.page.locator(".event").nth(2).wait_for()

    assert texts(watched, "#fields dt") == list(stored)
    page = watched.page
    shown_result = page.locator('[data-field="result"] pre').text_content()
    assert json.loads(shown_result) == result
    assert shown_result == json.dumps(result, indent=2)
    assert json.loads(page.locator('[data-field="metadata"] pre').text_content()) == {
        "source": "s3",
        "pages": [1, 2],
    }
    assert page.locator('[data-field="worker_id"]').text_content() == "worker-7"
    assert page.locator('[data-field="attempts"]').text_content() == "1"

    types = texts(watched, ".event .event-type")
    assert types == ["created", "claimed", "completed"]
    claimed = page.locator(".event-claimed")
    assert "pending → processing" in claimed.text_content()
    facts = claimed.locator(".facts dd").all_text_contents()
    events = sqlite_app.events(job["id"])
    lease = events[1]["detail"]["lease_expires_at"]
    assert "worker-7" in facts
    assert any(fact.startswith(lease) for fact in facts), facts
    assert page.get_by_text("No action applies to a completed job.").is_visible()
    assert page.get_by_role("button", name="Cancel job").count() == 0


def test_a_long_history_is_followed_through_its_pages(sqlite_app, watched):
    sqlite_app.empty()
    job = create(sqlite_app.api, "busy.pdf")
    for _ in range(60):  # 120 events: a cancel and a retry each
        sqlite_app.api.post(f"/extraction-jobs/{job['id']}/cancel", json={})
        sqlite_app.api.post(f"/extraction-jobs/{job['id']}/retry", json={})
    watched.open(sqlite_app, f"#/jobs/{job['id']}")
    watched.page.wait_for_function(
        "() => document.querySelectorAll('.event').length === 121"
    )
    pages = watched.api_calls(f"/extraction-jobs/{job['id']}/events")
    assert len(pages) == 2, pages
    assert "after=0" in pages[0][1]
    last_of_first = sqlite_app.events(job["id"])[99]["id"]
    assert f"after={last_of_first}" in pages[1][1]
    ids = [
        int(value)
        for value in watched.page.locator(".event").evaluate_all(
            "items => items.map(item => item.dataset.eventId)"
        )
    ]
    assert ids == sorted(ids) and len(set(ids)) == 121


def test_cancel_and_retry_from_the_page_change_the_job(any_app, watched):
    any_app.empty()
    job = create(any_app.api, "to-cancel.pdf")
    watched.open(any_app, f"#/jobs/{job['id']}")
    page = watched.page
    page.get_by_role("button", name="Cancel job").click()
    dialog = page.get_by_role("dialog")
    assert "It is pending: it becomes cancelled at once." in dialog.text_content()
    dialog.get_by_label("Reason (optional, kept in the history)").fill("duplicate")
    dialog.get_by_role("button", name="Cancel the job").click()
    page.locator(".event-cancelled").wait_for()
    assert any_app.job(job["id"])["status"] == "cancelled"
    assert any_app.events(job["id"])[-1]["detail"] == {"reason": "duplicate"}

    page.get_by_role("button", name="Retry job").click()
    page.get_by_role("dialog").get_by_role("button", name="Retry the job").click()
    page.locator(".event-retried").wait_for()
    retried = any_app.job(job["id"])
    assert (retried["status"], retried["attempts"]) == ("pending", 0)
    assert page.get_by_role("button", name="Cancel job").is_visible()

    held = claim(any_app.api, "worker-9")[0]
    page.reload()
    page.get_by_role("button", name="Cancel job").click()
    assert "processing" in page.get_by_role("dialog").text_content()
    page.get_by_role("dialog").get_by_role("button", name="Cancel the job").click()
    page.get_by_text("the worker has yet to stop").wait_for()
    asked = any_app.job(held["id"])
    assert asked["status"] == "processing" and asked["cancel_requested_at"]


def test_the_confirmation_can_be_declined(sqlite_app, watched):
    sqlite_app.empty()
    job = create(sqlite_app.api, "keep.pdf")
    watched.open(sqlite_app, f"#/jobs/{job['id']}")
    watched.page.get_by_role("button", name="Cancel job").click()
    watched.page.get_by_role("dialog").get_by_role("button", name="Back").click()
    assert watched.page.get_by_role("dialog").count() == 0
    assert not watched.api_calls(f"/extraction-jobs/{job['id']}/cancel")
    assert sqlite_app.job(job["id"])["status"] == "pending"


# --- Bulk actions ----------------------------------------------------------------


def bulk_bodies(watched: Watched) -> list[dict]:
    return [
        json.loads(body) for _, _, body in watched.api_calls("/extraction-jobs/bulk")
    ]


def test_bulk_cancel_by_filter_shows_the_dry_run_count_first(any_app, watched):
    any_app.empty()
    batch = [create(any_app.api, "batch.pdf", priority=5) for _ in range(4)]
    others = [create(any_app.api, "other.pdf") for _ in range(2)]
    held = claim(any_app.api, "worker-2")[0]  # one of the batch, most urgent
    watched.open(any_app, "#/?document_id=batch.pdf")
    wait_for_rows(watched, 4)
    watched.page.get_by_role("button", name="Cancel all matching").click()
    summary = watched.page.locator("#bulk-summary")
    summary.get_by_text("4 matching job(s) would be cancelled.").wait_for()
    assert bulk_bodies(watched) == [
        {"action": "cancel", "filter": {"document_id": "batch.pdf"}, "dry_run": True}
    ]
    assert [any_app.job(j["id"])["status"] for j in batch].count("pending") == 3

    watched.page.get_by_role("dialog").get_by_label(re.compile("Reason")).fill("bad")
    watched.page.get_by_role("button", name="Cancel 4 job(s)").click()
    summary.get_by_text("4 job(s) cancelled.").wait_for()
    assert bulk_bodies(watched)[1:] == [
        {
            "action": "cancel",
            "filter": {"document_id": "batch.pdf"},
            "dry_run": False,
            "reason": "bad",
        }
    ]
    states = {j["id"]: any_app.job(j["id"]) for j in batch + others}
    assert states[held["id"]]["cancel_requested_at"]
    assert sorted(states[j["id"]]["status"] for j in batch) == [
        "cancelled",
        "cancelled",
        "cancelled",
        "processing",
    ]
    assert [states[j["id"]]["status"] for j in others] == ["pending", "pending"]


def test_bulk_retry_on_a_status_tab_and_nothing_to_do(sqlite_app, watched):
    sqlite_app.empty()
    for number in range(3):
        job = create(sqlite_app.api, f"f{number}.pdf", max_attempts=1)
        finish(sqlite_app.api, claim(sqlite_app.api, "w")[0], "failed")
    watched.open(sqlite_app, "#/?status=failed")
    wait_for_rows(watched, 3)
    cancel_all = watched.page.get_by_role("button", name="Cancel all matching")
    assert cancel_all.is_disabled()
    assert watched.page.get_by_text("Failed jobs cannot be cancelled.").is_visible()
    watched.page.get_by_role("button", name="Retry all matching").click()
    watched.page.get_by_text("3 matching job(s) would be retried.").wait_for()
    watched.page.get_by_role("button", name="Retry 3 job(s)").click()
    watched.page.get_by_text("3 job(s) retried.").wait_for()
    assert sqlite_app.job(job["id"])["status"] == "pending"
    watched.page.get_by_role("dialog").get_by_role("button", name="Close").click()
    wait_for_rows(watched, 0)
    watched.page.get_by_role("button", name="Retry all matching").click()
    watched.page.get_by_text("No matching job can be retried.").wait_for()
    assert watched.page.get_by_role("button", name=re.compile("^Retry 0")).count() == 0


def test_bulk_repeats_while_more_match(postgres_app, watched):
    """Over one call's 1000 jobs: the console sends the request again."""
    postgres_app.empty()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: create(postgres_app.api, "many.pdf"), range(1003)))
    watched.open(postgres_app, "#/?status=pending")
    wait_for_rows(watched, 50)
    watched.page.get_by_role("button", name="Cancel all matching").click()
    watched.page.get_by_text(
        "1,003 matching job(s) would be cancelled, 1,000 a call."
    ).wait_for()
    watched.page.get_by_role("button", name="Cancel 1,003 job(s)").click()
    watched.page.get_by_text("1,003 job(s) cancelled.").wait_for(timeout=30_000)
    assert [body["dry_run"] for body in bulk_bodies(watched)] == [True, False, False]
    counts = postgres_app.api.get("/extraction-jobs/stats").json()["counts"]
    assert (counts["pending"], counts["cancelled"]) == (0, 1003)


# --- Signing in ----------------------------------------------------------------------


def paste(watched: Watched, value: str) -> None:
    watched.page.get_by_label("Access token").fill(value)
    watched.page.get_by_role("button", name="Use token").click()


def test_a_pasted_admin_token_signs_in_and_acts(auth_app, watched, key):
    auth_app.empty()
    job = create(auth_app.api, "secured.pdf")
    admin = token(key, READ_SCOPE, ADMIN_SCOPE)
    watched.open(auth_app, f"#/jobs/{job['id']}")
    page = watched.page
    page.get_by_label("Access token").wait_for()
    assert not watched.api_calls(f"/extraction-jobs/{job['id']}")
    paste(watched, admin)
    page.get_by_text(f"Signed in as {OPERATOR}").wait_for()
    page.get_by_role("button", name="Cancel job").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel the job").click()
    page.locator(".event-cancelled").wait_for()
    assert auth_app.job(job["id"])["status"] == "cancelled"
    assert auth_app.events(job["id"])[-1]["actor"] == OPERATOR

    assert page.evaluate("sessionStorage.getItem('console.token')") == admin
    assert page.evaluate("localStorage.length") == 0
    assert not [url for _, url, _ in watched.requests if admin in url]
    assert admin not in auth_app.log.read_text()
    page.reload()
    page.get_by_text(f"Signed in as {OPERATOR}").wait_for()
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Access token").wait_for()
    assert page.evaluate("sessionStorage.getItem('console.token')") is None


def test_a_token_without_admin_sees_the_actions_disabled_with_the_reason(
    auth_app, watched, key
):
    auth_app.empty()
    job = create(auth_app.api, "read-only.pdf")
    watched.open(auth_app, f"#/jobs/{job['id']}")
    paste(watched, token(key, READ_SCOPE))
    page = watched.page
    cancel = page.get_by_role("button", name="Cancel job")
    cancel.wait_for()
    assert cancel.is_disabled()
    reason = f"Your token lacks the {ADMIN_SCOPE} permission"
    assert reason in page.locator("#job-actions").text_content()
    described = cancel.get_attribute("aria-describedby")
    assert reason in page.locator(f"#{described}").text_content()
    page.goto(f"{auth_app.base}/console#/?status=pending")
    wait_for_rows(watched, 1)
    for name in ("Cancel all matching", "Retry all matching"):
        assert page.get_by_role("button", name=name).is_disabled()
    assert not watched.api_calls("/extraction-jobs/bulk")


def test_a_token_the_api_refuses_is_shown_clearly(auth_app, watched, key):
    watched.open(auth_app)
    paste(watched, token(key))  # valid, but no permission at all
    alert = watched.page.locator("#notice")
    alert.get_by_text(
        f"Forbidden (403): The token lacks the '{READ_SCOPE}' permission."
    ).wait_for()
    watched.page.get_by_role("button", name="Sign out").click()
    paste(watched, "not-a-jwt")
    alert.get_by_text("(401)").wait_for()
    assert "not a well-formed JWT" in alert.text_content()
    watched.page.get_by_label("Access token").wait_for()
    assert watched.page.evaluate("sessionStorage.getItem('console.token')") is None


def test_sign_in_with_auth0_runs_the_code_flow_with_pkce(auth_app, tenant, watched):
    auth_app.empty()
    create(auth_app.api, "via-auth0.pdf")
    watched.origins.add(f"https://{tenant.domain}")
    watched.open(auth_app, "#/?status=pending")
    watched.page.get_by_role("button", name="Sign in with Auth0").click()
    wait_for_rows(watched, 1)
    page = watched.page
    assert page.url == f"{auth_app.base}/console#/?status=pending"
    page.get_by_text(f"Signed in as {OPERATOR}").wait_for()

    (asked,) = tenant.authorize_requests
    assert asked["code_challenge_method"] == "S256"
    assert asked["audience"] == AUDIENCE
    assert asked["redirect_uri"] == f"{auth_app.base}/console"
    assert set(asked["scope"].split()) == {READ_SCOPE, ADMIN_SCOPE}
    (traded,) = tenant.token_requests
    assert "client_secret" not in traded
    assert len(traded["code_verifier"]) >= 43
    (issued,) = tenant.tokens
    assert page.evaluate("sessionStorage.getItem('console.token')") == issued
    assert page.evaluate("sessionStorage.getItem('console.pkce')") is None
    assert not [url for _, url, _ in watched.requests if issued in url]
    tenant_calls = [u for _, u, _ in watched.requests if tenant.domain in u]
    assert [urlsplit(u).path for u in tenant_calls] == ["/authorize", "/oauth/token"]


# --- Safe and usable -------------------------------------------------------------------


def test_a_hostile_document_id_renders_as_text(sqlite_app, watched):
    sqlite_app.empty()
    job = create(sqlite_app.api, XSS, metadata={"note": "<script>alert(2)</script>"})
    watched.open(sqlite_app)
    wait_for_rows(watched, 1)
    page = watched.page
    assert texts(watched, "#rows a.doc") == [XSS]
    page.get_by_role("link", name=XSS).click()
    page.locator(".event").first.wait_for()
    assert page.locator("#job-title .doc").text_content() == XSS
    assert (
        "<script>alert(2)</script>"
        in page.locator('[data-field="metadata"]').text_content()
    )
    page.get_by_role("button", name="Cancel job").click()
    assert XSS in page.get_by_role("dialog").locator("h2").text_content()
    assert page.locator("img").count() == 0
    assert page.locator("main script, dialog script").count() == 0
    # The policy refuses HTML from strings outright (Trusted Types).
    refused = page.evaluate(
        "() => { try { document.body.innerHTML = '<b>x</b>'; return 'written'; }"
        " catch (error) { return error.name; } }"
    )
    assert refused == "TypeError"
    watched.page.wait_for_timeout(200)  # an onerror would have fired by now
    assert sqlite_app.job(job["id"])["document_id"] == XSS


def test_readable_at_phone_width_and_reachable_by_keyboard(sqlite_app, watched):
    sqlite_app.empty()
    job = create(sqlite_app.api, "a-rather-long-document-name-for-a-phone.pdf")
    page = watched.page
    page.set_viewport_size(PHONE)
    watched.open(sqlite_app)
    wait_for_rows(watched, 1)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert (
        page.locator("#rows tr").evaluate("row => getComputedStyle(row).display")
        == "block"
    )

    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('doc')"):
            break
    else:
        pytest.fail("no job link is reachable by Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "the focused link shows no focus ring"
    page.keyboard.press("Enter")
    page.locator(".event").first.wait_for()
    assert page.url.endswith(f"#/jobs/{job['id']}")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Cancel job":
            break
    else:
        pytest.fail("the Cancel button is not reachable by Tab")
    page.keyboard.press("Enter")
    assert page.get_by_role("dialog").is_visible()
    page.keyboard.press("Escape")
    assert page.get_by_role("dialog").count() == 0
    assert sqlite_app.job(job["id"])["status"] == "pending"
