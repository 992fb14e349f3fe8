"""The key store in one SQLite file: the single-box default, and the only SQLite SQL.

WAL mode lets the proxy read while the CLI writes; every write is one transaction.

The schema grows by numbered steps (``MIGRATIONS``); ``PRAGMA user_version`` says how many a
file has had. Every opener brings the file up to date, each step in one write transaction that
re-reads the version first, so concurrent openers apply each step exactly once. Steps only add
columns and tables, so older code still reads a newer file (a rollback keeps working).
"""

import contextlib
import hmac
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .jobs import BATCH_TABLES_SQLITE, JobTables, SqliteTx
from .store import (
    CACHE_GROUP_COLUMN,
    KEY_COLUMNS,
    PERIODS,
    Key,
    KeyExists,
    KeyReport,
    StoreUnavailable,
    UnknownKey,
    Usage,
    check_key_name,
    hash_secret,
    key_from_row,
    new_secret,
    period_label,
    report_from_row,
    reports_query,
    setting_columns,
)

# Version 1: the schema before per-key tenancy controls (no user_version was set then).
V1_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS keys (
        name        TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL UNIQUE,
        hint        TEXT NOT NULL,
        rpm         INTEGER,
        tpm         INTEGER,
        created_at  REAL NOT NULL,
        expires_at  REAL,
        revoked_at  REAL
    )""",
    """CREATE TABLE IF NOT EXISTS usage (
        name              TEXT PRIMARY KEY,
        requests          INTEGER NOT NULL DEFAULT 0,
        prompt_tokens     INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        updated_at        REAL
    )""",
)

# Version 2: per-key concurrency, fair-share weight, allowed models, and a token quota per
# calendar period, with usage kept per period ('2026-11-24' and '2026-11' rows for each key).
V2_KEY_COLUMNS = {
    "max_concurrent": "INTEGER CHECK (max_concurrent > 0)",
    "weight": "REAL NOT NULL DEFAULT 1 CHECK (weight > 0)",
    "models": "TEXT",
    "quota_tokens": "INTEGER CHECK (quota_tokens > 0)",
    "quota_period": "TEXT NOT NULL DEFAULT 'month' CHECK (quota_period IN ('day', 'month'))",
}
V2_PERIOD_USAGE = """CREATE TABLE IF NOT EXISTS period_usage (
    name              TEXT NOT NULL,
    period            TEXT NOT NULL,
    requests          INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, period)
)"""


def _create_v1(db: sqlite3.Connection) -> None:
    for statement in V1_SCHEMA:
        db.execute(statement)


def _add_tenancy(db: sqlite3.Connection) -> None:
    present = {row[1] for row in db.execute("PRAGMA table_info(keys)")}
    for column, definition in V2_KEY_COLUMNS.items():
        if column not in present:
            db.execute(f"ALTER TABLE keys ADD COLUMN {column} {definition}")
    db.execute(V2_PERIOD_USAGE)


def _add_cache_group(db: sqlite3.Connection) -> None:
    """Version 3: keys in one cache group share the engine's prefix cache."""
    present = {row[1] for row in db.execute("PRAGMA table_info(keys)")}
    if "cache_group" not in present:
        db.execute(f"ALTER TABLE keys ADD COLUMN {CACHE_GROUP_COLUMN}")


def _add_batch_tables(db: sqlite3.Connection) -> None:
    """Version 4: the Batches API's files, jobs and line results (``jobs``): only new tables."""
    for statement in BATCH_TABLES_SQLITE:
        db.execute(statement)


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_create_v1, _add_tenancy,
                                                                _add_cache_group,
                                                                _add_batch_tables)
SCHEMA_VERSION = len(MIGRATIONS)

def schema_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


