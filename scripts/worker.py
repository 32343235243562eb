"""The reference worker: claims extraction jobs one at a time and runs each.

    python scripts/worker.py --api URL --worker-id ID --command 'CMD' \\
        [--lease-seconds N] [--once]

The bearer token comes from API_TOKEN (never a flag); without it none is sent.
CMD runs through /bin/sh with `{id}` and `{document_id}` replaced, shell-quoted,
and the job's JSON on stdin. Exit status 0 completes the job: stdout that is a
JSON object the API can store becomes its `result`, other output is kept as
{"stdout": ...}. Any other exit status releases the job for a retry with
backoff while attempts remain, and fails it on the last attempt with the tail
of stderr. The worker heartbeats at a third of the lease while CMD runs, kills
CMD (its whole process group) on a cancel request or SIGTERM/SIGINT, and on
shutdown gives its job back without spending the attempt.

Importable: `Worker(api, work).run()`, where `work` is a command as above or a
Python function of the job returning its result (see
docs/workers.md). Needs only httpx and the standard library.
Exit codes: 0 done or stopped by a signal, 1 the API refused the worker
(401/403, or refused its claim), 2 bad arguments or an API it cannot reach.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

# The API's bounds (models.py); tests/test_worker.py checks that they agree.
MAX_RESULT_BYTES = 64 * 1024
MAX_RESULT_DEPTH = 32
MAX_ERROR_MESSAGE_LENGTH = 10_000
MAX_WORKER_ID_LENGTH = 255
MIN_LEASE_SECONDS, MAX_LEASE_SECONDS = 10, 43_200
DEFAULT_LEASE_SECONDS = 300

HEARTBEATS_PER_LEASE = 3
POLL_SECONDS = 0.2  # how soon a signal is noticed while a job runs or the worker waits
KILL_GRACE_SECONDS = 5  # SIGTERM to the command's process group, then SIGKILL
IDLE_BACKOFF = (1.0, 30.0)  # first and longest wait between claims on an empty queue
ERROR_BACKOFF = (1.0, 60.0)  # ... between calls while the API is unavailable
MAX_RETRY_AFTER_SECONDS = 3600
RETRY_BACKOFF = (10, 3600)  # retry_in_seconds after a failed attempt: 10 s, 20 s, ...
RELEASE_DEADLINE_SECONDS = 10  # a release that cannot be sent: the lease runs out
REQUEST_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
STDOUT_KEEP_BYTES = 1 << 20  # more stdout than this cannot be a storable result
STDERR_KEEP_BYTES = 64 * 1024  # enough for the last MAX_ERROR_MESSAGE_LENGTH characters
# API Gateway answers 502/504 when the function errs or times out, 429 when throttled.
TRANSIENT = frozenset({429, 500, 502, 503, 504})
TRUNCATED = "\n[output cut to fit the API's result limit]"
PLACEHOLDER = re.compile(r"\{(id|document_id)\}")
SERVICE = "extraction_worker"


class Unreachable(Exception):
    """The API cannot be reached (or is not the API) when the worker starts."""


class Stopped(Exception):
    """The API refused the worker (401/403, or its claim): running on is useless."""


# --- results and error messages, bounded as the API bounds them -------------


def clean(text: str) -> str:
    """What the API stores: no NUL, no lone surrogates."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def serialized_size(value: Any) -> int:
    """Bytes as the API measures them: compact JSON, UTF-8, nothing escaped
    beyond what JSON needs (the float spelling may differ by a byte or two:
    Python writes 1e+308 where the API writes 1e308, so this errs high)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def refusal(value: dict) -> str | None:
    """Why the API would refuse `value` as a result, or None (models.py's rules)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list) and depth > MAX_RESULT_DEPTH:
            return f"more than {MAX_RESULT_DEPTH} levels deep"
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str) or clean(key) != key:
                    return "a key that is not text the API can store"
                stack.append((child, depth + 1))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
        elif isinstance(node, str):
            if clean(node) != node:
                return "a NUL character or a lone surrogate"
        elif isinstance(node, float) and not math.isfinite(node):
            return "a number that is not finite"
        elif node is not None and not isinstance(node, bool | int | float):
            return f"a {type(node).__name__}, which is not JSON"
    size = serialized_size(value)
    if size > MAX_RESULT_BYTES:
        return f"{size} bytes serialized, over the {MAX_RESULT_BYTES}-byte limit"
    return None


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def json_result(text: str) -> dict | None:
    """`text` as a result: a JSON object the API can store, else None."""
    try:
        value = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) and refusal(value) is None else None


