"""A real HTTP JWKS endpoint on 127.0.0.1 for the auth tests, plus RSA test keys.

The server runs in a thread; tests change its keys, its Cache-Control header and
whether it is up, and read how many requests it has served.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

JWKS_PATH = "/.well-known/jwks.json"


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class RsaTestKey:
    """An RSA key pair with a kid, as PEM for signing and as a public JWK."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self._private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.public_pem = (
            self._private.public_key()
            .public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            .decode()
        )

    def public_jwk(self) -> dict[str, str]:
        numbers = self._private.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }


class JwksServer:
    """Serves {"keys": [...]} at JWKS_PATH; answers 503 while `up` is False.

    `delay_seconds` slows every answer, to widen race windows in concurrency tests.
    """

    def __init__(self) -> None:
        self.keys: object = []  # usually a list of JWKs; anything JSON for bad cases
        self.cache_control: str | None = None
        self.up = True
        self.delay_seconds = 0.0
        self.request_count = 0
        self._count_lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{JWKS_PATH}"

    def start(self) -> JwksServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._count_lock:
                    server.request_count += 1
                time.sleep(server.delay_seconds)
                if not server.up:
                    self._send(503, b'{"error": "down"}')
                elif self.path != JWKS_PATH:
                    self._send(404, b'{"error": "not found"}')
                else:
                    self._send(200, json.dumps({"keys": server.keys}).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if server.cache_control is not None:
                    self.send_header("Cache-Control", server.cache_control)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                """Keep test output quiet."""

        return Handler


def use_jwks(monkeypatch, server: JwksServer, *, issuer: str, audience: str) -> None:
    """Turn auth on in the environment, validating tokens from `issuer` for
    `audience` with the keys `server` serves (the app reads it at creation)."""
    monkeypatch.delenv("AUTH_DISABLED", raising=False)
    monkeypatch.delenv("AUTH_REQUIRE_SCOPES", raising=False)
    monkeypatch.setenv("AUTH0_DOMAIN", urlsplit(issuer).hostname)
    monkeypatch.setenv("AUTH0_AUDIENCE", audience)
    monkeypatch.setenv("AUTH0_ISSUER", issuer)
    monkeypatch.setenv("AUTH0_JWKS_URL", server.url)
