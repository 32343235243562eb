"""`make docs-check`: /docs and /redoc in real headless Chromium, with no network but loopback.

Serves the app with uvicorn on 127.0.0.1 and loads both pages in Debian's
`chromium` (apt-get install chromium). As root with `unshare`, both run in a
network namespace of their own that holds only the loopback interface, so a
page that needed a CDN would stay blank; otherwise Chromium is told that no
other host exists. Passes when Swagger UI lists every operation, shows the
Authorize button and, for GET /extraction-jobs/{job_id} opened, the job
example and the ETag header; and ReDoc renders every operation's summary.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from browser import CHROMIUM_ARGS, free_port

IN_NAMESPACE = "DOCS_CHECK_NETNS"
GET_JOB = "extraction%20jobs/get_job_extraction_jobs__job_id__get"
# Debian's Chromium as the console's browser tests run it (tests/browser.py),
# loading one page and printing its DOM.
CHROMIUM_FLAGS = [*CHROMIUM_ARGS, "--virtual-time-budget=20000", "--dump-dom"]


def reexec_in_namespace() -> None:
    """Run this script again in a network namespace with only loopback, if we can."""
    unshare = shutil.which("unshare")
    if os.environ.get(IN_NAMESPACE) or unshare is None or os.geteuid() != 0:
        return
    script = f'ip link set lo up && exec "{sys.executable}" "{__file__}"'
    env = {**os.environ, IN_NAMESPACE: "1"}
    probe = subprocess.run([unshare, "-n", "true"], check=False, capture_output=True)
    if probe.returncode == 0:
        os.execve(unshare, [unshare, "-n", "sh", "-c", script], env)


def dom(chromium: str, url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
    return result.stdout


def operations() -> list[tuple[str, str, str]]:
    """(method, path, summary) of every documented operation, from the app."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("AUTH_DISABLED", "1")
    from main import app

    return [
        (method.upper(), path, operation.get("summary", ""))
        for path, item in app.openapi()["paths"].items()
        for method, operation in item.items()
    ]


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("docs-check: chromium is not installed: apt-get install chromium")
        return 2
    reexec_in_namespace()
    isolation = (
        "network namespace with only loopback"
        if os.environ.get(IN_NAMESPACE)
        else "host resolver rules (no namespace: not root or no unshare)"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "AUTH_DISABLED": "1", "DB_PATH": f"{data}/docs.db"}
        env.pop("DATABASE_URL", None)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
        )
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            swagger = dom(chromium, f"{base}/docs")
            redoc = dom(chromium, f"{base}/redoc")
            # Swagger UI's deep link opens one operation: its example and headers.
            get_job = dom(chromium, f"{base}/docs#/{GET_JOB}")
        finally:
            server.terminate()
            server.wait(timeout=10)

    expected = operations()
    listed = re.findall(
        r'class="opblock-summary-path"[^>]*data-path="([^"]+)"', swagger
    )
    authorize = re.search(r'<button[^>]*class="btn authorize', swagger) is not None
    swagger_missing = [f"{m} {p}" for m, p, _ in expected if p not in listed]
    redoc_missing = [s for _, _, s in expected if s not in redoc]
    print(f"docs-check: {chromium} ({isolation})")
    print(
        f"docs-check: /docs lists {len(listed)} of {len(expected)} operations; "
        f"Authorize button {'present' if authorize else 'MISSING'}"
    )
    print(
        f"docs-check: /redoc shows {len(expected) - len(redoc_missing)} of "
        f"{len(expected)} operation summaries"
    )
    example = "invoice-2026-0042.pdf" in get_job and "additionalProp" not in get_job
    etag = ">ETag<" in get_job
    print(
        f"docs-check: GET /extraction-jobs/{{job_id}} opened: job example "
        f"{'shown' if example else 'MISSING'}, ETag header {'shown' if etag else 'MISSING'}"
    )
    ok = (
        example
        and etag
        and (
            len(listed) == len(expected)
            and not swagger_missing
            and authorize
            and not redoc_missing
        )
    )
    if not ok:
        print(
            f"docs-check: FAILED; missing in /docs: {swagger_missing}, "
            f"in /redoc: {redoc_missing}"
        )
        return 1
    print("docs-check: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
