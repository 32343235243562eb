"""Auth0 bearer-token validation against a real JWKS server on 127.0.0.1.

Keys are generated here; tokens are signed with them. Auth is switched on per
test (the rest of the suite runs with AUTH_DISABLED=1).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from jose import jwk, jwt

import auth
import settings
from tests.jwks_server import JwksServer, RsaTestKey, use_jwks

AUDIENCE = "https://extraction-jobs.example.invalid"
DOMAIN = "tenant.example.invalid"
ISSUER = f"https://{DOMAIN}/"
SUBJECT = "auth0|test-user"
BOTH_SCOPES = f"{auth.READ_SCOPE} {auth.WRITE_SCOPE}"
OMIT = object()
ROOT = Path(__file__).resolve().parent.parent
PLAIN_CHALLENGE = 'Bearer realm="extraction-jobs"'


class FakeClock:
    """Monotonic time the test moves by hand, to cross TTLs and cooldowns."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def key_a() -> RsaTestKey:
    return RsaTestKey("key-a")


@pytest.fixture(scope="module")
def key_b() -> RsaTestKey:
    return RsaTestKey("key-b")


@pytest.fixture(scope="module")
def impostor() -> RsaTestKey:
    """A different key pair that claims key-a's kid."""
    return RsaTestKey("key-a")


@pytest.fixture
def jwks(key_a):
    server = JwksServer().start()
    server.keys = [key_a.public_jwk()]
    yield server
    server.stop()


