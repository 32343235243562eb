"""`DB_SSL_ROOT_CERT`: every connection is `sslmode=verify-full` against that
CA bundle, whatever the URL's `sslmode` says (Terraform's is `require`,
which encrypts but would talk to any server).

A TLS terminator on loopback stands in for the server (it answers the
SSLRequest as PostgreSQL does, then relays to the real, plain-text one),
with certificates made here: the app gets through with the bundle that
signed the server's certificate for the host it dials, and is refused, with
503, by a certificate from another CA or for another host.
"""

import logging
from pathlib import Path

import pytest
from conftest import empty_postgres, postgres_url
from fastapi.testclient import TestClient
from faults import TlsTerminator, certificate_authority, server_certificate
from sqlalchemy import make_url

import database
from main import create_app


@pytest.fixture
def authorities(tmp_path: Path) -> dict:
    return {name: certificate_authority(tmp_path, name) for name in ("rds", "other")}


def app_through(
    terminator: TlsTerminator, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    url = make_url(postgres_url()).set(
        port=terminator.port, query={"sslmode": "require"}
    )
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(False))
    monkeypatch.setenv("DB_SSL_ROOT_CERT", str(bundle))
    database.reset_engines()
    return TestClient(create_app())


@pytest.mark.parametrize(
    ("signed_by", "host", "refusal"),
    [
        ("rds", "127.0.0.1", None),
        ("other", "127.0.0.1", "certificate verify failed"),
        ("rds", "db.example.internal", "does not match host name"),
    ],
)
def test_the_server_is_checked_against_the_bundle_and_the_host(
    authorities, tmp_path, monkeypatch, caplog, signed_by, host, refusal
):
    empty_postgres(postgres_url())
    certificate, key = server_certificate(tmp_path, authorities[signed_by], host)
    terminator = TlsTerminator(certificate, key)
    caplog.set_level(logging.ERROR, logger="database")
    try:
        client = app_through(terminator, authorities["rds"][0], monkeypatch)
        response = client.get("/health", params={"deep": "1"})
    finally:
        terminator.close()
        database.reset_engines()
    if refusal is None:
        assert response.json() == {"status": "ok", "database": "ok"}
        assert terminator.handshakes >= 1, "the connection went over TLS"
    else:
        assert response.status_code == 503
        assert refusal in caplog.text


def test_a_bundle_that_is_not_there_stops_the_start(monkeypatch):
    monkeypatch.setenv("DB_SSL_ROOT_CERT", "no-such-bundle.pem")
    with pytest.raises(Exception, match="DB_SSL_ROOT_CERT .*no such file"):
        create_app()
