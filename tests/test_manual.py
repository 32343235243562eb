"""The README and the manual in docs/ (issue 20): the README stays a front
door, every relative link resolves, the configuration table is settings.py's,
every job example shows exactly the `Job` model's fields, and the runnable
examples run.

A shell block preceded by `<!-- runnable -->` is run, block by block in the
order of its file, in one bash session against a fresh `make run` (SQLite,
auth off, a free port given as PORT). Each `curl` in it carries the status it
answers (`# → 201`), or, for a loop, the block says
`# every request here answers 200`; the server's own request log lines say
what each request really answered, and a block fails when they differ, when
any command fails, or when it holds a placeholder that cannot be pasted."""

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import require, start_server, stop_server, wait_until_listening

import database
import settings
from models import Job

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
MANUAL = [
    "api.md",
    "workers.md",
    "deploy.md",
    "operations.md",
    "configuration.md",
    "security.md",
    "performance.md",
    "development.md",
]
RUNNABLE = "<!-- runnable -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")
EXPECTED_STATUS = re.compile(r"#\s*→\s*(\d{3})\b")
EVERY_REQUEST = re.compile(r"^# every request here answers (\d{3})$", re.MULTILINE)
PLACEHOLDER = re.compile(r"…|\.\.\.|<[a-z][a-z _-]*>")


def blocks(path: Path) -> list[tuple[str, str, bool]]:
    """(language, code, runnable) of every fenced block, in order."""
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append((match.group(1), match.group(2), before.strip() == RUNNABLE))
    return found


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    for page in MANUAL:
        assert f"(docs/{page})" in README.read_text(), f"the README links {page}"


def test_each_manual_page_exists_and_starts_with_what_it_is_for():
    for page in MANUAL:
        text = (DOCS / page).read_text()
        title, blank, purpose = text.splitlines()[:3]
        assert title.startswith("# ") and blank == "" and purpose, page


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {
        slug(line.lstrip("#"))
        for line in text.splitlines()
        if re.match(r"#{1,6} ", line)
    }


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target}")
            elif (
                anchor and resolved.suffix == ".md" and anchor not in anchors(resolved)
            ):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_the_configuration_table_is_the_settings_table():
    """Regenerate it with `.venv/bin/python settings.py table`."""
    text = (DOCS / "configuration.md").read_text()
    header = "| variable | default | meaning |\n|---|---|---|\n"
    table = text[text.index(header) :].split("\n\n", 1)[0]
    assert table + "\n" == settings.markdown_table()


def test_the_make_migrate_example_names_this_code_s_revisions():
    """Its output is quoted in operations.md; the formats are checked against
    the real command in tests/test_entry_points.py, the revisions here."""
    quoted = [
        line
        for line in (DOCS / "operations.md").read_text().splitlines()
        if line.startswith("# make migrate: ")
    ]
    assert len(quoted) == 3
    revisions = {r for line in quoted for r in re.findall(r"\b\d{4}_\w+", line)}
    assert revisions == {database.SCHEMA_HEAD}


def job_examples() -> list[tuple[str, dict]]:
    examples = []
    for page in PAGES:
        for language, code, _ in blocks(page):
            if language != "json":
                continue
            value = json.loads(code)
            if (
                isinstance(value, dict)
                and "document_id" in value
                and "version" in value
            ):
                examples.append((page.name, value))
    return examples


def test_every_job_example_shows_every_field_of_the_job_model():
    examples = job_examples()
    assert "api.md" in {page for page, _ in examples}
    for page, example in examples:
        assert list(example) == list(Job.model_fields), page
        Job.model_validate(example)


# --- the runnable examples ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def commands(code: str) -> list[str]:
    """The block's logical lines: backslash continuations joined."""
    return code.replace("\\\n", " ").splitlines()


def expected_statuses(code: str) -> list[int]:
    statuses = []
    for line in commands(code):
        if re.search(r"(^|[\s($|])curl\s", line.split("#", 1)[0]):
            found = EXPECTED_STATUS.findall(line)
            assert len(found) == 1, f"a curl without its status (# → 200): {line}"
            statuses.append(int(found[0]))
    return statuses


