"""The console's routes over HTTP (console.py): public like /docs, one strict
Content-Security-Policy on every answer, relative URLs only, and a runtime
config that says how to sign in and holds no secret. The page itself is
tested in a real browser (test_console_browser.py)."""

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from jwks_server import JwksServer, use_jwks

import console
from main import create_app
from settings import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ISSUER = "https://tenant.example.invalid/"
AUDIENCE = "https://extraction-jobs.example.invalid"
CLIENT_ID = "ConsoleSpaClientId123"
ASSETS = ("console.js", "console.css", "icon.svg")


@pytest.fixture
def jwks():
    server = JwksServer().start()
    yield server
    server.stop()


@pytest.fixture
def client(monkeypatch, tmp_path) -> TestClient:
    """Auth disabled, on SQLite: these routes never touch the database."""
    monkeypatch.setenv("DB_PATH", str(tmp_path / "jobs.db"))
    return TestClient(create_app())


@pytest.fixture
def auth_on(monkeypatch, tmp_path, jwks):
    use_jwks(monkeypatch, jwks, issuer=ISSUER, audience=AUDIENCE)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    monkeypatch.setenv("CURSOR_SECRET", "s" * 40)


def directives(response) -> dict[str, list[str]]:
    policy = response.headers["content-security-policy"]
    parsed = {}
    for part in policy.split(";"):
        name, *sources = part.split()
        parsed[name] = sources
    return parsed


def console_answers(client: TestClient):
    yield client.get("/console")
    yield client.get("/console/config.json")
    for name in ASSETS:
        yield client.get(f"/console/assets/{name}")
    yield client.get("/console/assets/missing.js")


def test_console_is_public_with_auth_on(auth_on, jwks):
    client = TestClient(create_app())
    page = client.get("/console")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    for name in ASSETS:
        assert client.get(f"/console/assets/{name}").status_code == 200
    assert client.get("/console/config.json").status_code == 200
    assert jwks.request_count == 0, "no token is checked for the console's files"
    # ...while the API itself still wants one.
    assert client.get("/extraction-jobs").status_code == 401


def test_every_console_answer_has_the_strict_policy(auth_on):
    for response in console_answers(TestClient(create_app())):
        policy = directives(response)
        assert policy["default-src"] == ["'none'"]
        assert policy["script-src"] == ["'self'"]
        assert policy["style-src"] == ["'self'"]
        assert policy["connect-src"] == ["'self'"]
        assert policy["frame-ancestors"] == ["'none'"]
        assert policy["base-uri"] == ["'none'"]
        assert policy["require-trusted-types-for"] == ["'script'"]
        assert "unsafe-inline" not in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"


def test_with_a_console_client_the_tenant_is_the_one_other_connect_source(
    auth_on, monkeypatch
):
    monkeypatch.setenv("AUTH0_CONSOLE_CLIENT_ID", CLIENT_ID)
    client = TestClient(create_app())
    for response in console_answers(client):
        assert directives(response)["connect-src"] == [
            "'self'",
            "https://tenant.example.invalid",
        ]


def test_the_client_id_does_nothing_with_auth_disabled(monkeypatch, tmp_path):
    monkeypatch.setenv("DB_PATH", str(tmp_path / "jobs.db"))
    monkeypatch.setenv("AUTH0_CONSOLE_CLIENT_ID", CLIENT_ID)
    client = TestClient(create_app())
    assert directives(client.get("/console"))["connect-src"] == ["'self'"]
    assert client.get("/console/config.json").json()["auth0"] is None


def test_config_says_how_to_sign_in_and_holds_no_secret(auth_on, monkeypatch):
    monkeypatch.setenv("AUTH0_CONSOLE_CLIENT_ID", CLIENT_ID)
    response = TestClient(create_app()).get("/console/config.json")
    assert response.headers["cache-control"] == "no-store"
    config = response.json()
    assert config["auth_enabled"] is True
    assert config["permissions_checked"] is True
    assert config["auth0"] == {
        "domain": "tenant.example.invalid",
        "audience": AUDIENCE,
        "client_id": CLIENT_ID,
    }
    assert config["admin_permission"] == "admin:extraction-jobs"
    assert config["actions"] == {
        "cancel": ["pending", "processing"],
        "retry": ["failed", "cancelled"],
    }
    assert "s" * 40 not in response.text
    assert "sqlite" not in response.text


def test_config_without_a_console_client_or_permission_checks(auth_on, monkeypatch):
    monkeypatch.setenv("AUTH_REQUIRE_SCOPES", "0")
    config = TestClient(create_app()).get("/console/config.json").json()
    assert config["auth0"]["client_id"] is None
    assert config["permissions_checked"] is False


def test_config_with_auth_disabled(client):
    config = client.get("/console/config.json").json()
    assert config["auth_enabled"] is False
    assert config["auth0"] is None


def test_a_domain_that_could_break_the_policy_refuses_to_start(auth_on, monkeypatch):
    monkeypatch.setenv("AUTH0_CONSOLE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("AUTH0_DOMAIN", "tenant.example;script-src")
    with pytest.raises(ConfigError, match="AUTH0_DOMAIN"):
        create_app()


@pytest.mark.parametrize(
    "path",
    [
        "/console/assets/missing.js",
        "/console/assets/..%2F..%2Fsettings.py",
        "/console/assets/%2e%2e",
        "/console/assets/index.html",
        "/console/assets/",
    ],
)
def test_only_the_console_files_are_served(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "Settings" not in response.text


def test_assets_are_revalidated_by_content_hash(client):
    first = client.get("/console/assets/console.js")
    assert first.headers["content-type"] == "text/javascript; charset=utf-8"
    assert first.headers["cache-control"] == "no-cache"
    etag = first.headers["etag"]
    again = client.get("/console/assets/console.js", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    other = client.get("/console/assets/console.css", headers={"If-None-Match": etag})
    assert other.status_code == 200


def test_the_page_names_only_relative_urls():
    """So /prod/console loads /prod/console/assets/... behind a named stage."""
    html = (console.CONSOLE_DIR / "index.html").read_text()
    urls = re.findall(r'(?:href|src)="([^"]*)"', html)
    assert urls, html
    for url in urls:
        assert url.startswith(("console/", "#")), url
    script = (console.ASSETS_DIR / "console.js").read_text()
    for url in re.findall(r'(?:fetch|api)\(\s*[`"]([^`"]*)', script):
        assert not url.startswith("/"), url


def test_the_script_never_writes_html():
    """Every value goes in as text; the policy's Trusted Types would throw."""
    script = (console.ASSETS_DIR / "console.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert sink not in script
    assert "localStorage" not in script, "the token is kept in sessionStorage only"


def test_the_console_is_not_in_the_openapi_document(client):
    assert not any(
        path.startswith("/console")
        for path in client.get("/openapi.json").json()["paths"]
    )
