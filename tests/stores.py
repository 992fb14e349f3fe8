"""Real PostgreSQL and Redis servers from Debian's packages, on loopback and free ports.

Each can be killed (as a crash would) and started again on the same port and data, so tests
can take a store away mid-load and bring it back. PostgreSQL refuses to run as root: as root
its files belong to, and it runs as, the ``postgres`` user the Debian package makes.
"""

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port


def postgres_bin() -> Path:
    """Debian installs each major version under /usr/lib/postgresql/N/bin; take the newest."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    return found[-1].parent


def as_postgres_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout}s")


@dataclass
class Postgres:
    port: int
    datadir: Path
    proc: subprocess.Popen | None = None
    databases: list[str] = field(default_factory=list)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://appliance@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        argv = [*as_postgres_user(), str(postgres_bin() / "postgres"), "-D", str(self.datadir),
                "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                "-c", f"unix_socket_directories={self.datadir}", "-c", "fsync=off",
                "-c", "max_connections=200"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_until(self.ready, 30, "PostgreSQL did not accept connections")

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.proc.returncode}")
        out = subprocess.run([str(postgres_bin() / "pg_isready"), "-q", "-h", "127.0.0.1",
                              "-p", str(self.port)], check=False)
        return out.returncode == 0

    def kill(self) -> None:
        """Stop as a crash does: SIGQUIT is PostgreSQL's immediate shutdown, no checkpoint."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGQUIT)
        self.proc.wait(30)

    def new_database(self) -> str:
        """A fresh, empty database's URL: each test gets its own."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        self.databases.append(name)
        return self.url(name)


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    base = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
    datadir = base / "data"
    datadir.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (base, datadir):
            os.chown(path, user.pw_uid, user.pw_gid)
    subprocess.run([*as_postgres_user(), str(postgres_bin() / "initdb"), "-D", str(datadir),
                    "-U", "appliance", "-A", "trust", "--no-sync", "-E", "UTF8"],
                   check=True, capture_output=True)
    server = Postgres(free_port(), datadir)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Redis:
    port: int
    workdir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.ready, 30, "Redis did not answer PING")

    def ready(self) -> bool:
        import redis

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL: nothing saved (no persistence), as a lost Redis node."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()


@contextlib.contextmanager
def redis_server() -> Iterator[Redis]:
    with tempfile.TemporaryDirectory(prefix="appliance-redis-") as workdir:
        server = Redis(free_port(), Path(workdir))
        server.start()
        try:
            yield server
        finally:
            server.kill()
