"""Under a real `uvicorn main:app`, stderr is JSON only: one line per request
(issue 13: "one JSON line per request ... under uvicorn the same formatter"),
uvicorn's own lines in the same format, no plain-text access line."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_uvicorn_writes_only_json_lines_one_per_request(tmp_path):
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AUTH0_", "DATABASE_URL", "LOG_LEVEL", "METRICS_"))
    }
    env.update(AUTH_DISABLED="1", DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1"]
        + ["--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        httpx.post(f"{base}/extraction-jobs", json={"document_id": "doc.pdf"})
        httpx.get(f"{base}/no-such-route")
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)

    lines = [line for line in stderr.splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n{stderr}") from None
    requests = [record for record in records if record["message"] == "request"]
    # The polled /health answers, the create, the unmatched route.
    assert [r["status"] for r in requests][-2:] == [201, 404], stderr
    assert all(r["route"] != "/health" or r["status"] == 200 for r in requests)
    assert any("Started server process" in record["message"] for record in records)
    assert not any("color_message" in record for record in records)