@pytest.fixture
def auth_env(monkeypatch, tmp_path, jwks):
    use_jwks(monkeypatch, jwks, issuer=ISSUER, audience=AUDIENCE)
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DB_PATH", str(tmp_path / "jobs.db"))
    return monkeypatch


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_client(auth_env, clock):
    """A fresh app (so a fresh JWKS cache) driven by the fake clock."""
    import main

    clients = []

    def build() -> TestClient:
        app = main.create_app()
        app.state.authenticator.jwks.clock = clock
        client = TestClient(app)
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def sign(key: RsaTestKey, *, kid=OMIT, **overrides) -> str:
    """An RS256 token with valid defaults; pass OMIT to drop a claim."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "iat": now,
        "exp": now + 300,
        "scope": BOTH_SCOPES,
    }
    claims.update(overrides)
    claims = {name: value for name, value in claims.items() if value is not OMIT}
    header = {} if kid is None else {"kid": key.kid if kid is OMIT else kid}
    return jwt.encode(claims, signing_key(key), algorithm="RS256", headers=header)


@functools.cache
def signing_key(key: RsaTestKey) -> jwk.Key:
    """Parsing a PEM private key is slow; parse each test key once."""
    return jwk.construct(key.private_pem, algorithm="RS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict) -> str:
    return b64url(json.dumps(value).encode())


def assert_invalid_token(response, token: str | None = None) -> None:
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="extraction-jobs", error="invalid_token"')
    assert 'error_description="' in challenge
    assert response.json()["detail"].startswith("Invalid access token:")
    if token is not None:
        assert token not in response.text
        assert token not in challenge


def create_job(client: TestClient, token: str):
    return client.post(
        "/extraction-jobs", json={"document_id": "doc-1.pdf"}, headers=bearer(token)
    )


# --- a valid token on every route -------------------------------------------


def test_post_records_the_token_subject_as_created_by(client, key_a):
    response = create_job(client, sign(key_a))
    assert response.status_code == 201, response.text
    assert response.json()["created_by"] == SUBJECT


def test_get_list_get_one_and_patch_accept_a_valid_token(client, key_a):
    token = sign(key_a)
    job_id = create_job(client, token).json()["id"]

    listed = client.get("/extraction-jobs", headers=bearer(token))
    assert listed.status_code == 200, listed.text
    assert job_id in json.dumps(listed.json())

    fetched = client.get(f"/extraction-jobs/{job_id}", headers=bearer(token))
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["created_by"] == SUBJECT

    patched = client.patch(
        f"/extraction-jobs/{job_id}",
        json={"status": "processing"},
        headers=bearer(token),
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["status"] == "processing"


def test_claim_accepts_a_write_token_and_rejects_read_only(client, key_a):
    create_job(client, sign(key_a))
    body = {"worker_id": "worker-1", "limit": 1}

    read_only = client.post(
        "/extraction-jobs/claim",
        json=body,
        headers=bearer(sign(key_a, scope=auth.READ_SCOPE)),
    )
    assert read_only.status_code == 403, read_only.text

    claimed = client.post(
        "/extraction-jobs/claim", json=body, headers=bearer(sign(key_a))
    )
    assert claimed.status_code == 200, claimed.text


# --- 401 without usable credentials -----------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Token abc.def.ghi"},
    ],
    ids=["none", "bearer-without-token", "bearer-blank", "basic", "other-scheme"],
)
def test_missing_or_malformed_header_is_401_with_plain_challenge(client, headers):
    for method, path in [
        ("GET", "/extraction-jobs"),
        ("POST", "/extraction-jobs"),
        ("GET", f"/extraction-jobs/{uuid.uuid4()}"),
        ("PATCH", f"/extraction-jobs/{uuid.uuid4()}"),
    ]:
        response = client.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"] == PLAIN_CHALLENGE
        assert "Authorization: Bearer" in response.json()["detail"]


def test_a_non_jwt_bearer_value_is_invalid_token(client):
    response = client.get("/extraction-jobs", headers=bearer("not-a-jwt"))
    assert_invalid_token(response, "not-a-jwt")
    assert "well-formed" in response.json()["detail"]


# --- 401 invalid_token causes -------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"exp": int(time.time()) - 120}, "expired"),
        ({"exp": OMIT}, "exp"),
        ({"nbf": int(time.time()) + 120}, "not valid yet"),
        ({"iss": "https://other-tenant.example.invalid/"}, "issuer"),
        ({"iss": ISSUER.rstrip("/")}, "issuer"),
        ({"iss": OMIT}, "iss"),
        ({"aud": "https://another-api.example.invalid"}, "audience"),
        ({"aud": ["https://another-api.example.invalid", "x"]}, "audience"),
        ({"aud": OMIT}, "aud"),
    ],
    ids=[
        "expired",
        "no-exp",
        "not-yet-valid",
        "wrong-issuer",
        "issuer-without-trailing-slash",
        "no-issuer",
        "wrong-audience",
        "audience-list-without-ours",
        "no-audience",
    ],
)
def test_bad_claims_are_invalid_token(client, key_a, overrides, words):
    token = sign(key_a, **overrides)
    response = client.get("/extraction-jobs", headers=bearer(token))
    assert_invalid_token(response, token)
    assert words in response.json()["detail"]


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [None, float("inf"), float("nan"), [1]])
def test_signed_but_non_numeric_time_claims_are_invalid_token(
    client, key_a, claim, value
):
    token = sign(key_a, **{claim: value})
    assert_invalid_token(client.get("/extraction-jobs", headers=bearer(token)), token)


def test_clock_leeway_is_at_most_60_seconds(client, key_a):
    now = int(time.time())
    within = sign(key_a, exp=now - 30, nbf=now + 30)
    assert client.get("/extraction-jobs", headers=bearer(within)).status_code == 200
    beyond = sign(key_a, exp=now - 70)
    assert_invalid_token(client.get("/extraction-jobs", headers=bearer(beyond)), beyond)


def test_audience_list_containing_ours_is_accepted(client, key_a):
    token = sign(key_a, aud=["https://another-api.example.invalid", AUDIENCE])
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200


def test_token_without_kid_is_rejected_before_fetching_keys(client, key_a, jwks):
    token = sign(key_a, kid=None)
    response = client.get("/extraction-jobs", headers=bearer(token))
    assert_invalid_token(response, token)
    assert "kid" in response.json()["detail"]
    assert jwks.request_count == 0


def test_unknown_kid_is_invalid_token(client, key_b):
    token = sign(key_b)
    response = client.get("/extraction-jobs", headers=bearer(token))
    assert_invalid_token(response, token)
    assert "unknown key" in response.json()["detail"]


# --- forged tokens ------------------------------------------------------------


def test_token_signed_by_another_key_with_the_same_kid_is_rejected(client, impostor):
    token = sign(impostor)
    response = client.get("/extraction-jobs", headers=bearer(token))
    assert_invalid_token(response, token)
    assert "signature" in response.json()["detail"]


def test_alg_none_is_rejected_before_any_key_is_used(client, key_a, jwks):
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "attacker",
        "exp": int(time.time()) + 300,
    }
    token = f"{b64url_json({'alg': 'none', 'kid': key_a.kid})}.{b64url_json(payload)}."
    response = client.get("/extraction-jobs", headers=bearer(token))
    assert_invalid_token(response, token)
    assert "RS256" in response.json()["detail"]
    assert jwks.request_count == 0


def test_hs256_signed_with_the_public_key_is_rejected(client, key_a, jwks):
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "attacker",
        "exp": int(time.time()) + 300,
        "scope": BOTH_SCOPES,
    }
    signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT', 'kid': key_a.kid})}.{b64url_json(payload)}"
    mac = hmac.new(
        key_a.public_pem.encode(), signing_input.encode(), hashlib.sha256
    ).digest()
    token = f"{signing_input}.{b64url(mac)}"
    response = client.get("/extraction-jobs", headers=bearer(token))
    assert_invalid_token(response, token)
    assert "RS256" in response.json()["detail"]
    assert jwks.request_count == 0


def test_tampered_payload_is_rejected(client, key_a):
    genuine = sign(key_a, scope=auth.READ_SCOPE)
    header, _, signature = genuine.split(".")
    forged_payload = jwt.get_unverified_claims(genuine)
    forged_payload["scope"] = BOTH_SCOPES
    token = f"{header}.{b64url_json(forged_payload)}.{signature}"
    response = create_job(client, token)
    assert_invalid_token(response, token)
    assert "signature" in response.json()["detail"]


# --- scopes -----------------------------------------------------------------


def test_read_only_token_can_read_but_not_write(client, key_a):
    token = sign(key_a, scope=auth.READ_SCOPE)
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    for response in [
        create_job(client, token),
        client.patch(
            f"/extraction-jobs/{uuid.uuid4()}",
            json={"status": "failed"},
            headers=bearer(token),
        ),
    ]:
        assert response.status_code == 403, response.text
        assert response.headers["www-authenticate"] == (
            'Bearer realm="extraction-jobs", error="insufficient_scope", scope="write:extraction-jobs"'
        )
        assert auth.WRITE_SCOPE in response.json()["detail"]


def test_token_without_scopes_cannot_read(client, key_a):
    token = sign(key_a, scope=OMIT)
    for path in ["/extraction-jobs", f"/extraction-jobs/{uuid.uuid4()}"]:
        response = client.get(path, headers=bearer(token))
        assert response.status_code == 403, response.text
        assert response.headers["www-authenticate"] == (
            'Bearer realm="extraction-jobs", error="insufficient_scope", scope="read:extraction-jobs"'
        )


def test_write_scope_alone_does_not_grant_read(client, key_a):
    token = sign(key_a, scope=auth.WRITE_SCOPE)
    assert create_job(client, token).status_code == 201
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 403


def test_rbac_permissions_claim_grants_scopes(client, key_a):
    token = sign(
        key_a, scope="openid profile", permissions=[auth.READ_SCOPE, auth.WRITE_SCOPE]
    )
    assert create_job(client, token).status_code == 201
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200


def test_scope_and_permissions_are_united(client, key_a):
    token = sign(key_a, scope=auth.READ_SCOPE, permissions=[auth.WRITE_SCOPE])
    assert create_job(client, token).status_code == 201
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200


def test_scope_check_can_be_switched_off(auth_env, make_client, key_a):
    auth_env.setenv("AUTH_REQUIRE_SCOPES", "0")
    client = make_client()
    token = sign(key_a, scope=OMIT)
    assert create_job(client, token).status_code == 201
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    expired = sign(key_a, scope=OMIT, exp=int(time.time()) - 120)
    assert_invalid_token(
        client.get("/extraction-jobs", headers=bearer(expired)), expired
    )


# --- the JWKS cache -----------------------------------------------------------


def test_jwks_is_fetched_lazily_and_once_for_many_requests(
    make_client, key_a, jwks, clock
):
    client = make_client()
    assert jwks.request_count == 0
    token = sign(key_a)
    for _ in range(20):
        assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    clock.now += 599
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    assert jwks.request_count == 1
    clock.now += 2
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    assert jwks.request_count == 2


def test_cache_control_max_age_shortens_the_ttl(client, key_a, jwks, clock):
    jwks.cache_control = "public, max-age=15"
    token = sign(key_a)
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    clock.now += 14
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    assert jwks.request_count == 1
    clock.now += 2
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    assert jwks.request_count == 2


def test_every_app_has_its_own_cache(make_client, key_a, jwks):
    token = sign(key_a)
    for _ in range(2):
        assert (
            make_client().get("/extraction-jobs", headers=bearer(token)).status_code
            == 200
        )
    assert jwks.request_count == 2


def test_key_added_after_start_is_accepted(client, key_a, key_b, jwks, clock):
    assert (
        client.get("/extraction-jobs", headers=bearer(sign(key_a))).status_code == 200
    )
    jwks.keys = [key_a.public_jwk(), key_b.public_jwk()]
    # No waiting: the start-up fetch does not count towards the unknown-kid cooldown.
    response = client.get("/extraction-jobs", headers=bearer(sign(key_b)))
    assert response.status_code == 200, response.text
    assert jwks.request_count == 2


def test_key_removed_from_the_jwks_is_refused_after_refresh(
    client, key_a, key_b, jwks, clock
):
    jwks.keys = [key_a.public_jwk(), key_b.public_jwk()]
    assert (
        client.get("/extraction-jobs", headers=bearer(sign(key_b))).status_code == 200
    )
    jwks.keys = [key_a.public_jwk()]
    clock.now += 601
    token = sign(key_b)
    assert_invalid_token(client.get("/extraction-jobs", headers=bearer(token)), token)


def test_unknown_kid_storm_refetches_at_most_once_per_30_seconds(
    client, key_a, jwks, clock
):
    assert (
        client.get("/extraction-jobs", headers=bearer(sign(key_a))).status_code == 200
    )
    for _ in range(50):
        token = sign(key_a, kid=f"made-up-{uuid.uuid4()}")
        assert_invalid_token(
            client.get("/extraction-jobs", headers=bearer(token)), token
        )
    assert jwks.request_count == 2
    clock.now += 29
    client.get("/extraction-jobs", headers=bearer(sign(key_a, kid="made-up-again")))
    assert jwks.request_count == 2
    clock.now += 1
    client.get("/extraction-jobs", headers=bearer(sign(key_a, kid="made-up-again")))
    assert jwks.request_count == 3


def test_jwks_server_down_without_keys_is_503_with_retry_after(
    client, key_a, jwks, clock
):
    jwks.up = False
    token = sign(key_a)
    response = client.get("/extraction-jobs", headers=bearer(token))
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert token not in response.text
    assert (
        client.post("/extraction-jobs", json={}, headers=bearer(token)).status_code
        == 503
    )
    assert jwks.request_count == 1, (
        "a failed fetch backs off instead of retrying per request"
    )

    jwks.up = True
    clock.now += int(response.headers["retry-after"])
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200


def test_unreachable_jwks_url_is_503(auth_env, make_client, key_a):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    auth_env.setenv(
        "AUTH0_JWKS_URL", f"http://127.0.0.1:{closed_port}/.well-known/jwks.json"
    )
    response = make_client().get("/extraction-jobs", headers=bearer(sign(key_a)))
    assert response.status_code == 503, response.text
    assert "Retry-After" in response.headers


def test_failed_refresh_keeps_the_keys_already_held(client, key_a, jwks, clock):
    token = sign(key_a)
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    jwks.up = False
    clock.now += 601
    for _ in range(5):
        assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    assert jwks.request_count == 2


def test_unusable_jwks_entries_are_skipped(client, key_a, key_b, jwks):
    broken_b = {**key_b.public_jwk(), "n": "!!not-base64!!"}
    jwks.keys = [
        {"kty": "oct", "kid": "hmac-key", "k": "c2VjcmV0"},
        {**key_a.public_jwk(), "use": "enc"},
        {**key_a.public_jwk(), "alg": "RS512"},
        broken_b,
        "not-an-object",
        key_a.public_jwk(),
    ]
    assert (
        client.get("/extraction-jobs", headers=bearer(sign(key_a))).status_code == 200
    )
    token = sign(key_b)
    assert_invalid_token(client.get("/extraction-jobs", headers=bearer(token)), token)


@pytest.mark.parametrize(
    "keys",
    [[], [{"kty": "oct", "kid": "hmac-key", "k": "c2VjcmV0"}], "not-a-list"],
    ids=["empty", "only-hmac", "keys-not-a-list"],
)
def test_jwks_without_usable_keys_is_503(client, key_a, jwks, keys):
    jwks.keys = keys
    response = client.get("/extraction-jobs", headers=bearer(sign(key_a)))
    assert response.status_code == 503, response.text


def test_concurrent_cold_start_fetches_the_jwks_once(auth_env, key_a, jwks):
    jwks.delay_seconds = 0.2
    authenticator = auth.authenticator_for(settings.load_settings())
    token = sign(key_a)
    results: list[auth.Principal] = []

    def validate() -> None:
        results.append(authenticator.authenticate(token))

    threads = [threading.Thread(target=validate) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 16
    assert {principal.sub for principal in results} == {SUBJECT}
    assert jwks.request_count == 1


def test_stale_keys_serve_other_threads_while_one_refreshes(
    auth_env, key_a, jwks, clock
):
    authenticator = auth.authenticator_for(settings.load_settings())
    authenticator.jwks.clock = clock
    token = sign(key_a)
    authenticator.authenticate(token)
    clock.now += 601
    jwks.delay_seconds = 1.0
    refresher = threading.Thread(target=authenticator.authenticate, args=(token,))
    refresher.start()
    while jwks.request_count < 2:
        time.sleep(0.01)
    started = time.monotonic()
    assert authenticator.authenticate(token).sub == SUBJECT
    assert time.monotonic() - started < 0.5
    refresher.join()


# --- public routes ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/docs", "/openapi.json"])
def test_public_routes_need_no_token(client, jwks, path):
    assert client.get(path).status_code == 200
    assert jwks.request_count == 0


def test_openapi_declares_the_bearer_scheme_for_swagger(client):
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= next(
        iter(schemes.values())
    ).items()


# --- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    "missing",
    [["AUTH0_DOMAIN"], ["AUTH0_AUDIENCE"], ["AUTH0_DOMAIN", "AUTH0_AUDIENCE"]],
)
def test_missing_configuration_refuses_to_start_and_names_it(auth_env, missing):
    import main

    for name in missing:
        auth_env.delenv(name)
    with pytest.raises(settings.ConfigError) as raised:
        main.create_app()
    for name in missing:
        assert name in str(raised.value)


def test_blank_configuration_counts_as_missing(auth_env):
    auth_env.setenv("AUTH0_AUDIENCE", "  ")
    with pytest.raises(settings.ConfigError, match="AUTH0_AUDIENCE"):
        auth.authenticator_for(settings.load_settings())


def test_issuer_and_jwks_url_default_from_the_domain(auth_env):
    auth_env.delenv("AUTH0_ISSUER")
    auth_env.delenv("AUTH0_JWKS_URL")
    found = auth.authenticator_for(settings.load_settings()).settings
    assert found.issuer == f"https://{DOMAIN}/"
    assert found.jwks_url == f"https://{DOMAIN}/.well-known/jwks.json"
    assert found.require_scopes is True


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "Yes"])
def test_auth_disabled_values_bypass_auth(auth_env, value):
    auth_env.setenv("AUTH_DISABLED", value)
    auth_env.delenv("AUTH0_DOMAIN")
    assert auth.authenticator_for(settings.load_settings()) is None


@pytest.mark.parametrize("value", ["0", "false", "no", ""])
def test_other_auth_disabled_values_keep_auth_on(auth_env, value):
    auth_env.setenv("AUTH_DISABLED", value)
    assert isinstance(
        auth.authenticator_for(settings.load_settings()), auth.Authenticator
    )


def test_disabled_auth_admits_requests_without_a_token(auth_env, jwks):
    import main

    auth_env.setenv("AUTH_DISABLED", "1")
    with TestClient(main.create_app()) as client:
        response = client.post("/extraction-jobs", json={"document_id": "doc.pdf"})
        assert response.status_code == 201, response.text
        assert response.json()["created_by"] is None
        assert client.get("/extraction-jobs").status_code == 200
    assert jwks.request_count == 0


def test_disabled_auth_in_lambda_logs_a_warning(auth_env, caplog):
    auth_env.setenv("AUTH_DISABLED", "1")
    auth_env.setenv("AWS_LAMBDA_FUNCTION_NAME", "extraction-jobs-api")
    with caplog.at_level(logging.WARNING, logger="auth"):
        assert auth.authenticator_for(settings.load_settings()) is None
    assert "AUTH_DISABLED" in caplog.text
    assert "extraction-jobs-api" in caplog.text


def test_disabled_auth_outside_lambda_does_not_warn(auth_env, caplog):
    auth_env.setenv("AUTH_DISABLED", "1")
    with caplog.at_level(logging.WARNING, logger="auth"):
        auth.authenticator_for(settings.load_settings())
    assert caplog.text == ""


def test_importing_auth_loads_no_jwt_or_http_library():
    """Lambda cold starts with auth disabled must not pay for jose, cryptography or httpx."""
    script = (
        "import os, sys; os.environ['AUTH_DISABLED'] = '1'; import auth, settings; "
        "assert auth.authenticator_for(settings.load_settings()) is None; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'jose', 'cryptography', 'httpx'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert result.stdout.strip() == "[]"


def test_lambda_cold_start_with_auth_disabled_warns_and_loads_no_jwt_library(
    tmp_path,
):
    """The real entry point, in a fresh interpreter, as Lambda imports it."""
    script = (
        "import sys; import lambda_handler; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'jose', 'cryptography', 'httpx'}))"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "AUTH_DISABLED": "1",
        "AWS_LAMBDA_FUNCTION_NAME": "extraction-jobs-api",
        "DB_PATH": str(tmp_path / "jobs.db"),
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.stdout.strip() == "[]"
    assert "AUTH_DISABLED" in result.stderr
    assert "extraction-jobs-api" in result.stderr


@pytest.mark.parametrize(
    "sub", ["auth0|nul\u0000byte", "x" * 256, "lone \ud800 surrogate"]
)
def test_subject_that_cannot_be_stored_is_an_invalid_token(client, key_a, sub):
    """created_by could not hold it (PostgreSQL refuses NUL and over-long values)."""
    token = sign(key_a, sub=sub)
    assert_invalid_token(create_job(client, token), token)
    assert client.get("/extraction-jobs", headers=bearer(sign(key_a))).json() == []


def test_subject_of_255_characters_is_recorded(client, key_a):
    sub = "s" * 255
    response = create_job(client, sign(key_a, sub=sub))
    assert response.status_code == 201, response.text
    assert response.json()["created_by"] == sub


# --- hardening: sub required, bounded JWKS fetch, bounded staleness ----------


@pytest.mark.parametrize("sub", [OMIT, ""], ids=["absent", "empty"])
def test_token_without_subject_is_invalid_token(client, key_a, sub):
    """Callers without `sub` would share one Idempotency-Key namespace."""
    token = sign(key_a, sub=sub)
    response = create_job(client, token)
    assert_invalid_token(response, token)
    assert "(sub)" in response.json()["detail"]
    assert client.get("/extraction-jobs", headers=bearer(sign(key_a))).json() == []


def test_two_callers_never_replay_each_others_idempotent_create(client, key_a):
    headers = {"Idempotency-Key": "same-key"}
    body = {"document_id": "doc-1.pdf"}
    first = client.post(
        "/extraction-jobs", json=body, headers=headers | bearer(sign(key_a, sub="a"))
    )
    second = client.post(
        "/extraction-jobs", json=body, headers=headers | bearer(sign(key_a, sub="b"))
    )
    assert (first.status_code, second.status_code) == (201, 201)
    assert "idempotent-replayed" not in second.headers
    assert first.json()["id"] != second.json()["id"]


class RawHttpServer:
    """A loopback HTTP server that answers with whatever `respond` writes,
    byte by byte if it likes: for JWKS endpoints that drip or overflow."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.stop = threading.Event()
        self.finished: list[float] = []
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                received = b""
                while b"\r\n\r\n" not in received:
                    data = self.request.recv(4096)
                    if not data:
                        return
                    received += data
                try:
                    server.respond(self.request.sendall, server.stop)
                except OSError:
                    return  # the client gave up
                server.finished.append(time.monotonic())

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/.well-known/jwks.json"

    def close(self) -> None:
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()


