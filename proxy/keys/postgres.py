"""The key store in PostgreSQL, shared by every appliance behind one load balancer.

The only PostgreSQL SQL in the package. A pool of connections (``APPLIANCE_KEYS_POOL_SIZE``)
serves the threads the gateway runs store calls in; each call is one transaction, and a
connection the server dropped is replaced on the next checkout, so a restarted server is
used again without a gateway restart.

The schema grows by numbered steps (``MIGRATIONS``), recorded in ``appliance_schema``. An
upgrade takes a transaction-scoped advisory lock, re-reads the version and applies the missing
steps in that one transaction: appliances starting together apply each step exactly once, and
a failed step leaves the schema as it was. Steps only add columns and tables.
"""

import contextlib
import hmac
import time
from collections.abc import Iterable, Iterator

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .jobs import BATCH_TABLES_POSTGRES, JobTables, PostgresTx
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

# pg_advisory_xact_lock's key for schema upgrades: 'appl' in ASCII.
MIGRATION_LOCK = 0x6170706C

# Version 1: keys with every tenancy setting, usage since creation, usage per day and month.
V1_SCHEMA = (
    """CREATE TABLE keys (
        name           text PRIMARY KEY,
        secret_hash    bytea NOT NULL UNIQUE,
        hint           text NOT NULL,
        rpm            integer CHECK (rpm > 0),
        tpm            integer CHECK (tpm > 0),
        created_at     double precision NOT NULL,
        expires_at     double precision,
        revoked_at     double precision,
        max_concurrent integer CHECK (max_concurrent > 0),
        weight         double precision NOT NULL DEFAULT 1 CHECK (weight > 0),
        models         text,
        quota_tokens   bigint CHECK (quota_tokens > 0),
        quota_period   text NOT NULL DEFAULT 'month' CHECK (quota_period IN ('day', 'month'))
    )""",
    """CREATE TABLE usage (
        name              text PRIMARY KEY,
        requests          bigint NOT NULL DEFAULT 0,
        prompt_tokens     bigint NOT NULL DEFAULT 0,
        completion_tokens bigint NOT NULL DEFAULT 0,
        updated_at        double precision
    )""",
    """CREATE TABLE period_usage (
        name              text NOT NULL,
        period            text NOT NULL,
        requests          bigint NOT NULL DEFAULT 0,
        prompt_tokens     bigint NOT NULL DEFAULT 0,
        completion_tokens bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (name, period)
    )""",
)
# Version 2: keys in one cache group share the engine's prefix cache.
V2_CACHE_GROUP = (f"ALTER TABLE keys ADD COLUMN IF NOT EXISTS {CACHE_GROUP_COLUMN}",)
# Version 3: the Batches API's files, jobs and line results (``jobs``): only new tables.
MIGRATIONS: tuple[tuple[str, ...], ...] = (V1_SCHEMA, V2_CACHE_GROUP, BATCH_TABLES_POSTGRES)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: psycopg.Connection) -> int:
    """The version the database is at; 0 before the first upgrade."""
    if conn.execute("SELECT to_regclass('appliance_schema')").fetchone()[0] is None:
        return 0
    row = conn.execute("SELECT max(version) FROM appliance_schema").fetchone()
    return row[0] or 0


