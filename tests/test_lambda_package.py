"""lambda.zip, proven self-contained in an interpreter that sees nothing else.

The package is built once per session for the interpreter running the tests,
unzipped, and imported by `python -I -S -B` (no site-packages, no bytecode
writes, as on Lambda's read-only task root) whose only extra path is the
unzipped folder. Timings are printed; run with `-s` to see them.
"""

import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
from conftest import backend_url, require
from faults import certificate_authority
from lambda_events import http_api_event, response_json
from test_migration_function import deployment, secrets_endpoint  # noqa: F401

from db_models import SCHEMA_REVISIONS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import build_lambda

TARGET_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
LAMBDA_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}.get(platform.machine())
APP_MODULES = {path.name for path in ROOT.glob("*.py")} | {  # and Alembic's
    path.relative_to(ROOT).as_posix() for path in (ROOT / "migrations").rglob("*.py")
}
CONSOLE_FILES = {
    path.relative_to(ROOT).as_posix()
    for path in (ROOT / "console").rglob("*")
    if path.is_file()
}
NEVER_PACKAGED = ("pytest", "_pytest", "uvicorn", "ruff", "boto3", "botocore", "moto")
# Heavy modules a request on SQLite with auth disabled must not import
# (the ORM: the tables are Core; boto3: publishing is off).
NOT_NEEDED_ON_SQLITE = (
    "psycopg2",
    "jose",
    "cryptography",
    "httpx",
    "sqlalchemy.orm",
    "boto3",
    "botocore",
)
FAILING_ROUTE = "/test-only/explode"

# Serves one event per stdin line, one JSON line per response on stdout.
DRIVER = f"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
started = time.perf_counter()
import lambda_handler
imported = time.perf_counter() - started

def explode():
    raise RuntimeError("boom: internals")

lambda_handler.app.add_api_route({FAILING_ROUTE!r}, explode)
print(json.dumps({{"import_seconds": imported}}), flush=True)
for line in sys.stdin:
    started = time.perf_counter()
    response = lambda_handler.handler(json.loads(line), None)
    seconds = time.perf_counter() - started
    print(json.dumps({{"response": response, "seconds": seconds,
                      "modules": sorted(sys.modules)}}), flush=True)
"""
TIMED_IMPORT = """
import sys, time
sys.path[:0] = sys.argv[1:]
started = time.perf_counter()
import {modules}
print(time.perf_counter() - started)
"""


@dataclass
class Package:
    zip_path: Path
    root: Path
    build_seconds: float


def build(output: Path, work_dir: Path) -> float:
    """Build lambda.zip for the running interpreter; return the seconds it took."""
    env = {
        **os.environ,
        "LAMBDA_PYTHON": TARGET_PYTHON,
        "LAMBDA_ARCH": LAMBDA_ARCH or "",
        "BUILD_PYTHON": sys.executable,
    }
    command = [str(ROOT / "scripts" / "build_lambda.sh"), "--output", str(output)]
    command += ["--work-dir", str(work_dir)]
    started = time.perf_counter()
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    require(
        sys.platform == "linux" and LAMBDA_ARCH is not None,
        "the isolated run needs a Linux x86_64 or aarch64 machine",
    )
    folder = tmp_path_factory.mktemp("lambda")
    zip_path = folder / "lambda.zip"
    seconds = build(zip_path, folder / "work")
    root = folder / "unzipped"
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(root)
    print(f"\nbuild: {seconds:.1f} s, {zip_path.stat().st_size / 2**20:.1f} MiB")
    return Package(zip_path, root, seconds)


def isolated_env(database: dict[str, str]) -> dict[str, str]:
    """What Lambda's environment holds for this app, and nothing of ours."""
    return {"PATH": os.environ["PATH"], "AUTH_DISABLED": "1", **database}


