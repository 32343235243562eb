"""`make run`: uvicorn serving main:app, reloading on a change, every line JSON.

    .venv/bin/python scripts/serve.py [--port 8000] [--host 127.0.0.1] [--no-reload]

First two log lines name the database in use (without its password) and
whether auth is on. uvicorn gets the service's log configuration
(observability.UVICORN_LOG_CONFIG), so its reloader process, which never
imports the app, writes JSON lines too. The reloader is watchfiles (inotify,
no polling); it restarts the server when a .py file the server runs changes:
the top-level modules and migrations/, not .venv, tests/, scripts/ or any
other folder there when it starts.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import observability  # the JSON logging, before uvicorn logs anything
import settings

SERVED_FOLDERS = {"migrations"}  # with the top-level modules: what the server runs


def not_served() -> list[str]:
    """The folders beside the modules whose .py files the server never runs."""
    return [
        str(path)
        for path in sorted(ROOT.iterdir())
        if path.is_dir() and path.name not in SERVED_FOLDERS
    ]


def announce(config: settings.Settings) -> None:
    """The banner, as log lines: the database really in use, and auth."""
    log = observability.logger
    log.info(f"Local development: {config.describe_database()}")
    if config.auth_disabled:
        log.warning(
            "AUTH IS DISABLED (AUTH_DISABLED=1). Never run like this in production."
        )
    else:
        log.info(f"auth on: Auth0 tenant {config.auth0_domain}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-reload", dest="reload", action="store_false")
    args = parser.parse_args()
    try:
        config = settings.load_settings()
    except settings.ConfigError as error:
        settings.exit_on_config_error(error)
    announce(config)

    import uvicorn

    reload = {"reload_dirs": [str(ROOT)], "reload_excludes": not_served()}
    uvicorn.run(
        "main:app",
        host=args.host,
        port=args.port,
        log_config=observability.UVICORN_LOG_CONFIG,
        app_dir=str(ROOT),
        **({"reload": True, **reload} if args.reload else {}),
    )


if __name__ == "__main__":
    main()
