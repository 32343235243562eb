"""An Auth0 tenant's two endpoints of the Authorization Code flow with PKCE,
served over HTTPS on 127.0.0.1, for the console's sign-in test.

GET /authorize remembers the request and redirects straight back with a
code (the user "signs in" at once); POST /oauth/token trades that code for an
access token signed by a JwksServer key, only for the matching
code_verifier, client_id and redirect_uri, and refuses any client_secret (a
public client has none). It answers the browser's cross-origin fetch as
Auth0 does for an allowed web origin. Every request is kept for the test.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
import ssl
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "tenant.crt", folder / "tenant.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class Auth0Tenant:
    """The tenant at https://localhost:{port}; `issue(audience)` makes the
    access token a successful exchange returns. `allowed_origin` (the app's,
    set once it runs) is where it redirects back to and whose fetches it
    answers."""

    def __init__(self, *, client_id: str, issue: Callable[[str], str]) -> None:
        self.client_id = client_id
        self.allowed_origin = ""
        self.issue = issue
        self.authorize_requests: list[dict[str, str]] = []
        self.token_requests: list[dict[str, str]] = []
        self.tokens: list[str] = []
        self._codes: dict[str, dict[str, str]] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        with tempfile.TemporaryDirectory() as folder:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*_self_signed(Path(folder)))
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def domain(self) -> str:
        """What AUTH0_DOMAIN names: the console goes to https://{domain}/..."""
        return f"localhost:{self._httpd.server_address[1]}"

    def start(self) -> Auth0Tenant:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _authorize(self, query: dict[str, str]) -> tuple[int, dict, bytes]:
        self.authorize_requests.append(query)
        ok = (
            query.get("response_type") == "code"
            and query.get("client_id") == self.client_id
            and query.get("code_challenge_method") == "S256"
            and query.get("code_challenge")
            and query.get("redirect_uri", "").startswith(self.allowed_origin + "/")
        )
        if not ok:
            return 400, {}, b"invalid authorization request"
        code = secrets.token_urlsafe(16)
        self._codes[code] = query
        back = urlencode({"code": code, "state": query.get("state", "")})
        return 302, {"Location": f"{query['redirect_uri']}?{back}"}, b""

    def _token(self, form: dict[str, str]) -> tuple[int, dict]:
        self.token_requests.append(form)
        asked = self._codes.pop(form.get("code", ""), None)
        if "client_secret" in form:
            return 401, {"error": "access_denied", "error_description": "no secret"}
        if (
            asked is None
            or form.get("grant_type") != "authorization_code"
            or form.get("client_id") != asked["client_id"]
            or form.get("redirect_uri") != asked["redirect_uri"]
            or _s256(form.get("code_verifier", "")) != asked["code_challenge"]
        ):
            return 403, {"error": "invalid_grant", "error_description": "bad grant"}
        token = self.issue(asked["audience"])
        self.tokens.append(token)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 600}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        tenant = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path != "/authorize":
                    return self._send(404, {}, b"not found")
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                self._send(*tenant._authorize(query))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                if urlsplit(self.path).path != "/oauth/token":
                    return self._send(404, {}, b"not found")
                form = {k: v[0] for k, v in parse_qs(body).items()}
                status, answer = tenant._token(form)
                headers = {
                    "Content-Type": "application/json",
                    "Access-Control-Allow-Origin": tenant.allowed_origin,
                }
                self._send(status, headers, json.dumps(answer).encode())

            def _send(self, status: int, headers: dict, body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                """Keep test output quiet."""

        return Handler