def text_result(text: str) -> dict:
    """{"stdout": text}, cut (on a character, marked) to fit the result limit."""
    text = clean(text)
    if serialized_size({"stdout": text}) <= MAX_RESULT_BYTES:
        return {"stdout": text}
    # Each character is at least one byte: the longest prefix that fits.
    low, high = 0, min(len(text), MAX_RESULT_BYTES)
    while low < high:
        middle = (low + high + 1) // 2
        if serialized_size({"stdout": text[:middle] + TRUNCATED}) <= MAX_RESULT_BYTES:
            low = middle
        else:
            high = middle - 1
    return {"stdout": text[:low] + TRUNCATED}


def error_tail(text: str) -> str:
    """The end of `text` within the API's error_message limit (characters)."""
    text = clean(text).rstrip()
    if len(text) <= MAX_ERROR_MESSAGE_LENGTH:
        return text
    return "…" + text[-(MAX_ERROR_MESSAGE_LENGTH - 1) :]


@dataclass(frozen=True)
class Outcome:
    """How a job's work ended: `error` set means it failed."""

    result: dict | None = None
    error: str | None = None
    exit_code: int | None = None
    kept: str | None = None  # for the log: how stdout became the result


def command_outcome(code: int, stdout: bytes, complete: bool, stderr: bytes) -> Outcome:
    if code != 0:
        tail = error_tail(stderr.decode("utf-8", "replace"))
        if not tail:
            tail = (
                f"the command was killed by signal {_signal_name(-code)}"
                if code < 0
                else f"the command exited with code {code}"
            )
        return Outcome(error=tail, exit_code=code)
    text = stdout.decode("utf-8", "replace")
    result = json_result(text) if complete else None
    if result is not None:
        return Outcome(result=result, exit_code=0, kept="json")
    if not text.strip():
        return Outcome(exit_code=0)
    result = text_result(text)
    whole = complete and result["stdout"] == clean(text)
    return Outcome(
        result=result, exit_code=0, kept="stdout" if whole else "stdout, cut"
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal, say
        return str(number)


def function_outcome(value: Any) -> Outcome:
    if value is None:
        return Outcome()
    if not isinstance(value, dict):
        return Outcome(
            error=f"the function returned a {type(value).__name__}, not a dict"
        )
    reason = refusal(value)
    if reason is not None:
        return Outcome(error=f"the function's result cannot be stored: {reason}")
    return Outcome(result=value)


# --- running one job's work ---------------------------------------------------


class _Head:
    """The first `limit` bytes of a stream; the rest is read and dropped."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data, self.complete = limit, bytearray(), True

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[:room]
        self.complete = self.complete and len(chunk) <= room


class _Tail:
    """The last `limit` bytes of a stream."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data = limit, bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        del self.data[: -self.limit]


def _drain(pipe, keep: _Head | _Tail) -> None:
    with pipe:
        while chunk := pipe.read1(65536):
            keep.add(chunk)


def _feed(pipe, data: bytes) -> None:
    try:
        with pipe:
            pipe.write(data)
    except OSError:  # the command did not read its stdin: fine
        pass


def render(template: str, job: dict) -> str:
    """`template` with {id} and {document_id} replaced, shell-quoted."""
    return PLACEHOLDER.sub(lambda match: shlex.quote(str(job[match[1]])), template)


class CommandRun:
    """A shell command in its own process group, its output read as it comes."""

    def __init__(self, template: str, job: dict) -> None:
        # The command gets the worker's environment but not its token.
        environment = {k: v for k, v in os.environ.items() if k != "API_TOKEN"}
        self.process = subprocess.Popen(
            render(template, job),
            shell=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=environment,
        )
        self.stdout, self.stderr = _Head(STDOUT_KEEP_BYTES), _Tail(STDERR_KEEP_BYTES)
        self.feeder = _thread(_feed, self.process.stdin, json.dumps(job).encode())
        # They end when every process holding the command's output has exited.
        self.readers = [
            _thread(_drain, self.process.stdout, self.stdout),
            _thread(_drain, self.process.stderr, self.stderr),
        ]

    def wait(self, timeout: float) -> Outcome | None:
        """The outcome once the command has exited, else None after `timeout`."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        # What it left running in its group is part of the job, which is over.
        self._signal_group(signal.SIGKILL)
        self._join(time.monotonic() + KILL_GRACE_SECONDS)
        return command_outcome(
            code, bytes(self.stdout.data), self.stdout.complete, bytes(self.stderr.data)
        )

    def kill(self) -> None:
        """SIGTERM to the whole process group; SIGKILL to what is left once
        the command and every process holding its output have exited, or
        after the grace period."""
        self._signal_group(signal.SIGTERM)
        grace_over = time.monotonic() + KILL_GRACE_SECONDS
        try:
            self.process.wait(KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        for reader in self.readers:
            reader.join(max(grace_over - time.monotonic(), 0))
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        self._join(time.monotonic() + KILL_GRACE_SECONDS)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def _join(self, deadline: float) -> None:
        for thread in (self.feeder, *self.readers):
            thread.join(max(deadline - time.monotonic(), 0))


def _thread(target: Callable, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


class FunctionRun:
    """A Python function of the job, in a daemon thread. A thread cannot be
    killed: on a cancel or shutdown the worker stops waiting for it and
    discards what it returns."""

    def __init__(self, function: Callable[[dict], dict | None], job: dict) -> None:
        self.outcome: Outcome | None = None
        self.thread = _thread(self._run, function, job)

    def _run(self, function: Callable[[dict], dict | None], job: dict) -> None:
        try:
            value = function(job)
        except BaseException:  # noqa: BLE001 - whatever it raises fails its job
            self.outcome = Outcome(error=error_tail(traceback.format_exc()))
        else:
            self.outcome = function_outcome(value)

    def wait(self, timeout: float) -> Outcome | None:
        self.thread.join(timeout)
        return None if self.thread.is_alive() else self.outcome

    def kill(self) -> None:
        """Nothing to do: see the class."""


# --- the loop -------------------------------------------------------------------


class Backoff:
    """Exponential waits with jitter, from `first` up to `longest`."""

    def __init__(self, first: float, longest: float) -> None:
        self.first, self.longest, self.current = first, longest, first

    def next(self) -> float:
        wait = self.current * random.uniform(0.5, 1.0)
        self.current = min(self.current * 2, self.longest)
        return wait

    def reset(self) -> None:
        self.current = self.first


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), bounded; None if absent."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def detail(response: httpx.Response) -> str:
    """The API's `detail`, short and on one line, for a log."""
    try:
        text = response.json().get("detail")
    except (ValueError, AttributeError):
        text = None
    text = text if isinstance(text, str) else json.dumps(text) if text else ""
    return " ".join(text.split())[:300]


def retry_in_seconds(attempts: int) -> int:
    first, longest = RETRY_BACKOFF
    return min(first * 2 ** max(attempts - 1, 0), longest)


def shown(api: str) -> str:
    """The API's URL without any user or password in it."""
    parts = urlsplit(api)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


@dataclass(frozen=True)
class Problem:
    """A call that did not get an answer worth acting on (yet)."""

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Ending:
    """How supervising a job ended: its work's outcome, or why it was cut short."""

    kind: str  # "done", "cancel", "stop" or "lost"
    outcome: Outcome | None = None


class Worker:
    """Claims jobs one at a time from the API at `api` and runs `work` for
    each: a shell command (a str, as on the command line) or a function of
    the job (a dict) returning its result (a dict, or None)."""

    def __init__(
        self,
        api: str,
        work: str | Callable[[dict], dict | None],
        *,
        worker_id: str | None = None,
        token: str | None = None,
        lease_seconds: int = DEFAULT_LEASE_SECONDS,
        once: bool = False,
    ) -> None:
        self.api = api
        self.work = work
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.lease_seconds = lease_seconds
        self.once = once
        token = token if token is not None else os.environ.get("API_TOKEN", "")
        headers = {"Authorization": f"Bearer {token.strip()}"} if token.strip() else {}
        self.client = httpx.Client(
            base_url=api.rstrip("/"), headers=headers, timeout=REQUEST_TIMEOUT
        )
        self.stopping = False
        self.signal_name: str | None = None

    # --- control

    def stop(self, signum: int | None = None, _frame: object = None) -> None:
        """Stop claiming; a running job is killed and given back. Safe in a
        signal handler: it only sets flags that the loop reads."""
        if signum is not None and self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        self.stopping = True

    def run(self) -> None:
        """Work until stopped (or, with once, until the queue is empty).
        Raises Unreachable if the API cannot be reached at the start, Stopped
        if it refuses the worker."""
        try:
            self.check_reachable()
            handlers = self._handle_signals()
            try:
                self._loop()
            except Stopped as error:
                self.log("ERROR", f"stopped: {error}")
                raise
            finally:
                for signum, handler in handlers.items():
                    signal.signal(signum, handler)
        finally:
            self.client.close()

    def check_reachable(self) -> None:
        """GET /health answers (200, or a transient refusal such as 503)."""
        where = shown(self.api)
        try:
            response = self.client.get("/health")
        except httpx.HTTPError as error:
            reason = str(error).splitlines()[0] if str(error) else ""
            raise Unreachable(
                f"cannot reach the API at {where}: {type(error).__name__} {reason}".rstrip()
            ) from None
        if response.status_code != 200 and response.status_code not in TRANSIENT:
            raise Unreachable(
                f"{where} answered GET /health with {response.status_code}: "
                "is --api the Extraction Job API's base URL?"
            )

    def _handle_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}  # only the main thread may; call stop() instead
        return {
            signum: signal.signal(signum, self.stop)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }

    def _loop(self) -> None:
        self.log(
            "INFO",
            "worker started",
            api=shown(self.api),
            lease_seconds=self.lease_seconds,
            once=self.once,
        )
        idle = Backoff(*IDLE_BACKOFF)
        while not self.stopping:
            job = self._claim()
            if job is not None:
                idle.reset()
                self._process(job)
            elif self.once and not self.stopping:
                self.log("INFO", "the queue is empty")
                break
            else:
                self._sleep(idle.next())
        self.log("INFO", "worker stopped", signal=self.signal_name)

    def _sleep(self, seconds: float, interruptible: bool = True) -> bool:
        """Wait, in slices so that a signal is noticed; False if stopped."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if interruptible and self.stopping:
                return False
            time.sleep(min(left, POLL_SECONDS))
        return not (interruptible and self.stopping)

    # --- calls to the API

    def _send(
        self, method: str, path: str, body: dict, timeout: float | None = None
    ) -> httpx.Response | Problem:
        """One call: the answer, or the Problem that makes it worth retrying.
        401 and 403 raise Stopped."""
        try:
            response = self.client.request(
                method, path, json=body, timeout=timeout or REQUEST_TIMEOUT
            )
        except httpx.TransportError as error:
            return Problem(type(error).__name__)
        if response.status_code in (401, 403):
            raise Stopped(self._refused(response))
        if response.status_code in TRANSIENT:
            return Problem(str(response.status_code), retry_after(response))
        return response

    def _refused(self, response: httpx.Response) -> str:
        if response.status_code == 401:
            what = "the API refused the token (401)"
            fix = (
                "set API_TOKEN to a valid bearer token"
                if self.client.headers.get("Authorization")
                else "API_TOKEN is not set and the API requires a token"
            )
        else:
            what = "the token may not do this (403)"
            fix = "the worker needs a token with the write:extraction-jobs scope"
        said = detail(response)
        return f"{what}: {fix}" + (f" (the API said: {said})" if said else "")

    def _call(
        self,
        method: str,
        path: str,
        body: dict,
        deadline: float | None = None,
    ) -> httpx.Response | None:
        """The call, retried with backoff while the API is unavailable, until
        it is answered; None if `deadline` (a monotonic time) comes first or,
        without one, if the worker is stopped first."""
        backoff = Backoff(*ERROR_BACKOFF)
        while True:
            answer = self._send(method, path, body)
            if isinstance(answer, httpx.Response):
                return answer
            wait = answer.retry_after
            wait = backoff.next() if wait is None else wait
            if deadline is not None and time.monotonic() + wait > deadline:
                self.log(
                    "ERROR", "giving up on the API", call=path, error=answer.reason
                )
                return None
            self.log(
                "WARNING",
                "the API is unavailable, retrying",
                call=path,
                error=answer.reason,
                wait_seconds=round(wait, 3),
            )
            if not self._sleep(wait, interruptible=deadline is None):
                return None

    def _claim(self) -> dict | None:
        response = self._call(
            "POST",
            "/extraction-jobs/claim",
            {
                "worker_id": self.worker_id,
                "limit": 1,
                "lease_seconds": self.lease_seconds,
            },
        )
        if response is None:
            return None
        if response.status_code != 200:
            raise Stopped(
                f"the API refused the claim ({response.status_code}): {detail(response)}"
            )
        jobs = response.json()
        return jobs[0] if jobs else None

    # --- one job

    def _process(self, job: dict) -> None:
        self.log(
            "INFO",
            "job claimed",
            job_id=job["id"],
            attempt=job["attempts"],
            max_attempts=job["max_attempts"],
        )
        started = time.monotonic()
        self._finish(job, self._run(job), round(time.monotonic() - started, 3))

    def _run(self, job: dict) -> Ending:
        if self.stopping:
            return Ending("stop")
        try:
            running = (
                CommandRun(self.work, job)
                if isinstance(self.work, str)
                else FunctionRun(self.work, job)
            )
        except OSError as error:  # no /bin/sh, no processes left, ...
            return Ending("done", Outcome(error=f"cannot start the command: {error}"))
        try:
            return self._supervise(job, running)
        except BaseException:
            running.kill()
            raise

    def _supervise(self, job: dict, running: CommandRun | FunctionRun) -> Ending:
        """Wait for the work, heartbeating; cut it short on a signal, a
        cancel request or a lost lease."""
        interval = self.lease_seconds / HEARTBEATS_PER_LEASE
        next_beat = time.monotonic() + interval
        while True:
            wait = min(POLL_SECONDS, max(next_beat - time.monotonic(), 0))
            outcome = running.wait(wait)
            if outcome is not None:
                return Ending("done", outcome)
            if self.stopping:
                self.log("INFO", "stopping: killing the job's work", job_id=job["id"])
                running.kill()
                return Ending("stop")
            if time.monotonic() >= next_beat:
                kind, again = self._heartbeat(job, interval)
                if kind != "ok":
                    running.kill()
                    return Ending(kind)
                next_beat = time.monotonic() + again

    def _heartbeat(self, job: dict, interval: float) -> tuple[str, float]:
        """("ok", seconds to the next one), ("cancel", _) or ("lost", _)."""
        answer = self._send(
            "POST",
            f"/extraction-jobs/{job['id']}/heartbeat",
            {"worker_id": self.worker_id, "lease_seconds": self.lease_seconds},
            timeout=interval,
        )
        if isinstance(answer, Problem):
            again = min(answer.retry_after or ERROR_BACKOFF[0], interval)
            self.log(
                "WARNING",
                "heartbeat not answered, trying again",
                job_id=job["id"],
                error=answer.reason,
                wait_seconds=round(again, 3),
            )
            return "ok", again
        if answer.status_code == 200:
            if answer.json().get("cancel_requested_at"):
                self.log(
                    "INFO", "cancel requested: killing the job's work", job_id=job["id"]
                )
                return "cancel", 0
            return "ok", interval
        lost = answer.status_code in (404, 409)  # taken over, or finished
        self.log(
            "WARNING" if lost else "ERROR",
            "the job is no longer ours: killing its work"
            if lost
            else "heartbeat refused",
            job_id=job["id"],
            status=answer.status_code,
            detail=detail(answer),
        )
        return ("lost", 0) if lost else ("ok", interval)

    def _finish(self, job: dict, ending: Ending, seconds: float) -> None:
        fields = {"job_id": job["id"], "attempt": job["attempts"], "seconds": seconds}
        if ending.kind == "lost":
            return
        if ending.kind == "stop":
            response = self._call(
                "POST",
                f"/extraction-jobs/{job['id']}/release",
                {"worker_id": self.worker_id},
                deadline=time.monotonic() + RELEASE_DEADLINE_SECONDS,
            )
            self._finished(response, "job released", fields)
            return
        if ending.kind == "cancel":
            self._patch(job, {"status": "cancelled"}, "job cancelled", fields)
            return
        outcome = ending.outcome
        fields |= {"exit_code": outcome.exit_code, "result_kept_as": outcome.kept}
        if outcome.error is None:
            body = {"status": "completed"}
            if outcome.result is not None:
                body["result"] = outcome.result
            response = self._patch(job, body, "job completed", fields)
            if response is not None and response.status_code == 422:
                failure = f"the API refused the result: {detail(response)}"
                self._patch(
                    job,
                    {"status": "failed", "error_message": failure},
                    "job failed",
                    fields,
                )
        elif job["attempts"] < job["max_attempts"]:
            wait = retry_in_seconds(job["attempts"])
            body = {
                "status": "pending",
                "retry_in_seconds": wait,
                "error_message": outcome.error,
            }
            self._patch(
                job, body, "job failed, retrying", fields | {"retry_in_seconds": wait}
            )
        else:
            body = {"status": "failed", "error_message": outcome.error}
            self._patch(job, body, "job failed", fields)

    def _patch(
        self, job: dict, body: dict, message: str, fields: dict
    ) -> httpx.Response | None:
        # Retried until answered: giving up would only let the lease run out
        # and the work be done again (repeating a finishing PATCH is safe).
        response = self._call(
            "PATCH",
            f"/extraction-jobs/{job['id']}",
            {**body, "worker_id": self.worker_id},
        )
        self._finished(response, message, fields)
        return response

    def _finished(
        self, response: httpx.Response | None, message: str, fields: dict
    ) -> None:
        if response is None:
            self.log("ERROR", f"not recorded: {message}", **fields)
        elif response.status_code == 200:
            self.log("INFO", message, status=response.json()["status"], **fields)
        elif response.status_code in (404, 409):
            # Taken over after the lease ran out, finished or cancelled by an operator.
            self.log(
                "WARNING",
                f"not recorded: {message}: the job was taken over or finished",
                status=response.status_code,
                detail=detail(response),
                **fields,
            )
        else:
            self.log(
                "ERROR",
                f"not recorded: {message}",
                status=response.status_code,
                detail=detail(response),
                **fields,
            )

    # --- logs

    def log(self, level: str, message: str, **fields: Any) -> None:
        """One JSON line on stderr. Never job metadata, results or the token."""
        record = {
            "level": level,
            "message": message,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "service": SERVICE,
            "worker_id": self.worker_id,
            **{name: value for name, value in fields.items() if value is not None},
        }
        print(json.dumps(record), file=sys.stderr, flush=True)


# --- the command line -------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """One line, not argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _lease_seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not MIN_LEASE_SECONDS <= value <= MAX_LEASE_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of seconds, {MIN_LEASE_SECONDS}..{MAX_LEASE_SECONDS}"
        )
    return value


