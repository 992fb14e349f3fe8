"""The key store: API keys, their limits and their usage, in one SQLite file.

The only SQL in the package. Only a SHA-256 hash of each secret is stored: secrets are 256
random bits, so a fast hash is as safe as a slow one and keeps lookups cheap. WAL mode lets
the proxy read while the CLI writes; every write is one transaction.

The schema grows by numbered steps (``MIGRATIONS``); ``PRAGMA user_version`` says how many a
file has had. Every opener brings the file up to date, each step in one write transaction that
re-reads the version first, so concurrent openers apply each step exactly once. Steps only add
columns and tables, so older code still reads a newer file (a rollback keeps working).
"""

import contextlib
import datetime
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

SECRET_PREFIX = "sk-app-"
PERIODS = ("day", "month")
SETTINGS = ("rpm", "tpm", "expires_days", "max_concurrent", "weight", "models", "quota_tokens",
            "quota_period")
KEY_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,64}")


class StoreUnavailable(Exception):
    """The store cannot answer (missing, locked, unreadable): callers fail closed."""


class KeyExists(Exception):
    pass


class UnknownKey(Exception):
    pass


@dataclass(frozen=True)
class Key:
    """One key's record. ``None`` in a limit means no limit; ``models`` None means every model."""

    name: str
    hint: str
    rpm: int | None
    tpm: int | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    max_concurrent: int | None = None
    weight: float = 1.0
    models: frozenset[str] | None = None
    quota_tokens: int | None = None
    quota_period: str = "month"

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class Usage:
    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class KeyReport:
    """A key's settings, its usage since it was made, and its tokens in the current period."""

    key: Key
    total: Usage
    period: str
    period_tokens: int

    @property
    def quota_left(self) -> int | None:
        if self.key.quota_tokens is None:
            return None
        return max(0, self.key.quota_tokens - self.period_tokens)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def period_start(period: str, now: float) -> datetime.datetime:
    """The start of the UTC calendar day or month that ``now`` falls in."""
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if period == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"quota period must be one of {', '.join(PERIODS)}, not {period!r}")


def period_label(period: str, now: float) -> str:
    """The name of the period ``now`` falls in: '2026-11-24' for a day, '2026-11' for a month."""
    return period_start(period, now).strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


def period_end(period: str, now: float) -> float:
    """Epoch seconds when the period ``now`` falls in ends: when a spent quota comes back."""
    start = period_start(period, now)
    if period == "day":
        return (start + datetime.timedelta(days=1)).timestamp()
    year, month = divmod(start.month, 12)
    return start.replace(year=start.year + year, month=month + 1).timestamp()


def _count(option: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, not {value!r}")
    return value


def _positive(option: str, value: object) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{option} must be a number greater than 0, not {value!r}")
    return float(value)


def _models(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Collection):
        raise ValueError(f"models must be a collection of model names, not {value!r}")
    names = set(value)
    if not names:
        raise ValueError("models must name at least one model (None means every model)")
    for name in names:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"a model name must be non-empty text without surrounding "
                             f"spaces, not {name!r}")
    return json.dumps(sorted(names))


def _period(value: object) -> str:
    if value not in PERIODS:
        raise ValueError(f"quota period must be one of {', '.join(PERIODS)}, not {value!r}")
    return str(value)


def setting_columns(changes: Mapping[str, object], now: float) -> dict[str, object]:
    """Validated settings -> the ``keys`` columns they set; ValueError names what is wrong.

    None clears a limit (weight and quota_period always have a value). ``expires_days``
    counts from ``now``: on ``update`` it renews a key from today.
    """
    columns: dict[str, object] = {}
    for option, value in changes.items():
        if option in ("rpm", "tpm", "max_concurrent", "quota_tokens"):
            columns[option] = _count(option, value)
        elif option == "expires_days":
            columns["expires_at"] = (None if value is None
                                     else now + 86400 * _positive(option, value))
        elif option == "weight":
            columns["weight"] = _positive(option, value)
        elif option == "models":
            columns["models"] = _models(value)
        elif option == "quota_period":
            columns["quota_period"] = _period(value)
        else:
            raise ValueError(f"unknown key setting {option!r}; known: {', '.join(SETTINGS)}")
    return columns


def check_key_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name):
        raise ValueError(f"a key name is 1 to 64 characters without spaces, not {name!r}")
    return name


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


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_create_v1, _add_tenancy)
SCHEMA_VERSION = len(MIGRATIONS)

KEY_FIELDS = ("name", "hint", "rpm", "tpm", "created_at", "expires_at", "revoked_at",
              "max_concurrent", "weight", "models", "quota_tokens", "quota_period")
KEY_COLUMNS = ", ".join(KEY_FIELDS)


def _key(row: tuple) -> Key:
    *head, models, quota_tokens, quota_period = row
    allowed = None if models is None else frozenset(json.loads(models))
    return Key(*head, models=allowed, quota_tokens=quota_tokens, quota_period=quota_period)


def schema_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


class KeyStore:
    """One connection to the store; open one per thread that uses it."""

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
        return _key(row)

    def all_keys(self) -> list[Key]:
        rows = self.db.execute(f"SELECT {KEY_COLUMNS} FROM keys ORDER BY created_at")
        return [_key(row) for row in rows]

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
        return _key(row[1:])

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
        day, month = period_label("day", now), period_label("month", now)
        query = (
            f"SELECT {', '.join('k.' + field for field in KEY_FIELDS)},"
            " COALESCE(u.requests, 0), COALESCE(u.prompt_tokens, 0),"
            " COALESCE(u.completion_tokens, 0),"
            " COALESCE(p.prompt_tokens + p.completion_tokens, 0)"
            " FROM keys k LEFT JOIN usage u ON u.name = k.name"
            " LEFT JOIN period_usage p ON p.name = k.name"
            " AND p.period = CASE k.quota_period WHEN 'day' THEN ? ELSE ? END"
        )
        args: tuple = (day, month)
        if name is not None:
            query += " WHERE k.name = ?"
            args = (*args, name)
        rows = self.db.execute(query + " ORDER BY k.created_at", args).fetchall()
        if name is not None and not rows:
            raise UnknownKey(f"no key named {name!r}")
        reports = []
        for row in rows:
            key = _key(row[:len(KEY_FIELDS)])
            requests, prompt, completion, period_tokens = row[len(KEY_FIELDS):]
            reports.append(KeyReport(key, Usage(key.name, requests, prompt, completion),
                                     day if key.quota_period == "day" else month,
                                     period_tokens))
        return reports
