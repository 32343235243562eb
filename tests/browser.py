"""A live app and Debian's Chromium driven by Playwright, for the console's
browser tests and scripts/console_screenshots.py.

Playwright's own browser download cannot work here, so Playwright drives
Debian's `chromium` (apt-get install chromium) through `executable_path`,
with a fresh profile, and a resolver that knows no host but loopback.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # No host resolves but loopback: a page that reached out would fail.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing: apt-get install -y chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: make install (requirements-dev.txt)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_app(env: dict[str, str], log: Path) -> Iterator[str]:
    """`uvicorn main:app` on a free loopback port with exactly the environment
    `env`; yields its base URL. Its output (the request log) goes to `log`."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1"]
    with log.open("w") as output:
        server = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"{base}/health", timeout=2)
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"uvicorn did not start:\n{log.read_text()}"
                        ) from None
                    time.sleep(0.1)
            yield base
        finally:
            server.terminate()
            server.wait(timeout=30)


@contextmanager
def chromium(profile: Path, **context_options) -> Iterator:
    """A fresh browser context of Debian's Chromium, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            **context_options,
        )
        try:
            yield context
        finally:
            context.close()


# --- Jobs through the API of a live app ---------------------------------------


def create(api: httpx.Client, document_id: str, **fields) -> dict:
    response = api.post("/extraction-jobs", json={"document_id": document_id, **fields})
    response.raise_for_status()
    return response.json()


def claim(api: httpx.Client, worker_id: str, **fields) -> list[dict]:
    body = {"worker_id": worker_id, "limit": 1, **fields}
    response = api.post("/extraction-jobs/claim", json=body)
    response.raise_for_status()
    return response.json()


def finish(api: httpx.Client, job: dict, status: str, **fields) -> dict:
    """The holder's PATCH: completed (with `result`), failed, pending..."""
    body = {"status": status, "worker_id": job["worker_id"], **fields}
    response = api.patch(f"/extraction-jobs/{job['id']}", json=body)
    response.raise_for_status()
    return response.json()
