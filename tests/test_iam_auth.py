"""IAM database authentication: with `DB_IAM_AUTH=1` and a URL without a
password, every new connection gets a fresh token from botocore's RDS signer
(the real one, with test credentials) for its host, port, user and region,
passed as the password and never logged.

The local PostgreSQL trusts loopback, so the connection succeeds whatever the
password; what the hook handed to the driver is captured on the way.
"""

import logging
import subprocess
import sys
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import ROOT, postgres_url
from sqlalchemy import event, make_url, text

import database

REGION = "eu-central-1"
ACCESS_KEY = "AKIATESTONLY0000FAKE"


@pytest.fixture
def iam_url(monkeypatch: pytest.MonkeyPatch) -> str:
    url = make_url(postgres_url()).set(password=None)
    monkeypatch.setenv("DB_IAM_AUTH", "1")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-only-secret-key")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    database.reset_engines()
    yield url.render_as_string(hide_password=False)
    database.reset_engines()


def passwords_given(engine) -> list[str]:
    """The password of every connection the engine opens from now on."""
    seen: list[str] = []

    @event.listens_for(engine, "do_connect")
    def _capture(_dialect, _record, _cargs, cparams):
        seen.append(cparams["password"])

    return seen


def test_each_new_connection_gets_a_fresh_token_as_its_password(iam_url, caplog):
    caplog.set_level(logging.DEBUG)
    url = make_url(iam_url)
    engine = database.get_engine(iam_url)
    seen = passwords_given(engine)  # runs after the hook: sees what it set
    started = datetime.now(UTC).replace(microsecond=0)

    with engine.connect() as first, engine.connect() as second:
        assert first.execute(text("SELECT current_user")).scalar() == url.username
        second.execute(text("SELECT 1"))
    engine.dispose()
    with engine.connect() as third:
        third.execute(text("SELECT 1"))

    assert len(seen) == 3, "one token per new connection"
    for token in seen:
        parts = urlsplit(f"//{token}")
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        assert (parts.hostname, parts.port) == (url.host, url.port or 5432)
        assert query["Action"] == "connect"
        assert query["DBUser"] == url.username
        assert query["X-Amz-Credential"].split("/") == [
            ACCESS_KEY,
            started.strftime("%Y%m%d"),
            REGION,
            "rds-db",
            "aws4_request",
        ]
        signed_at = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
        assert signed_at.replace(tzinfo=UTC) >= started, "signed at connect time"
        assert query["X-Amz-Expires"] == "900"
        signature = query["X-Amz-Signature"]
        assert len(signature) == 64
        assert signature not in caplog.text, "the token must never be logged"
    assert caplog.records, "DEBUG logging was on, so silence proves nothing"


def test_without_iam_auth_the_url_password_is_used_and_botocore_never_loads(
    tmp_path,
):
    """The SQLite / password path (local development, auth off) is unchanged:
    no botocore import, no AWS needed."""
    code = f"""
import os, sys
os.environ.pop("DB_IAM_AUTH", None)
os.environ["AUTH_DISABLED"] = "1"
os.environ["DATABASE_URL"] = "sqlite:///{tmp_path / "jobs.db"}"
sys.path.insert(0, {str(ROOT)!r})
from fastapi.testclient import TestClient
import lambda_handler, database
from main import create_app
assert TestClient(create_app()).get("/health").status_code == 200
engine = database.get_engine("postgresql+psycopg2://app:secret@127.0.0.1:1/db")
assert not engine.dialect.dispatch.do_connect  # no token hook
print(sorted(m for m in sys.modules if m.split(".")[0] in ("botocore", "boto3")))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    # Powertools (observability.py) imports the bare `botocore` package, when
    # present, to register its user-agent hook (one module, ~0.4 ms); no
    # session, credentials or signer module may follow it.
    assert result.stdout.strip() in ("[]", "['botocore']")