class PostgresKeyStore:
    """A pool of connections to one database; safe to share between threads."""

    def __init__(self, url: str, pool_size: int = 4, timeout_s: float = 5.0) -> None:
        self.pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, timeout=timeout_s, open=False,
            check=ConnectionPool.check_connection, name="appliance-keys",
            kwargs={"connect_timeout": max(2, round(timeout_s))},
        )
        self.pool.open()
        try:
            self.migrate()
        except BaseException:
            self.pool.close()
            raise

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """One transaction on a pooled connection; a server that cannot answer is unavailable."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise StoreUnavailable(f"key store: {exc}") from exc

    def migrate(self) -> None:
        """Bring the database to ``SCHEMA_VERSION``: a read and nothing more when it is there."""
        with self.connection() as conn:
            if schema_version(conn) >= SCHEMA_VERSION:
                return
        with self.connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS appliance_schema (version integer NOT NULL)")
            current = schema_version(conn)
            for version, statements in enumerate(MIGRATIONS, start=1):
                if current < version:
                    for statement in statements:
                        conn.execute(statement)
            conn.execute("DELETE FROM appliance_schema")
            conn.execute("INSERT INTO appliance_schema (version) VALUES (%s)",
                         (max(current, SCHEMA_VERSION),))

    def close(self) -> None:
        self.pool.close()

    def jobs(self) -> JobTables:
        """The batch tables over this pool (safe to share between threads)."""

        @contextlib.contextmanager
        def transaction() -> Iterator[PostgresTx]:
            with self.connection() as conn:
                yield PostgresTx(conn)

        return JobTables(transaction)

    def still_there(self) -> bool:
        return True

    def create(self, name: str, rpm: int | None = None, tpm: int | None = None,
               expires_days: float | None = None, **settings: object) -> str:
        now = time.time()
        columns = setting_columns(
            {"rpm": rpm, "tpm": tpm, "expires_days": expires_days, **settings}, now)
        secret = new_secret()
        columns.update(name=check_key_name(name), secret_hash=hash_secret(secret),
                       hint=secret[-4:], created_at=now)
        with self.connection() as conn:
            try:
                conn.execute(
                    f"INSERT INTO keys ({', '.join(columns)})"
                    f" VALUES ({', '.join(['%s'] * len(columns))})",
                    tuple(columns.values()),
                )
            except psycopg.errors.UniqueViolation as exc:
                raise KeyExists(f"a key named {name!r} already exists") from exc
        return secret

    def update(self, name: str, **changes: object) -> Key:
        columns = setting_columns(changes, time.time())
        if not columns:
            raise ValueError("nothing to change")
        assignments = ", ".join(f"{column} = %s" for column in columns)
        with self.connection() as conn:
            row = conn.execute(
                f"UPDATE keys SET {assignments} WHERE name = %s AND revoked_at IS NULL"
                f" RETURNING {KEY_COLUMNS}",
                (*columns.values(), name),
            ).fetchone()
        if row is None:
            raise UnknownKey(f"no active key named {name!r}")
        return key_from_row(row)

    def revoke(self, name: str) -> None:
        with self.connection() as conn:
            cur = conn.execute(
                "UPDATE keys SET revoked_at = %s WHERE name = %s AND revoked_at IS NULL",
                (time.time(), name),
            )
        if cur.rowcount == 0:
            raise UnknownKey(f"no active key named {name!r}")

    def get(self, name: str) -> Key:
        with self.connection() as conn:
            row = conn.execute(f"SELECT {KEY_COLUMNS} FROM keys WHERE name = %s",
                               (name,)).fetchone()
        if row is None:
            raise UnknownKey(f"no key named {name!r}")
        return key_from_row(row)

    def all_keys(self) -> list[Key]:
        with self.connection() as conn:
            rows = conn.execute(f"SELECT {KEY_COLUMNS} FROM keys ORDER BY created_at").fetchall()
        return [key_from_row(row) for row in rows]

    def lookup(self, secret: str) -> Key | None:
        digest = hash_secret(secret)
        with self.connection() as conn:
            row = conn.execute(
                f"SELECT secret_hash, {KEY_COLUMNS} FROM keys WHERE secret_hash = %s",
                (digest,),
            ).fetchone()
        if row is None or not hmac.compare_digest(bytes(row[0]), digest):
            return None
        return key_from_row(row[1:])

    def add_usage(self, totals: Iterable[tuple[str, int, int, int]]) -> None:
        """Add (name, requests, prompt_tokens, completion_tokens) rows in one transaction."""
        now = time.time()
        rows = list(totals)
        periods = [period_label(period, now) for period in PERIODS]
        with self.connection() as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO usage (name, requests, prompt_tokens, completion_tokens,"
                " updated_at) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET"
                " requests = usage.requests + excluded.requests,"
                " prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = usage.completion_tokens + excluded.completion_tokens,"
                " updated_at = excluded.updated_at",
                [(*row, now) for row in rows],
            )
            cur.executemany(
                "INSERT INTO period_usage (name, period, requests, prompt_tokens,"
                " completion_tokens) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (name, period) DO UPDATE SET"
                " requests = period_usage.requests + excluded.requests,"
                " prompt_tokens = period_usage.prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = period_usage.completion_tokens"
                " + excluded.completion_tokens",
                [(name, period, *counts) for name, *counts in rows for period in periods],
            )

    def period_usage(self, name: str, period: str) -> int:
        with self.connection() as conn:
            row = conn.execute(
                "SELECT prompt_tokens + completion_tokens FROM period_usage"
                " WHERE name = %s AND period = %s",
                (name, period),
            ).fetchone()
        return row[0] if row else 0

    def usage(self, name: str | None = None) -> list[Usage]:
        return [report.total for report in self.reports(name)]

    def report(self, name: str, now: float | None = None) -> KeyReport:
        return self.reports(name, now)[0]

    def reports(self, name: str | None = None, now: float | None = None) -> list[KeyReport]:
        now = time.time() if now is None else now
        query, args, day, month = reports_query(name, now, "%s")
        with self.connection() as conn:
            rows = conn.execute(query, args).fetchall()
        if name is not None and not rows:
            raise UnknownKey(f"no key named {name!r}")
        return [report_from_row(row, day, month) for row in rows]