class IsolatedLambda:
    """lambda_handler imported from the unzipped package by `python -I -S -B`."""

    def __init__(self, package: Package, env: dict[str, str]) -> None:
        command = [sys.executable, "-I", "-S", "-B", "-c", DRIVER, str(package.root)]
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.import_seconds = self._read()["import_seconds"]
        self.request_seconds: list[float] = []
        self.modules: list[str] = []

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            self.process.kill()
            pytest.fail(f"the isolated interpreter died:\n{self.process.stderr.read()}")
        return json.loads(line)

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(event) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        self.request_seconds.append(answer["seconds"])
        self.modules = answer["modules"]
        return answer["response"]

    def close(self) -> str:
        """Stop the interpreter; return what it wrote to stderr (its logs)."""
        self.process.stdin.close()
        stderr = self.process.stderr.read()
        assert self.process.wait(timeout=30) == 0, stderr
        return stderr


@pytest.fixture(params=["sqlite", "postgresql"])
def isolated(
    request: pytest.FixtureRequest, package: Package, tmp_path: Path
) -> Iterator[tuple[str, IsolatedLambda]]:
    if request.param == "sqlite":
        database = {"DB_PATH": str(tmp_path / "jobs.db")}
    else:
        backend_url("postgresql", tmp_path)  # requires TEST_DATABASE_URL; empties it
        database = {"DATABASE_URL": os.environ["TEST_DATABASE_URL"]}
    lambda_ = IsolatedLambda(package, isolated_env(database))
    yield request.param, lambda_
    if lambda_.process.poll() is None:
        lambda_.process.kill()


def test_isolated_interpreter_serves_api_gateway_events(
    isolated: tuple[str, IsolatedLambda],
) -> None:
    backend, lambda_ = isolated
    health = lambda_.invoke(http_api_event("GET", "/health", query="deep=1"))
    assert (health["statusCode"], response_json(health)["database"]) == (200, "ok")

    body = {"document_id": "isolated.pdf", "priority": 3}
    created = lambda_.invoke(http_api_event("POST", "/extraction-jobs", json_body=body))
    assert created["statusCode"] == 201, created
    job = response_json(created)
    fetched = lambda_.invoke(http_api_event("GET", f"/extraction-jobs/{job['id']}"))
    assert (fetched["statusCode"], response_json(fetched)) == (200, job)
    listed = lambda_.invoke(
        http_api_event("GET", "/extraction-jobs", query="document_id=isolated.pdf")
    )
    assert [found["id"] for found in response_json(listed)] == [job["id"]]
    patched = lambda_.invoke(
        http_api_event(
            "PATCH",
            f"/extraction-jobs/{job['id']}",
            json_body={"status": "processing"},
            base64_body=True,
        )
    )
    assert response_json(patched)["status"] == "processing"
    missing = lambda_.invoke(http_api_event("GET", "/extraction-jobs/nope"))
    assert missing["statusCode"] == 404
    invalid = lambda_.invoke(
        http_api_event("POST", "/extraction-jobs", json_body={"priority": 1})
    )
    assert invalid["statusCode"] == 422
    failed = lambda_.invoke(
        http_api_event("GET", FAILING_ROUTE, request_id="Lc3Ayl9dKCOGONS=")
    )
    assert (failed["statusCode"], response_json(failed)) == (
        500,
        {"detail": "Internal Server Error"},
    )

    not_needed = [name for name in NOT_NEEDED_ON_SQLITE if name in lambda_.modules]
    if backend == "sqlite":
        assert not not_needed, f"imported on SQLite with auth disabled: {not_needed}"
    else:
        assert "psycopg2" in lambda_.modules
    logs = [json.loads(line) for line in lambda_.close().strip().splitlines()]
    errors = [line for line in logs if line["level"] != "INFO"]
    assert len(errors) == 1, errors
    assert errors[0]["request_id"] == "Lc3Ayl9dKCOGONS="
    assert len(logs) == 1 + len(lambda_.request_seconds)  # plus one per request
    print(
        f"\n{backend}: import {lambda_.import_seconds * 1000:.0f} ms, first request "
        f"{lambda_.request_seconds[0] * 1000:.0f} ms, next ones "
        f"{statistics.median(lambda_.request_seconds[1:]) * 1000:.1f} ms (median)"
    )