def drip(data: bytes, every: float):
    """Send `data` one byte per `every` seconds (until the test ends)."""

    def respond(send, stop: threading.Event) -> None:
        for byte in data:
            send(bytes([byte]))
            if stop.wait(every):
                return

    return respond


def jwks_answer(keys: list[dict], *, chunked: bool = False, pad: int = 0) -> bytes:
    body = json.dumps({"keys": keys, "padding": "x" * pad}).encode()
    if chunked:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        return (
            head
            + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
            + b"0\r\n\r\n"
        )
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.fixture
def raw_jwks(auth_env):
    """Point the app's JWKS URL at a RawHttpServer built by the test."""
    servers = []

    def serve(respond) -> RawHttpServer:
        server = RawHttpServer(respond)
        servers.append(server)
        auth_env.setenv("AUTH0_JWKS_URL", server.url)
        return server

    yield serve
    for server in servers:
        server.close()


def timed_get(client, token: str):
    started = time.monotonic()
    response = client.get("/extraction-jobs", headers=bearer(token))
    return response, time.monotonic() - started


def test_jwks_deadline_is_five_seconds_and_the_cap_64_kib():
    assert auth.JWKS_DEADLINE_SECONDS == 5.0
    assert auth.JWKS_MAX_BYTES == 64 * 1024


