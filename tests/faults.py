"""Faults made on loopback, for the resilience tests and the pooler benchmark:

- `Forwarder`: a TCP relay in front of PostgreSQL that can fall silent (it
  keeps accepting and acknowledging, and answers nothing), as a hung server
  or a proxy into a black hole does;
- `tarpit()`: a port that accepts connections and never answers at all;
- `partition(port)`: iptables drops every packet to and from one port, as in
  a network partition (nothing is refused, nothing arrives), and the rules
  go again afterwards, whatever happened;
- `PgBouncer`: Debian's PgBouncer in transaction mode, on a free port, with a
  configuration of its own;
- `Uvicorn`: app processes serving on free ports.

Each needs what it needs (iptables and root, the pgbouncer binary); `require`
(conftest) skips without it on a developer machine and fails under CI=true.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = ("127.0.0.1", 5432)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Forwarder:
    """127.0.0.1:`port` relayed to PostgreSQL, byte for byte, until `silence()`."""

    def __init__(self, target: tuple[str, int] = POSTGRES) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.relaying = threading.Event()
        self.relaying.set()
        self.sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        """From now on nothing is relayed either way, and new connections are
        accepted and left unanswered; the kernel still acknowledges."""
        self.relaying.clear()

    def resume(self) -> None:
        self.relaying.set()

    def close(self) -> None:
        self.relaying.set()
        self.listener.close()
        for sock in list(self.sockets):
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.sockets.add(client)
        self.relaying.wait()
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            _close(client)
            return
        self.sockets.add(upstream)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(
                target=self._pump, args=(source, sink), daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                self.relaying.wait()
                data = source.recv(65536)
                if not data:
                    break
                self.relaying.wait()  # what arrived while silent is held back
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            _close(sock)
            self.sockets.discard(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@contextmanager
def forwarder(target: tuple[str, int] = POSTGRES) -> Iterator[Forwarder]:
    relay = Forwarder(target)
    try:
        yield relay
    finally:
        relay.close()


@contextmanager
def tarpit() -> Iterator[int]:
    """A port whose connections the kernel accepts and no one ever reads."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        yield listener.getsockname()[1]


def iptables_usable() -> bool:
    if shutil.which("iptables") is None or os.geteuid() != 0:
        return False
    listed = subprocess.run(
        ["iptables", "-w", "-L", "INPUT", "-n"], check=False, capture_output=True
    )
    return listed.returncode == 0


@contextmanager
def partition(port: int) -> Iterator[None]:
    """Every packet to or from `port` dropped on arrival (loopback included):
    the sender sees no refusal and no answer, as across a broken network."""
    tag = f"extraction-jobs-test-{os.getpid()}-{port}"
    rules = [
        ["-p", "tcp", "--dport", str(port), "-m", "comment", "--comment", tag],
        ["-p", "tcp", "--sport", str(port), "-m", "comment", "--comment", tag],
    ]
    added = []
    try:
        for rule in rules:
            subprocess.run(
                ["iptables", "-w", "-I", "INPUT", *rule, "-j", "DROP"], check=True
            )
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(
                ["iptables", "-w", "-D", "INPUT", *rule, "-j", "DROP"], check=False
            )


def rules_left(port: int) -> str:
    """The INPUT rules still naming `port` (none, after `partition`)."""
    listed = subprocess.run(
        ["iptables", "-w", "-S", "INPUT"], check=True, capture_output=True, text=True
    )
    return "\n".join(line for line in listed.stdout.splitlines() if str(port) in line)


class PgBouncer:
    """PgBouncer in transaction mode in front of 127.0.0.1:5432, serving
    `dbname` as the database `alias`, with at most `pool_size` server
    connections. Clients log in as anyone (and PgBouncer as `user`), or with
    `scram_users` ({name: stored SCRAM verifier}) only those, by password."""

    def __init__(
        self,
        dbname: str,
        alias: str,
        pool_size: int = 4,
        user: str = "postgres",
        scram_users: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.alias = alias
        # Not under pytest's root-only tmp: PgBouncer will not run as root,
        # and drops to `postgres` when started as root.
        self.dir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.config = self.dir / "pgbouncer.ini"
        login = f" user={user}"
        auth = "auth_type = any"
        if scram_users is not None:
            login = ""
            users = self.dir / "userlist.txt"
            users.write_text(
                "".join(
                    f'"{name}" "{secret}"\n' for name, secret in scram_users.items()
                )
            )
            auth = f"auth_type = scram-sha-256\nauth_file = {users}"
        self.config.write_text(
            f"""[databases]
{alias} = host={POSTGRES[0]} port={POSTGRES[1]} dbname={dbname}{login}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
{auth}
pool_mode = transaction
default_pool_size = {pool_size}
max_db_connections = {pool_size}
max_client_conn = 500
; a client waiting this long for a server connection gets an error, not a hang
query_wait_timeout = 5
logfile = {self.dir / "pgbouncer.log"}
pidfile = {self.dir / "pgbouncer.pid"}
"""
        )
        self.process: subprocess.Popen | None = None

    def url(self, user: str = "app") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{self.alias}"

    def start(self) -> "PgBouncer":
        command = ["pgbouncer", str(self.config)]
        if os.geteuid() == 0:
            os.chown(self.dir, pwd.getpwnam("postgres").pw_uid, -1)
            for path in self.dir.iterdir():
                os.chmod(path, 0o644)
            command[1:1] = ["-u", "postgres"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_for_port(self.port, self.process, lambda: self.log())
        return self

    def log(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for_port(port: int, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited {process.returncode}:\n{log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after 30 s:\n{log()}")


class Uvicorn:
    """`uvicorn main:app` processes on free ports, with `env` added."""

    def __init__(self, count: int, env: dict[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, "AUTH_DISABLED": "1", **env}
        self.log_dir = log_dir
        self.ports = [free_port() for _ in range(count)]
        self.processes: list[subprocess.Popen] = []

    def start(self) -> "Uvicorn":
        for port in self.ports:
            log = open(self.log_dir / f"uvicorn-{port}.log", "w")  # noqa: SIM115
            command = [sys.executable, "-m", "uvicorn", "main:app"]
            command += ["--host", "127.0.0.1", "--port", str(port)]
            command += ["--log-level", "warning", "--no-access-log"]
            self.processes.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=self.env, stdout=log, stderr=log
                )
            )
        for port, process in zip(self.ports, self.processes, strict=True):
            wait_for_port(port, process, lambda port=port: self.log(port))
        return self

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def log(self, port: int) -> str:
        return (self.log_dir / f"uvicorn-{port}.log").read_text()

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def clients(urls: list[str]) -> list[httpx.Client]:
    return [httpx.Client(base_url=url, timeout=60) for url in urls]
