"""Invoke lambda_handler.handler locally with an API Gateway HTTP API 2.0 event.

Examples (SQLite at DB_PATH, auth off for a local try):
    AUTH_DISABLED=1 .venv/bin/python scripts/invoke_local.py GET /health
    AUTH_DISABLED=1 .venv/bin/python scripts/invoke_local.py POST /extraction-jobs \\
        --body '{"document_id": "invoice-42.pdf", "priority": 5}'
    AUTH_DISABLED=1 .venv/bin/python scripts/invoke_local.py GET /extraction-jobs \\
        --query 'status=pending&limit=10'
With auth on, pass the token: --header "Authorization=Bearer $TOKEN".
Prints the Lambda response (statusCode, headers, body) as JSON.
"""

import argparse
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
        "--show-event", action="store_true", help="print the event first"
    )
    return parser.parse_args()


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
        print(json.dumps(event, indent=2))
    from lambda_handler import handler  # imported as Lambda does, after the env

    print(json.dumps(handler(event, LambdaContext()), indent=2))


if __name__ == "__main__":
    main()
