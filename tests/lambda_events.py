"""API Gateway HTTP API (payload format 2.0) events, shaped like the AWS sample.

Shared by the handler tests, the packaging test and scripts/invoke_local.py.
The ids and addresses are the documentation placeholders AWS uses.
"""

import base64
import json
import uuid
from typing import Any
from urllib.parse import parse_qsl

API_ID = "api-id"
DOMAIN = f"{API_ID}.execute-api.us-east-1.amazonaws.com"


def http_api_event(
    method: str,
    path: str,
    *,
    query: str = "",
    json_body: Any = None,
    base64_body: bool = False,
    headers: dict[str, str] | None = None,
    stage: str = "$default",
    request_id: str | None = None,
) -> dict[str, Any]:
    """An event as API Gateway sends it for `method path?query`.

    On a named stage the stage is the first path segment, as in the real URL
    https://{api-id}.execute-api.{region}.amazonaws.com/{stage}/{path}.
    """
    raw_path = path if stage == "$default" else f"/{stage}{path}"
    all_headers = {
        "accept": "application/json",
        "host": DOMAIN,
        "user-agent": "lambda-events/1.0",
        "x-amzn-trace-id": "Root=1-5e6722a7-cc56xmpl46db7ae02d4da47e",
        "x-forwarded-for": "192.0.2.1",
        "x-forwarded-port": "443",
        "x-forwarded-proto": "https",
    }
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": query,
        "headers": all_headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": API_ID,
            "domainName": DOMAIN,
            "domainPrefix": API_ID,
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": "192.0.2.1",
                "userAgent": all_headers["user-agent"],
            },
            "requestId": request_id or f"{uuid.uuid4().hex[:14]}=",
            "routeKey": "$default",
            "stage": stage,
            "time": "12/Mar/2020:19:03:58 +0000",
            "timeEpoch": 1583348638390,
        },
        "isBase64Encoded": False,
    }
    if query:
        event["queryStringParameters"] = _joined_parameters(query)
    if json_body is not None:
        body = json.dumps(json_body).encode()
        all_headers["content-type"] = "application/json"
        all_headers["content-length"] = str(len(body))
        event["isBase64Encoded"] = base64_body
        event["body"] = (
            base64.b64encode(body).decode() if base64_body else body.decode()
        )
    all_headers.update({name.lower(): value for name, value in (headers or {}).items()})
    return event


def _joined_parameters(query: str) -> dict[str, str]:
    """API Gateway joins repeated query parameters with commas."""
    parameters: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        parameters[name] = (
            f"{parameters[name]},{value}" if name in parameters else value
        )
    return parameters


class LambdaContext:
    """The attributes of the context object the Python runtime passes."""

    function_name = "extraction-jobs"
    function_version = "$LATEST"
    invoked_function_arn = (
        "arn:aws:lambda:us-east-1:123456789012:function:extraction-jobs"
    )
    memory_limit_in_mb = 512
    log_group_name = "/aws/lambda/extraction-jobs"
    log_stream_name = "2020/03/12/[$LATEST]abcdef0123456789"

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def response_json(response: dict[str, Any]) -> Any:
    """The decoded JSON body of a handler response."""
    body = response["body"]
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    return json.loads(body)
