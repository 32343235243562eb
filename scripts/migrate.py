"""`make migrate`: `alembic upgrade head` on DATABASE_URL (or the SQLite file
at DB_PATH), saying which database (never its password) and from which
revision to which, or that it is already at head.

An unreachable database is one line on stderr and exit code 1; a bad
variable, one line per problem and exit code 2.
"""

import sys
from pathlib import Path

from sqlalchemy.exc import DBAPIError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import database
import settings


def say(line: str) -> None:
    print(f"make migrate: {line}", flush=True)


def first_line(error: DBAPIError) -> str:
    return str(error.orig or error).strip().splitlines()[0]


def main() -> int:
    try:
        config = settings.settings_from_env()
    except settings.ConfigError as error:
        for problem in error.problems:
            print(f"make migrate: configuration error: {problem}", file=sys.stderr)
        return 2
    url, where = config.resolved_database_url, config.describe_database()
    engine = database.migration_engine(url)
    try:
        found = database.schema_revision(engine)
    except DBAPIError as error:
        print(
            f"make migrate: cannot reach {where}: {first_line(error)}", file=sys.stderr
        )
        return 1
    finally:
        engine.dispose()
    head = database.SCHEMA_HEAD
    if found == head:
        say(f"{where} is already at head ({head}); nothing to do")
        return 0
    if found is not None and found not in database.SCHEMA_REVISIONS:
        say(f"{where} is at {found}, newer than this code's {head}; nothing to do")
        return 0
    say(f"{where}: upgrading from {found or '<none> (never migrated)'} to {head}")
    database.upgrade_schema(url)
    say(f"{where} is now at {head}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