def timed_import(python: list[str], modules: str, *path: Path) -> float:
    script = TIMED_IMPORT.format(modules=modules)
    result = subprocess.run(
        [*python, "-c", script, *map(str, path)],
        env=isolated_env({"DB_PATH": ":memory:"}),
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout)


def test_cold_import_stays_within_twice_the_framework_floor(package: Package) -> None:
    """The floor: the frameworks alone, from the project's compiled venv."""
    cold, floor = [], []
    for _ in range(5):
        cold.append(
            timed_import(
                [sys.executable, "-I", "-S", "-B"], "lambda_handler", package.root
            )
        )
        floor.append(
            timed_import([sys.executable, "-I", "-B"], "fastapi, mangum, sqlalchemy")
        )
    ratio = min(cold) / min(floor)
    print(
        f"\ncold import {min(cold) * 1000:.0f} ms (median "
        f"{statistics.median(cold) * 1000:.0f}), floor {min(floor) * 1000:.0f} ms "
        f"(median {statistics.median(floor) * 1000:.0f}): {ratio:.2f}x (goal 1.2x)"
    )
    assert ratio <= 2, f"cold import is {ratio:.2f}x the framework floor"


def test_zip_holds_the_app_modules_and_their_dependencies_only(
    package: Package,
) -> None:
    with zipfile.ZipFile(package.zip_path) as archive:
        entries = archive.infolist()
    names = [entry.filename for entry in entries]
    shipped_by_wheels = recorded_paths(package.root)

    sources = {name for name in names if not name.endswith(".pyc")}
    strays = (
        sources
        - APP_MODULES
        - CONSOLE_FILES
        - shipped_by_wheels
        - {build_lambda.CA_BUNDLE}
    )
    assert not strays, f"neither an app file nor a dependency file: {sorted(strays)}"
    assert APP_MODULES | CONSOLE_FILES <= sources
    top_level = {name.split("/")[0].split("-")[0] for name in names}
    assert not top_level & set(NEVER_PACKAGED)
    assert not [name for name in names if name.endswith((".db", ".tf", ".pyi"))]
    test_code = [
        name
        for name in names
        if {"tests", "test"} & set(name.split("/")[:-1])
        or name.rsplit("/", 1)[-1].startswith("test_")
        or "pytest" in name
    ]
    assert not test_code


def test_zip_carries_target_bytecode_for_every_module(package: Package) -> None:
    with zipfile.ZipFile(package.zip_path) as archive:
        names = set(archive.namelist())
        sources = {name for name in names if name.endswith(".py")}
        bytecode = {name for name in names if name.endswith(".pyc")}
        expected = {importlib.util.cache_from_source(name) for name in sources}
        assert bytecode == expected
        for name in sorted(bytecode):
            header = archive.read(name)[:8]
            assert header[:4] == importlib.util.MAGIC_NUMBER, name
            flags = int.from_bytes(header[4:8], "little")
            assert flags == 0b01, f"{name}: not an unchecked-hash .pyc"


def test_zip_entries_are_sorted_with_fixed_times_and_permissions(
    package: Package,
) -> None:
    with zipfile.ZipFile(package.zip_path) as archive:
        entries = archive.infolist()
    names = [entry.filename for entry in entries]
    assert names == sorted(names)
    assert {entry.date_time for entry in entries} == {(1980, 1, 1, 0, 0, 0)}
    assert {entry.external_attr >> 16 for entry in entries} == {0o100644}
    assert {entry.create_system for entry in entries} == {3}


def test_rebuild_is_byte_identical(package: Package, tmp_path: Path) -> None:
    rebuilt = tmp_path / "lambda.zip"
    seconds = build(rebuilt, tmp_path / "other-work-dir")
    print(f"\nrebuild: {seconds:.1f} s")
    assert rebuilt.read_bytes() == package.zip_path.read_bytes()


def recorded_paths(root: Path) -> set[str]:
    """Every file the installed wheels declare in their RECORD."""
    paths = set()
    for record in root.glob("*.dist-info/RECORD"):
        for line in record.read_text().splitlines():
            paths.add(line.rsplit(",", 2)[0])
    return paths


