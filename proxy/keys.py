"""The key store: API keys, their limits and their usage, in one SQLite file.

The only SQL in the package. Only a SHA-256 hash of each secret is stored: secrets are 256
random bits, so a fast hash is as safe as a slow one and keeps lookups cheap. WAL mode lets
the proxy read while the CLI writes; every write is one transaction.
"""

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SECRET_PREFIX = "sk-app-"

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name        TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL UNIQUE,
    hint        TEXT NOT NULL,
    rpm         INTEGER,
    tpm         INTEGER,
    created_at  REAL NOT NULL,
    expires_at  REAL,
    revoked_at  REAL
);
CREATE TABLE IF NOT EXISTS usage (
    name              TEXT PRIMARY KEY,
    requests          INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    updated_at        REAL
);
"""


class StoreUnavailable(Exception):
    """The store cannot answer (missing, locked, unreadable): callers fail closed."""


class KeyExists(Exception):
    pass


class UnknownKey(Exception):
    pass


@dataclass(frozen=True)
class Key:
    name: str
    hint: str
    rpm: int | None
    tpm: int | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class Usage:
    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


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
            if create:
                self.db.executescript(SCHEMA)
                os.chmod(self.path, 0o600)
            self.inode = os.stat(self.path).st_ino
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"key store {self.path}: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def still_there(self) -> bool:
        """False once the file was removed or replaced under an open connection."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def create(self, name: str, rpm: int | None = None, tpm: int | None = None,
               expires_days: float | None = None) -> str:
        """Add a key and return its secret: the only time the secret exists outside a client."""
        secret = new_secret()
        now = time.time()
        expires = now + expires_days * 86400 if expires_days else None
        try:
            self.db.execute(
                "INSERT INTO keys (name, secret_hash, hint, rpm, tpm, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, hash_secret(secret), secret[-4:], rpm, tpm, now, expires),
            )
        except sqlite3.IntegrityError as exc:
            raise KeyExists(f"a key named {name!r} already exists") from exc
        return secret

    def revoke(self, name: str) -> None:
        cur = self.db.execute(
            "UPDATE keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (time.time(), name),
        )
        if cur.rowcount == 0:
            raise UnknownKey(f"no active key named {name!r}")

    def all_keys(self) -> list[Key]:
        rows = self.db.execute(
            "SELECT name, hint, rpm, tpm, created_at, expires_at, revoked_at"
            " FROM keys ORDER BY created_at"
        )
        return [Key(*row) for row in rows]

    def lookup(self, secret: str) -> Key | None:
        """The key for ``secret``, usable or not; None when no key has that secret."""
        digest = hash_secret(secret)
        try:
            row = self.db.execute(
                "SELECT secret_hash, name, hint, rpm, tpm, created_at, expires_at, revoked_at"
                " FROM keys WHERE secret_hash = ?",
                (digest,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"key store: {exc}") from exc
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        return Key(*row[1:])

    def add_usage(self, totals: Iterable[tuple[str, int, int, int]]) -> None:
        """Add (name, requests, prompt_tokens, completion_tokens) rows in one transaction."""
        now = time.time()
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany(
                    "INSERT INTO usage (name, requests, prompt_tokens, completion_tokens,"
                    " updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                    " requests = requests + excluded.requests,"
                    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                    " completion_tokens = completion_tokens + excluded.completion_tokens,"
                    " updated_at = excluded.updated_at",
                    [(*row, now) for row in totals],
                )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"key store: {exc}") from exc

    def usage(self, name: str | None = None) -> list[Usage]:
        query = (
            "SELECT k.name, COALESCE(u.requests, 0), COALESCE(u.prompt_tokens, 0),"
            " COALESCE(u.completion_tokens, 0) FROM keys k LEFT JOIN usage u ON u.name = k.name"
        )
        args: tuple = ()
        if name is not None:
            query += " WHERE k.name = ?"
            args = (name,)
        rows = self.db.execute(query + " ORDER BY k.created_at", args).fetchall()
        if name is not None and not rows:
            raise UnknownKey(f"no key named {name!r}")
        return [Usage(*row) for row in rows]
