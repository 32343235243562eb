"""The docs pages work offline, the OpenAPI document says what the API really
answers, and a body not sent as JSON is a plain 415."""

import json
import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from models import Job

BODY_ROUTES = [
    ("post", "/extraction-jobs", {"document_id": "invoice-0042.pdf"}),
    ("post", "/extraction-jobs/claim", {"worker_id": "ocr-worker-7"}),
    ("patch", "/extraction-jobs/{id}", {"status": "processing"}),
    ("post", "/extraction-jobs/{id}/heartbeat", {"worker_id": "ocr-worker-7"}),
]


class References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [
            value for name, value in attrs if name in ("src", "href") and value
        ]


def page_references(client: TestClient, page: str) -> list[str]:
    response = client.get(page)
    assert response.status_code == 200
    parser = References()
    parser.feed(response.text)
    # Script text names the OpenAPI document (and Swagger UI's redirect page).
    quoted = re.findall(r"""['"](/[\w./-]+)['"]""", response.text)
    return parser.urls + [url for url in quoted if not url.startswith("//")]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_what_the_app_serves(client, page):
    urls = page_references(client, page)
    assert any(url.endswith(".js") for url in urls), urls
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url} from another host"
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.content, url


def test_docs_assets_come_from_the_kept_package(client):
    script = client.get("/docs-assets/swagger-ui-bundle.js")
    assert script.headers["content-type"].startswith(
        ("text/javascript", "application/javascript")
    )
    assert b"SwaggerUIBundle" in script.content
    assert b"Redoc" in client.get("/docs-assets/redoc.standalone.js").content


@pytest.fixture
def openapi(client) -> dict:
    return client.get("/openapi.json").json()


def resolve(document: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_openapi_422_is_a_list_of_type_loc_msg_as_really_answered(client, openapi):
    body_schema = openapi["paths"]["/extraction-jobs"]["get"]["responses"]["422"]
    schema = resolve(openapi, body_schema["content"]["application/json"]["schema"])
    detail = schema["properties"]["detail"]
    listed = next(option for option in detail["anyOf"] if option.get("type") == "array")
    item = resolve(openapi, listed["items"])
    assert set(item["required"]) == {"type", "loc", "msg"}
    real = client.get("/extraction-jobs?limit=-1")
    assert real.status_code == 422
    assert set(real.json()["detail"][0]) == {"type", "loc", "msg"}


def test_openapi_declares_no_422_shape_the_api_never_sends(openapi):
    text = json.dumps(openapi)
    assert "HTTPValidationError" not in text
    job = openapi["paths"]["/extraction-jobs/{job_id}"]
    assert "422" not in job["get"]["responses"]  # nothing there can be invalid
    assert "422" in job["patch"]["responses"]


def headers_of(openapi: dict, path: str, method: str, status: str) -> set[str]:
    return set(openapi["paths"][path][method]["responses"][status].get("headers", {}))


def test_openapi_declares_the_response_headers(openapi):
    job = "/extraction-jobs/{job_id}"
    assert headers_of(openapi, "/extraction-jobs", "post", "201") == {
        "Location",
        "ETag",
        "Idempotent-Replayed",
    }
    assert "ETag" in headers_of(openapi, job, "get", "200")
    assert "ETag" in headers_of(openapi, job, "patch", "200")
    for path, method in [
        ("/extraction-jobs", "get"),
        (job, "patch"),
        ("/health", "get"),
    ]:
        assert "Retry-After" in headers_of(openapi, path, method, "503")
    for status in ("401", "403"):
        assert "WWW-Authenticate" in headers_of(openapi, job, "get", status)


def test_openapi_declares_415_on_every_route_with_a_body(openapi):
    for method, path, _ in BODY_ROUTES:
        path = path.replace("{id}", "{job_id}")
        assert "415" in openapi["paths"][path][method]["responses"], (method, path)


def test_openapi_job_example_is_a_realistic_job(openapi):
    [example] = openapi["components"]["schemas"]["Job"]["examples"]
    Job.model_validate(example)
    text = str(example)
    assert "string" not in text and "additionalProp" not in text


@pytest.mark.parametrize(("method", "path", "body"), BODY_ROUTES)
@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", None]
)
def test_body_not_sent_as_json_is_415_saying_so(
    client, method, path, body, content_type
):
    job = client.post("/extraction-jobs", json={"document_id": "doc.pdf"}).json()
    headers = {"content-type": content_type} if content_type else {}

    response = client.request(
        method,
        path.replace("{id}", job["id"]),
        content=json.dumps(body).encode(),
        headers=headers,
    )
    assert response.status_code == 415, response.text
    detail = response.json()["detail"]
    assert "must be JSON" in detail and "Content-Type: application/json" in detail
    assert client.get(f"/extraction-jobs/{job['id']}").json()["version"] == 1


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/merge-patch+json",
    ],
)
def test_json_media_types_with_parameters_are_accepted(client, content_type):
    response = client.post(
        "/extraction-jobs",
        content=b'{"document_id": "doc.pdf"}',
        headers={"content-type": content_type},
    )
    assert response.status_code == 201, response.text
