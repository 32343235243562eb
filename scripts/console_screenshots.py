"""Screenshots of the console for docs/console.md, from a live app.

    .venv/bin/python scripts/console_screenshots.py   (or make console-screenshots)

Serves the app on a scratch SQLite file with auth disabled (as `make run`),
seeds a day's worth of jobs through the API, one of them through a lease
that ran out (so its history shows the expiry; this takes 11 s), and saves
the list and that job's page at 1280x800, and the list at phone width, as
PNG under docs/images/. Needs Debian's chromium (apt-get install chromium).
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser import chromium, chromium_missing, claim, create, finish, live_app

IMAGES = ROOT / "docs" / "images"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SHORT_LEASE = 10  # the shortest the API grants


def seed(api: httpx.Client) -> str:
    """Jobs in every status; returns the id of the one with a rich history."""
    contract = create(
        api,
        "contracts/acme-msa-2026.pdf",
        priority=10,
        metadata={"source": "s3://intake/contracts/acme-msa-2026.pdf", "pages": 14},
    )
    claim(api, "ocr-worker-3", lease_seconds=SHORT_LEASE)
    time.sleep(SHORT_LEASE + 1)  # ocr-worker-3 "dies": its lease runs out
    (held,) = claim(api, "ocr-worker-1")
    finish(
        api,
        held,
        "completed",
        result={
            "parties": ["Acme Corp", "Globex Ltd"],
            "effective_date": "2026-01-01",
            "pages": 14,
            "confidence": 0.96,
        },
    )
    for number in range(1, 9):
        create(api, f"invoices/2026/INV-{number:04}.pdf", priority=5)
        (job,) = claim(api, f"ocr-worker-{number % 3 + 1}")
        finish(api, job, "completed", result={"total": 100 * number})
    for number in range(3):
        create(api, f"scans/batch-7/page-{number:03}.tiff", priority=4)
        (job,) = claim(api, "ocr-worker-2")
        finish(api, job, "failed", error_message="OCR engine timed out after 120 s")
    cancelled = create(api, "uploads/duplicate-of-INV-0003.pdf", priority=3)
    api.post(f"/extraction-jobs/{cancelled['id']}/cancel", json={"reason": "duplicate"})
    for number in range(3):
        create(api, f"receipts/2026-12/R-{number:05}.jpg", priority=2)
        claim(api, f"ocr-worker-{number + 1}")
    for number in range(6):
        create(api, f"receipts/2026-12/R-{number + 100:05}.jpg")
    return contract["id"]


def main() -> int:
    missing = chromium_missing()
    if missing:
        print(f"console-screenshots: {missing}")
        return 2
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        env = {
            **os.environ,
            "AUTH_DISABLED": "1",
            "DATABASE_URL": f"sqlite:///{folder / 'jobs.db'}",
        }
        with (
            live_app(env, folder / "uvicorn.log") as base,
            httpx.Client(base_url=base) as api,
        ):
            job_id = seed(api)
            with chromium(folder / "profile", viewport=DESKTOP) as context:
                page = context.new_page()
                page.goto(f"{base}/console")
                page.locator("#rows tr").nth(20).wait_for()
                page.screenshot(path=IMAGES / "console-list.png")
                page.goto(f"{base}/console#/jobs/{job_id}")
                page.locator(".event-completed").wait_for()
                page.screenshot(path=IMAGES / "console-job.png", full_page=True)
                page.set_viewport_size(PHONE)
                page.goto(f"{base}/console#/?status=failed")
                page.locator("#rows tr").nth(2).wait_for()
                page.screenshot(path=IMAGES / "console-phone.png")
    for name in ("console-list.png", "console-job.png", "console-phone.png"):
        print(f"console-screenshots: wrote docs/images/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
