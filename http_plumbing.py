"""HTTP plumbing the routes share, none of it about jobs: OpenAPI's error
answers, the JSON body check, the If-Match grammar, the request body limit,
FastAPI's 422 without the input echoed, and the self-hosted docs pages."""

import importlib.util
import json
import re
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.openapi.models import Schema as OpenAPISchema
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic.json_schema import GenerateJsonSchema

from models import ErrorBody, ValidationErrorBody

MAX_BODY_BYTES = 1024 * 1024


def header(description: str) -> dict:
    return {"description": description, "schema": {"type": "string"}}


RETRY_AFTER = {"Retry-After": header("Seconds to wait before retrying.")}
WWW_AUTHENTICATE = {
    "WWW-Authenticate": header(
        'The RFC 6750 challenge, e.g. Bearer realm="extraction-jobs", '
        'error="invalid_token".'
    )
}
ETAG = {"ETag": header('The job\'s version in quotes, e.g. "3"; send it as If-Match.')}


# The error bodies are documented by reference, their schemas added to the
# document when it is first generated (`without_default_422`): declared as
# response models, FastAPI would build a validator for each of the ~30 uses
# at import, for a document that is built later, if ever (a cold start cost).
ERROR_MODELS = (ErrorBody, ValidationErrorBody)


def _ref(code: int) -> dict:
    model = ValidationErrorBody if code == 422 else ErrorBody
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def errors(*codes: int) -> dict[int | str, dict]:
    """The error answers of a route, as the API really sends them."""
    descriptions = {
        401: "Missing or invalid bearer token",
        403: "The token lacks the needed permission",
        404: "No job with this id",
        409: "The job's state refuses it: a move its status does not allow, a "
        "finished job, or a lease the caller does not hold",
        412: "If-Match does not match the job's current version (ETag)",
        413: "Request body larger than 1 MiB",
        415: "The body is not sent as Content-Type: application/json",
        422: "Invalid request: one entry per problem, the input not echoed",
        503: "Database or token signing keys unavailable; see Retry-After",
    }
    headers = {401: WWW_AUTHENTICATE, 403: WWW_AUTHENTICATE, 503: RETRY_AFTER}
    return {
        code: {
            "description": descriptions[code],
            **({"headers": headers[code]} if code in headers else {}),
            "content": {"application/json": {"schema": _ref(code)}},
        }
        for code in codes
    }


async def require_json(request: Request) -> None:
    """415 unless the body is declared JSON; FastAPI would otherwise treat it
    as text and answer a puzzling "Input should be a valid dictionary".
    Async: it only reads a header, so it costs no hop to the threadpool."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    got = f"got {content_type!r}" if content_type else "no Content-Type was sent"
    raise HTTPException(
        status_code=415,
        detail=f"The request body must be JSON, sent with "
        f"'Content-Type: application/json' ({got}).",
    )


JSON_BODY = [Depends(require_json)]


# RFC 9110 section 13.1.1: If-Match = "*" / #entity-tag, where
#   entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE
#   etagc      = "!" / %x23-7E / obs-text (%x80-FF)
# Header values arrive as bytes decoded as Latin-1, so a UTF-8 character
# such as "²" is two obs-text characters: well-formed, and never one of ours.
# etagc is written as its complement (not CTLs, SP, DQUOTE or DEL): the same
# set, but `[!\x23-\x7e\x80-\U0010ffff]` takes ~4 ms to compile at import.
_ENTITY_TAG = re.compile(r'(W/)?"([^\x00-\x20"\x7f]*)"')
_LIST_GAP = re.compile(r"[ \t,]*")  # OWS and empty list elements
_AFTER_TAG = re.compile(r"[ \t]*(?:,|\Z)")
# Our tags are the version in ASCII decimal, no leading zero; 19 digits
# bound the number (and int() never sees a Unicode digit or 5,000 digits).
_OUR_OPAQUE_TAG = re.compile(r"[1-9][0-9]{0,18}")
# The largest version a BIGINT holds: a larger tag is never ours (and the
# database driver could not even bind it: SQLite raised OverflowError, a 500).
_MAX_VERSION = 2**63 - 1
IF_MATCH_EXAMPLE = '"3"'


def _invalid_if_match(reason: str) -> RequestValidationError:
    return RequestValidationError(
        [
            {
                "type": "if_match_invalid",
                "loc": ("header", "If-Match"),
                "msg": (
                    f"{reason}: send * or the job's ETag in double quotes, "
                    f"e.g. If-Match: {IF_MATCH_EXAMPLE} (several tags "
                    'separated by commas: "2", "3")'
                ),
            }
        ]
    )


def parse_if_match(values: list[str]) -> frozenset[int] | None:
    """The versions the If-Match field lines accept; None means any (absent or `*`).

    Raises RequestValidationError (422) when the field is not `*` or a list of
    entity tags. A well-formed tag that is not one of ours matches nothing, so
    it ends in 412; so do weak tags (If-Match compares strongly). Several field
    lines are one comma-separated list (RFC 9110 section 5.3).
    """
    if not values:
        return None
    text = ", ".join(values)
    if text.strip(" \t") == "*":
        return None
    versions: set[int] = set()
    tags = 0
    position = _LIST_GAP.match(text).end()
    while position < len(text):
        tag = _ENTITY_TAG.match(text, position)
        after = tag and _AFTER_TAG.match(text, tag.end())
        if not after:
            raise _invalid_if_match(
                "If-Match must be * or a list of quoted entity tags"
            )
        tags += 1
        weak, opaque = tag.groups()
        if (
            not weak
            and _OUR_OPAQUE_TAG.fullmatch(opaque)
            and int(opaque) <= _MAX_VERSION
        ):
            versions.add(int(opaque))
        position = _LIST_GAP.match(text, after.end()).end()
    if not tags:
        raise _invalid_if_match("If-Match is empty")
    return frozenset(versions)


class BodySizeLimit:
    """Answer 413 to request bodies over `max_bytes`, declared or streamed.

    The body is buffered (at most `max_bytes`) before the app sees it, so an
    oversized upload is refused without reaching validation or the database.
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body: bytes | None = b"".join(chunks)

        async def replay() -> dict:
            # The buffered body once; then the real channel, which reports a
            # disconnect instead of an endless stream of empty bodies.
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body}, None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        detail = f"Request body must be at most {self.max_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def _printable(text: str) -> str:
    """Text that is always encodable, even from lone surrogates in the input."""
    return text.encode("utf-8", "backslashreplace").decode()