class SqliteKeyStore:
    """One connection to the file; open one per thread that uses it."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreUnavailable(f"key store {self.path} does not exist")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.migrate()
            if create:
                os.chmod(self.path, 0o600)
            self.inode = os.stat(self.path).st_ino
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"key store {self.path}: {exc}") from exc

    def migrate(self) -> None:
        """Bring the file to ``SCHEMA_VERSION``: a read and nothing more when it is there."""
        if schema_version(self.db) >= SCHEMA_VERSION:
            return
        for version, step in enumerate(MIGRATIONS, start=1):
            with self.transaction():
                if schema_version(self.db) < version:
                    step(self.db)
                    self.db.execute(f"PRAGMA user_version = {version}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction, taking the write lock at the start (no upgrade deadlocks)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def jobs(self) -> JobTables:
        """The batch tables on this connection (use it from one thread at a time)."""

        @contextlib.contextmanager
        def transaction() -> Iterator[SqliteTx]:
            try:
                with self.transaction():
                    yield SqliteTx(self.db)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"key store: {exc}") from exc

        return JobTables(transaction)

    def still_there(self) -> bool:
        """False once the file was removed or replaced under an open connection."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def create(self, name: str, rpm: int | None = None, tpm: int | None = None,
               expires_days: float | None = None, **settings: object) -> str:
        """Add a key and return its secret: the only time the secret exists outside a client.

        ``settings`` are any of max_concurrent, weight, models, quota_tokens, quota_period.
        """
        now = time.time()
        columns = setting_columns(
            {"rpm": rpm, "tpm": tpm, "expires_days": expires_days, **settings}, now)
        secret = new_secret()
        columns.update(name=check_key_name(name), secret_hash=hash_secret(secret),
                       hint=secret[-4:], created_at=now)
        try:
            self.db.execute(
                f"INSERT INTO keys ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                tuple(columns.values()),
            )
        except sqlite3.IntegrityError as exc:
            raise KeyExists(f"a key named {name!r} already exists") from exc
        return secret

    def update(self, name: str, **changes: object) -> Key:
        """Change settings of an unrevoked key; its usage is untouched. None clears a limit."""
        columns = setting_columns(changes, time.time())
        if not columns:
            raise ValueError("nothing to change")
        assignments = ", ".join(f"{column} = ?" for column in columns)
        with self.transaction():
            cur = self.db.execute(
                f"UPDATE keys SET {assignments} WHERE name = ? AND revoked_at IS NULL",
                (*columns.values(), name),
            )
            if cur.rowcount == 0:
                raise UnknownKey(f"no active key named {name!r}")
            return self.get(name)

    def revoke(self, name: str) -> None:
        cur = self.db.execute(
            "UPDATE keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (time.time(), name),
        )
        if cur.rowcount == 0:
            raise UnknownKey(f"no active key named {name!r}")

    def get(self, name: str) -> Key:
        row = self.db.execute(f"SELECT {KEY_COLUMNS} FROM keys WHERE name = ?",
                              (name,)).fetchone()
        if row is None:
            raise UnknownKey(f"no key named {name!r}")
        return key_from_row(row)

    def all_keys(self) -> list[Key]:
        rows = self.db.execute(f"SELECT {KEY_COLUMNS} FROM keys ORDER BY created_at")
        return [key_from_row(row) for row in rows]

    def lookup(self, secret: str) -> Key | None:
        """The key for ``secret``, usable or not; None when no key has that secret."""
        digest = hash_secret(secret)
        try:
            row = self.db.execute(
                f"SELECT secret_hash, {KEY_COLUMNS} FROM keys WHERE secret_hash = ?",
                (digest,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"key store: {exc}") from exc
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        return key_from_row(row[1:])

    def add_usage(self, totals: Iterable[tuple[str, int, int, int]]) -> None:
        """Add (name, requests, prompt_tokens, completion_tokens) rows in one transaction.

        Each row also goes to the key's current day and month, so a quota reads the right
        total whichever period the key has, and after its period is changed.
        """
        now = time.time()
        rows = list(totals)
        periods = [period_label(period, now) for period in PERIODS]
        try:
            with self.transaction():
                self.db.executemany(
                    "INSERT INTO usage (name, requests, prompt_tokens, completion_tokens,"
                    " updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                    " requests = requests + excluded.requests,"
                    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                    " completion_tokens = completion_tokens + excluded.completion_tokens,"
                    " updated_at = excluded.updated_at",
                    [(*row, now) for row in rows],
                )
                self.db.executemany(
                    "INSERT INTO period_usage (name, period, requests, prompt_tokens,"
                    " completion_tokens) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT(name, period) DO UPDATE SET"
                    " requests = requests + excluded.requests,"
                    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                    " completion_tokens = completion_tokens + excluded.completion_tokens",
                    [(name, period, *counts) for name, *counts in rows for period in periods],
                )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"key store: {exc}") from exc

    def period_usage(self, name: str, period: str) -> int:
        """Prompt + completion tokens ``name`` used in the period labelled ``period``."""
        try:
            row = self.db.execute(
                "SELECT prompt_tokens + completion_tokens FROM period_usage"
                " WHERE name = ? AND period = ?",
                (name, period),
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"key store: {exc}") from exc
        return row[0] if row else 0

    def usage(self, name: str | None = None) -> list[Usage]:
        return [report.total for report in self.reports(name)]

    def report(self, name: str, now: float | None = None) -> KeyReport:
        """One key's settings and usage (what ``appliance-keys show`` prints)."""
        return self.reports(name, now)[0]

    def reports(self, name: str | None = None, now: float | None = None) -> list[KeyReport]:
        """Settings and usage of every key, or of ``name``; periods are those ``now`` is in."""
        now = time.time() if now is None else now
        query, args, day, month = reports_query(name, now, "?")
        rows = self.db.execute(query, args).fetchall()
        if name is not None and not rows:
            raise UnknownKey(f"no key named {name!r}")
        return [report_from_row(row, day, month) for row in rows]
