"""Create the tables in whatever DATABASE_URL (or DB_PATH) points at.

The app also creates them lazily on first use; this is for operators who
want the schema in place before the first request, e.g. after a deploy.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from database import create_tables, database_url_from_env


def main() -> None:
    url = database_url_from_env()
    create_tables(url)
    host = url.rpartition("@")[2]  # never print credentials
    print(f"extraction_job table ready at {host}")


if __name__ == "__main__":
    main()