def _api_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            "must be an http:// or https:// URL, e.g. http://127.0.0.1:8000"
        )
    return text


def _worker_id(text: str) -> str:
    if not 1 <= len(text) <= MAX_WORKER_ID_LENGTH or clean(text) != text:
        raise argparse.ArgumentTypeError(
            f"must be 1..{MAX_WORKER_ID_LENGTH} characters, without NUL"
        )
    return text


def _command(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="worker.py",
        description="Claim extraction jobs one at a time and run a command for each. "
        "The bearer token is read from API_TOKEN.",
    )
    parser.add_argument(
        "--api", required=True, type=_api_url, help="the API's base URL"
    )
    parser.add_argument(
        "--command",
        required=True,
        type=_command,
        help="run through /bin/sh for each job; {id} and {document_id} are "
        "replaced, shell-quoted; the job's JSON is on stdin",
    )
    parser.add_argument(
        "--worker-id",
        type=_worker_id,
        help="who claims the jobs (default: host name and process id)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=_lease_seconds,
        default=DEFAULT_LEASE_SECONDS,
        help=f"each job's lease, renewed every third of it (default {DEFAULT_LEASE_SECONDS})",
    )
    parser.add_argument(
        "--once", action="store_true", help="exit when the queue is empty"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    worker = Worker(
        args.api,
        args.command,
        worker_id=args.worker_id,
        lease_seconds=args.lease_seconds,
        once=args.once,
    )
    try:
        worker.run()
    except Unreachable as error:
        print(f"worker.py: error: {error}", file=sys.stderr)
        return 2
    except Stopped:
        return 1  # said in the log
    return 0


if __name__ == "__main__":
    sys.exit(main())
