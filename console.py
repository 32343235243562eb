"""The operator console: `GET /console`, its static files and its runtime
config, public like /docs (the console's API calls carry the user's token).

The page, its script and its style live in the `console/` folder (plain files,
no build step). Every answer here carries one strict Content-Security-Policy:
scripts and styles from this origin only, nothing inline, no string-to-HTML
sinks (Trusted Types), API calls to this origin only and, when the console
signs in with Auth0, to the tenant's token endpoint. URLs in the page are
relative, so the console works under a stage prefix as at the root.
"""

import hashlib
import re
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from auth import ADMIN_SCOPE, READ_SCOPE
from models import (
    FINISHED,
    MAX_DOCUMENT_ID_LENGTH,
    MAX_REASON_LENGTH,
    MAX_WORKER_ID_LENGTH,
    JobStatus,
)
from repository import BULK_BATCH, MATCH_COUNT_CAP
from service import RETRYABLE
from settings import ConfigError, Settings

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
ASSETS_DIR = CONSOLE_DIR / "assets"
MEDIA_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# What the CSP may name as the tenant: a host, maybe with a port, nothing
# that could end the source and start another directive.
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")


def content_security_policy(token_endpoint_origin: str | None) -> str:
    connect = "'self'" + (f" {token_endpoint_origin}" if token_endpoint_origin else "")
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self'",
            f"connect-src {connect}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
            "trusted-types 'none'",
        )
    )


def browser_config(settings: Settings) -> dict:
    """What the page needs to know at run time, public values only: how to
    sign in, and the API's own statuses, rules and limits (said once, there)."""
    auth_enabled = not settings.auth_disabled
    return {
        "statuses": [status.value for status in JobStatus],
        # Which statuses each action applies to (service.py's rules).
        "actions": {
            "cancel": [status.value for status in JobStatus if status not in FINISHED],
            "retry": [status.value for status in JobStatus if status in RETRYABLE],
        },
        "limits": {
            "document_id": MAX_DOCUMENT_ID_LENGTH,
            "worker_id": MAX_WORKER_ID_LENGTH,
            "reason": MAX_REASON_LENGTH,
            "bulk_batch": BULK_BATCH,
            "bulk_count_cap": MATCH_COUNT_CAP,
        },
        "auth_enabled": auth_enabled,
        # Off (AUTH_REQUIRE_SCOPES=0): every valid token may do everything.
        "permissions_checked": auth_enabled and settings.auth_require_scopes,
        "read_permission": READ_SCOPE,
        "admin_permission": ADMIN_SCOPE,
        "auth0": {
            "domain": settings.auth0_domain,
            "audience": settings.auth0_audience,
            "client_id": settings.auth0_console_client_id,
        }
        if auth_enabled
        else None,
    }


def _tenant_origin(settings: Settings) -> str | None:
    """https://$AUTH0_DOMAIN when the console signs in with Auth0, else None."""
    if settings.auth_disabled or not settings.auth0_console_client_id:
        return None
    domain = settings.auth0_domain or ""
    if not _HOST.match(domain):
        raise ConfigError(
            f"AUTH0_DOMAIN (got {domain!r}) must be a bare host name for the "
            "console's sign-in (AUTH0_CONSOLE_CLIENT_ID is set), like "
            "your-tenant.eu.auth0.com"
        )
    return f"https://{domain}"


def install_console(app: FastAPI, settings: Settings) -> None:
    """GET /console, /console/config.json and /console/assets/{name}."""
    headers = {
        "Content-Security-Policy": content_security_policy(_tenant_origin(settings)),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",  # frame-ancestors, for browsers before CSP 2
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
    }
    config = browser_config(settings)

    def static(path: Path, media_type: str, request: Request) -> Response:
        """A file with a content-hash ETag; revalidated on every use, so a
        deploy is seen at once (the package's files all have one mtime)."""
        body = path.read_bytes()
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        cached = {**headers, "ETag": etag, "Cache-Control": "no-cache"}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=cached)
        return Response(body, media_type=media_type, headers=cached)

    def page(request: Request) -> Response:
        return static(CONSOLE_DIR / "index.html", "text/html; charset=utf-8", request)

    def asset(name: str, request: Request) -> Response:
        path = ASSETS_DIR / name
        media_type = MEDIA_TYPES.get(path.suffix)
        # `name` is one path segment; only files of the folder are served.
        if media_type is None or path.parent != ASSETS_DIR or not path.is_file():
            return JSONResponse(
                {"detail": "Not Found"}, status_code=404, headers=headers
            )
        return static(path, media_type, request)

    def runtime_config() -> JSONResponse:
        return JSONResponse(config, headers={**headers, "Cache-Control": "no-store"})

    for path, endpoint in (
        ("/console", page),
        ("/console/config.json", runtime_config),
        ("/console/assets/{name}", asset),
    ):
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)
