"""Invoke lambda_handler.handler locally with an API Gateway HTTP API 2.0 event.

Prints the response: the status line, the headers and the JSON body decoded
and indented; with --json, one JSON object {"statusCode", "headers", "body"}
(the body decoded) to chain into jq. Only the response goes to stdout: the
service's log lines (and EMF metrics, if on) go to stderr.

Examples (auth off and a fresh SQLite file, for a local try):
    export AUTH_DISABLED=1 DB_PATH="$(mktemp -d)/lambda-try.db"
    .venv/bin/python scripts/invoke_local.py GET /health
    JOB_ID=$(.venv/bin/python scripts/invoke_local.py POST /extraction-jobs \\
        --body '{"document_id": "invoice-42.pdf", "priority": 5}' --json | jq -r .body.id)
    .venv/bin/python scripts/invoke_local.py GET /extraction-jobs --query 'status=pending&limit=10'
With auth on, pass the token: --header "Authorization=Bearer $TOKEN".
"""

import argparse
import base64
import contextlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from lambda_events import LambdaContext, http_api_event


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("method", help="GET, POST, PATCH, ...")
    parser.add_argument("path", help="e.g. /extraction-jobs")
    parser.add_argument("--query", default="", help="raw query string, no '?'")
    parser.add_argument("--body", help="JSON request body")
    parser.add_argument(
        "--base64", action="store_true", help="send the body base64-encoded"
    )
    parser.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--stage", default="$default", help="named stage (set API_GATEWAY_BASE_PATH)"
    )
    parser.add_argument(
        "--show-event", action="store_true", help="print the event to stderr first"
    )
    parser.add_argument(
        "--json", action="store_true", help="the response as one JSON object"
    )
    return parser.parse_args()


def decoded_body(response: dict):
    """The body as the client gets it: JSON decoded, else text."""
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode("utf-8", "replace")
    try:
        return json.loads(body) if body else None
    except json.JSONDecodeError:
        return body


def show(response: dict, as_json: bool) -> str:
    headers = response.get("headers") or {}
    body = decoded_body(response)
    if as_json:
        status = response["statusCode"]
        return json.dumps({"statusCode": status, "headers": headers, "body": body})
    lines = [f"HTTP {response['statusCode']}"]
    lines += [f"{name}: {value}" for name, value in sorted(headers.items())]
    lines += ["", body if isinstance(body, str) else json.dumps(body, indent=2)]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    headers = dict(header.split("=", 1) for header in args.header)
    event = http_api_event(
        args.method.upper(),
        args.path,
        query=args.query,
        json_body=json.loads(args.body) if args.body is not None else None,
        base64_body=args.base64,
        headers=headers,
        stage=args.stage,
    )
    if args.show_event:
        print(json.dumps(event, indent=2), file=sys.stderr)
    # stdout is the response's alone: whatever the app prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        from lambda_handler import handler  # imported as Lambda does, after the env

        response = handler(event, LambdaContext())
    print(show(response, args.json))


if __name__ == "__main__":
    main()
