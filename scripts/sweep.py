"""Run the sweep once against DATABASE_URL (or the default SQLite file):
expired leases are released or failed, and with RETENTION_DAYS set, finished
jobs past retention are deleted; then the queue gauges are logged (`job gauges`).
In AWS the EventBridge schedule does this.

Usage: make sweep   (or: python scripts/sweep.py)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from main import create_app, run_sweep


def main() -> None:
    print(json.dumps(run_sweep(create_app())))


if __name__ == "__main__":
    main()