def test_jwks_dripping_one_byte_every_3_s_is_abandoned_at_the_deadline(
    raw_jwks, make_client, key_a
):
    """The review's case: a byte every 3 s used to hold a fetch for 21 s."""
    answer = jwks_answer([key_a.public_jwk()])
    head, body = answer.split(b"\r\n\r\n", 1)
    server = raw_jwks(
        lambda send, stop: (send(head + b"\r\n\r\n"), drip(body, 3.0)(send, stop))
    )
    response, elapsed = timed_get(make_client(), sign(key_a))
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert 5.0 <= elapsed < 8.0, f"the fetch took {elapsed:.1f} s"
    assert server.finished == [], "the server was still sending"


def test_jwks_dripping_its_status_line_is_abandoned_at_the_deadline(
    raw_jwks, make_client, key_a, monkeypatch
):
    """The deadline covers the wait for headers too, not only the body."""
    monkeypatch.setattr(auth, "JWKS_DEADLINE_SECONDS", 1.0)
    raw_jwks(drip(jwks_answer([key_a.public_jwk()]), 0.2))
    response, elapsed = timed_get(make_client(), sign(key_a))
    assert response.status_code == 503, response.text
    assert 1.0 <= elapsed < 3.0, f"the fetch took {elapsed:.1f} s"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_jwks_over_64_kib_is_refused(raw_jwks, make_client, key_a, chunked, caplog):
    raw_jwks(
        lambda send, stop: send(
            jwks_answer([key_a.public_jwk()], chunked=chunked, pad=64 * 1024)
        )
    )
    response = make_client().get("/extraction-jobs", headers=bearer(sign(key_a)))
    assert response.status_code == 503, response.text
    assert "more than 65536" in caplog.text