async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 shape, without echoing the input back.

    The echo could be up to a mebibyte, and values such as NaN or a lone
    surrogate cannot even be encoded in a JSON response.
    """
    detail = [
        {
            "type": item["type"],
            "loc": [
                _printable(part) if isinstance(part, str) else part
                for part in item["loc"]
            ],
            "msg": _printable(item["msg"]),
        }
        for item in error.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


# Swagger UI and ReDoc come from the fastapi-offline package, served by the
# app itself, so /docs works without reaching a CDN. A package built without
# them (scripts/build_lambda.py leaves them out when they cost too much)
# falls back to the CDN FastAPI uses by default.
DOCS_ASSETS_URL = "/docs-assets"
CDN_ASSETS = {
    "swagger-ui-bundle.js": "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js",
    "swagger-ui.css": "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css",
    "redoc.standalone.js": "https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js",
    "favicon.png": "https://fastapi.tiangolo.com/img/favicon.png",
}


def docs_assets_dir() -> Path | None:
    """The packaged Swagger UI / ReDoc files, or None when they are not installed.

    Located without importing the package (nothing to pay at cold start).
    """
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / name).is_file() for name in CDN_ASSETS) else None


def install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI with Authorize), /redoc, and their assets."""
    assets = docs_assets_dir()
    if assets is not None:
        from fastapi.staticfiles import StaticFiles

        app.mount(DOCS_ASSETS_URL, StaticFiles(directory=assets), name="docs-assets")

    def asset(request: Request, name: str) -> str:
        if assets is None:
            return CDN_ASSETS[name]
        return f"{request.scope.get('root_path', '')}{DOCS_ASSETS_URL}/{name}"

    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=asset(request, "swagger-ui-bundle.js"),
            swagger_css_url=asset(request, "swagger-ui.css"),
            swagger_favicon_url=asset(request, "favicon.png"),
        )

    def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=asset(request, "redoc.standalone.js"),
            redoc_favicon_url=asset(request, "favicon.png"),
            with_google_fonts=False,
        )

    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    for path, endpoint in (
        ("/docs", swagger_ui),
        ("/docs/oauth2-redirect", oauth2_redirect),
        ("/redoc", redoc),
    ):
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)


def without_default_422(app: FastAPI) -> None:
    """Drop the 422 FastAPI documents for every route with parameters: where a
    422 can happen it is declared (ValidationErrorBody); elsewhere it cannot."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for item in schema["paths"].values():
                for operation in item.values():
                    default = operation["responses"].get("422", {})
                    if "HTTPValidationError" in json.dumps(default):
                        del operation["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(name, None)
            # As FastAPI generates a response model's schema (same generator).
            _, definitions = GenerateJsonSchema(
                ref_template="#/components/schemas/{model}"
            ).generate_definitions(
                [
                    (model, "serialization", model.__pydantic_core_schema__)
                    for model in ERROR_MODELS
                ]
            )
            for name, definition in definitions.items():
                # ...and orders its keys as FastAPI does, through its Schema model.
                schema["components"]["schemas"][name] = jsonable_encoder(
                    OpenAPISchema(**definition), by_alias=True, exclude_none=True
                )
            schema["components"]["schemas"] = dict(
                sorted(schema["components"]["schemas"].items())
            )
        return app.openapi_schema

    app.openapi = openapi