def test_the_migration_function_runs_from_the_package(
    package: Package, request: pytest.FixtureRequest
) -> None:
    """lambda_handler.migrate from the unzipped package, with botocore where the
    Lambda runtime has it (after the package on sys.path, never inside it),
    against the scratch database and moto-held secret of
    tests/test_migration_function.py."""
    scratch = request.getfixturevalue("deployment")
    import botocore

    runtime = Path(botocore.__file__).resolve().parent.parent
    code = (
        "import json, sys\n"
        f"sys.path[:0] = [{str(package.root)!r}]\n"
        f"sys.path.append({str(runtime)!r})\n"
        "import lambda_handler\n"
        "result = lambda_handler.migrate({}, None)\n"
        "assert lambda_handler.__file__.startswith(sys.path[0])\n"
        "print(json.dumps(result))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", code],
        env=isolated_env(scratch["env"]),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "revision_before": None,
        "revision": SCHEMA_REVISIONS[-1],
        "app_role": scratch["app"],
    }
    assert scratch["password"] not in result.stdout + result.stderr


def test_packaged_docs_serve_swagger_ui_from_the_package(
    package: Package, tmp_path: Path
) -> None:
    """Under 1 MiB zipped, the docs assets are kept (build_lambda.docs_assets)."""
    lambda_ = IsolatedLambda(
        package, isolated_env({"DB_PATH": str(tmp_path / "jobs.db")})
    )
    page = lambda_.invoke(http_api_event("GET", "/docs"))
    assert page["statusCode"] == 200
    assert "/docs-assets/swagger-ui-bundle.js" in page["body"]
    assert "cdn.jsdelivr.net" not in page["body"]
    script = lambda_.invoke(http_api_event("GET", "/docs-assets/swagger-ui-bundle.js"))
    assert script["statusCode"] == 200
    assert "SwaggerUIBundle" in script["body"]
    lambda_.close()


def test_the_ca_bundle_is_packaged_when_it_was_fetched(tmp_path: Path) -> None:
    source, root = tmp_path / "checkout", tmp_path / "package"
    source.mkdir()
    root.mkdir()
    bundle = build_lambda.CA_BUNDLE
    assert "none" in build_lambda.copy_ca_bundle(source, root)
    assert not (root / bundle).exists()

    authority = certificate_authority(tmp_path, "rds")[0].read_text()
    (source / bundle).write_text(authority * 2)
    assert "(2 certificates)" in build_lambda.copy_ca_bundle(source, root)
    assert (root / bundle).read_bytes() == (source / bundle).read_bytes()

    (source / bundle).write_text("<html>403 Forbidden</html>")  # a failed fetch
    with pytest.raises(SystemExit):
        build_lambda.copy_ca_bundle(source, root)


def test_packaged_console_serves_under_a_named_stage(
    package: Package, tmp_path: Path
) -> None:
    """The page's relative URLs resolve below the stage, and each is served
    from the package with the console's policy."""
    lambda_ = IsolatedLambda(
        package,
        isolated_env(
            {"DB_PATH": str(tmp_path / "jobs.db"), "API_GATEWAY_BASE_PATH": "prod"}
        ),
    )
    page = lambda_.invoke(http_api_event("GET", "/console", stage="prod"))
    assert page["statusCode"] == 200
    assert "frame-ancestors 'none'" in page["headers"]["content-security-policy"]
    here = "https://api.example.com/prod/console"
    urls = re.findall(r'(?:href|src)="(console/[^"]*)"', page["body"])
    urls.append("console/config.json")
    for url in urls:
        path = urlsplit(urljoin(here, url)).path
        assert path.startswith("/prod/console/"), path
        answer = lambda_.invoke(
            http_api_event("GET", path.removeprefix("/prod"), stage="prod")
        )
        assert answer["statusCode"] == 200, (path, answer)
        assert "content-security-policy" in answer["headers"]
    script = lambda_.invoke(
        http_api_event("GET", "/console/assets/console.js", stage="prod")
    )
    assert script["body"] == (ROOT / "console/assets/console.js").read_text()
    lambda_.close()