def test_jwks_just_under_64_kib_is_accepted(raw_jwks, make_client, key_a):
    keys = [key_a.public_jwk()]
    size = len(jwks_answer(keys).split(b"\r\n\r\n", 1)[1])
    raw_jwks(lambda send, stop: send(jwks_answer(keys, pad=64 * 1024 - size)))
    response = make_client().get("/extraction-jobs", headers=bearer(sign(key_a)))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\xb2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n" + b"[" * 20000,
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\xff\xfe{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}",
        b"HTTP/1.1 301 Moved\r\nLocation: http://127.0.0.1:9/\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
    ids=["unicode-length", "deep-json", "not-utf8", "short-body", "redirect", "junk"],
)
def test_broken_jwks_answers_are_503_not_500(raw_jwks, make_client, key_a, answer):
    raw_jwks(lambda send, stop: send(answer))
    response = make_client().get("/extraction-jobs", headers=bearer(sign(key_a)))
    assert response.status_code == 503, response.text


def test_stale_keys_are_used_for_at_most_24_hours_then_503(client, key_a, jwks, clock):
    token = sign(key_a)
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    jwks.up = False
    clock.now += 24 * 3600 - 1
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    clock.now += 1
    response = client.get("/extraction-jobs", headers=bearer(token))
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    clock.now += 720 * 3600  # the review's case: still verifying 720 h later
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 503

    jwks.up = True
    clock.now += auth.FAILED_FETCH_BACKOFF_SECONDS
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200


def test_a_successful_refresh_restarts_the_24_hours(client, key_a, jwks, clock):
    token = sign(key_a)
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    clock.now += 20 * 3600
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    jwks.up = False
    clock.now += 23 * 3600
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 200
    clock.now += 3600
    assert client.get("/extraction-jobs", headers=bearer(token)).status_code == 503
