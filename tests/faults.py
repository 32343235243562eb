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
import select
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


def tool(name: str) -> str | None:
    """Where a Debian tool is, /usr/sbin included (not on every PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@contextmanager
def app_role(url: str, role: str, connection_limit: int | None = None) -> Iterator[str]:
    """`role` as the migration function makes the application's (grants and
    session defaults), logging in without a password as on this server, with
    `connection_limit` connections at most; gone again afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    import database
    import migration
    import settings

    admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)

    def drop() -> None:
        database.reset_engines()
        with admin.connect() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE usename = :role"
                ),
                {"role": role},
            )
            if connection.execute(
                text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role}
            ).scalar():
                connection.execute(text(f'DROP OWNED BY "{role}"'))
                connection.execute(text(f'DROP ROLE "{role}"'))

    drop()
    with admin.begin() as connection:
        connection.execute(
            text(
                "DO $$ BEGIN CREATE ROLE rds_iam NOLOGIN; "  # RDS's, stood in for
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
        )
        migration.grant_app_role(
            connection, role, database.session_settings(settings.settings_from_env())
        )
        if connection_limit is not None:
            connection.execute(
                text(f'ALTER ROLE "{role}" CONNECTION LIMIT {int(connection_limit)}')
            )
    try:
        yield role
    finally:
        drop()
        admin.dispose()


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
    if tool("iptables") is None or os.geteuid() != 0:
        return False
    listed = subprocess.run(
        [tool("iptables"), "-w", "-L", "INPUT", "-n"], check=False, capture_output=True
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
                [tool("iptables"), "-w", "-I", "INPUT", *rule, "-j", "DROP"], check=True
            )
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(
                [tool("iptables"), "-w", "-D", "INPUT", *rule, "-j", "DROP"],
                check=False,
            )


def rules_left(port: int) -> str:
    """The INPUT rules still naming `port` (none, after `partition`)."""
    listed = subprocess.run(
        [tool("iptables"), "-w", "-S", "INPUT"],
        check=True,
        capture_output=True,
        text=True,
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
        command = [tool("pgbouncer") or "pgbouncer", str(self.config)]
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


class TlsTerminator(Forwarder):
    """A forwarder that speaks TLS to the client, as PostgreSQL does after an
    SSLRequest, with `certificate`/`key` (PEM files), and relays the
    decrypted stream to the plain server."""

    SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    GSS_REQUEST = (8).to_bytes(4, "big") + (80877104).to_bytes(4, "big")

    def __init__(self, certificate: Path, key: Path) -> None:
        import ssl

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificate, key)
        self.handshakes = 0
        super().__init__()

    def _serve(self, client: socket.socket) -> None:
        import ssl

        try:
            request = _read_exactly(client, 8)
            if request == self.GSS_REQUEST:  # no GSSAPI here: ask again
                client.sendall(b"N")
                request = _read_exactly(client, 8)
            if request != self.SSL_REQUEST:
                raise OSError("the client did not ask for TLS")
            client.sendall(b"S")
            secured = self.context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            _close(client)  # a refused certificate ends here
            return
        self.handshakes += 1
        upstream = socket.create_connection(self.target)
        # One thread for both directions: an SSL socket is not to be read
        # and written from two threads at once.
        try:
            while True:
                ready = [secured] if secured.pending() else []
                ready = ready or select.select([secured, upstream], [], [])[0]
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is secured else secured).sendall(data)
        except (OSError, ssl.SSLError):
            return
        finally:
            _close(secured)
            _close(upstream)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def certificate_authority(directory: Path, name: str) -> tuple[Path, object, object]:
    """A self-signed CA: its PEM file, its certificate and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _days(1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path, certificate, key


def server_certificate(
    directory: Path, authority: tuple[Path, object, object], host: str
) -> tuple[Path, Path]:
    """A certificate for `host` (an IP address or a DNS name) signed by
    `authority`: its PEM file and its key's."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    _, ca_certificate, ca_key = authority
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        alternative = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alternative = x509.DNSName(host)
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _days(1))
        .add_extension(x509.SubjectAlternativeName([alternative]), False)
        .sign(ca_key, hashes.SHA256())
    )
    certificate_path = directory / f"{host}.pem"
    key_path = directory / f"{host}.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate_path, key_path


def _now():
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) - timedelta(minutes=5)


def _days(count: int):
    from datetime import timedelta

    return timedelta(days=count)