class Server:
    """`make run` on a free port with a database of its own; its stderr read
    as JSON lines (every line must be one)."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in settings.ENV_NAMES}
        env["DB_PATH"] = str(tmp_path / "jobs.db")
        self.process = start_server(["make", "-s", "run", f"PORT={self.port}"], env)
        self.records: list[dict] = []
        self.not_json: list[str] = []
        for stream in (self.process.stdout, self.process.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()
        # Listening is enough (a request would add a line to the log).
        wait_until_listening(self.process, self.port)

    def _read(self, stream) -> None:
        for line in stream:
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                self.not_json.append(line)

    def requests(self) -> list[dict]:
        return [r for r in self.records if r.get("message") == "request"]

    def stop(self) -> None:
        stop_server(self.process)


class Shell:
    """One bash session, fed a block at a time, as a reader pastes them."""

    DONE = "__block_done__"

    def __init__(self, port: int, tmp_path: Path) -> None:
        env = dict(os.environ, PORT=str(port), HOME=str(tmp_path))
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.process.stdin.write("set -eo pipefail\n")

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, code: str, timeout: float = 60) -> str:
        # On a line of its own even after a body without a final newline.
        self.process.stdin.write(f"{code}\nprintf '\\n%s\\n' {self.DONE}\n")
        self.process.stdin.flush()
        output = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"a command failed:\n{code}\n{''.join(output)}")
            if line.strip() == self.DONE:
                return "".join(output)
            output.append(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def runnable_pages() -> list[Path]:
    return [page for page in PAGES if any(r for _, _, r in blocks(page))]


def assert_the_job_example_is_the_tour_s_job(shell: Shell, port: int) -> None:
    """The README's job example is what the tour's job really became, but
    for its id and its times."""
    job_id = shell.run('echo "$JOB_ID"').strip()
    job = httpx.get(f"http://127.0.0.1:{port}/extraction-jobs/{job_id}").json()
    [(_, example)] = [(page, e) for page, e in job_examples() if page == README.name]
    differ = {"id"} | {name for name in example if name.endswith("_at")}
    differ.discard("lease_expires_at")  # null once finished, as shown
    for name in set(example) - differ:
        assert job[name] == example[name], name


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda page: page.name)
def test_the_runnable_examples_answer_as_the_text_says(page, tmp_path):
    require(bool(shutil.which("curl") and shutil.which("jq")), "curl and jq")
    server = Server(tmp_path)
    shell = Shell(server.port, tmp_path)
    try:
        for language, code, runnable in blocks(page):
            if not runnable:
                continue
            assert language in ("bash", "sh"), code
            assert not PLACEHOLDER.search(code), f"a placeholder:\n{code}"
            every = EVERY_REQUEST.search(code)
            wanted = [] if every else expected_statuses(code)
            before = len(server.requests())
            output = shell.run(code)
            time.sleep(0.2)  # the last request's line follows its answer
            deadline = time.monotonic() + 10
            while len(server.requests()) < before + (1 if every else len(wanted)):
                assert time.monotonic() < deadline, (code, output, server.requests())
                time.sleep(0.05)
            got = [r["status"] for r in server.requests()[before:]]
            if every:
                assert set(got) == {int(every.group(1))}, f"{code}\n{output}\n{got}"
            else:
                assert got == wanted, f"{code}\n{output}"
        seen = len(server.requests())
        time.sleep(0.5)
        assert len(server.requests()) == seen, "a request no block announced"
        if page == README:
            assert_the_job_example_is_the_tour_s_job(shell, server.port)
    finally:
        shell.close()
        server.stop()
    assert server.not_json == [], "every line make run writes is JSON"
    if page == README:
        routes = {f"{r['method']} {r['route']}" for r in server.requests()}
        for route in (
            "POST /extraction-jobs",
            "POST /extraction-jobs/claim",
            "POST /extraction-jobs/{job_id}/heartbeat",
            "PATCH /extraction-jobs/{job_id}",
            "GET /extraction-jobs/{job_id}",
            "GET /extraction-jobs/{job_id}/events",
            "GET /extraction-jobs",
            "GET /extraction-jobs/stats",
        ):
            assert route in routes, f"the tour leaves out {route}"
