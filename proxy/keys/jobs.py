"""The Batches API's tables in the key store's database: the one SQL of them, for both backends.

Batch jobs live beside the keys they belong to, so a fleet's PostgreSQL store and a box's
SQLite file hold them alike, and a restarted gateway finds them where it left them. The tables
come from a numbered schema step in each backend (``BATCH_TABLES_SQLITE`` / ``_POSTGRES``),
which only adds tables. The statements are written once with ``?`` placeholders; a backend's
``Tx`` runs them (PostgreSQL's swaps in ``%s``).

Durability rests on three statements:

* ``record_results`` inserts finished lines' results under the primary key (batch, line) and
  does nothing for a row that is there: a line is written once, however often it is reported.
* ``claim``/``renew`` hold a batch with a lease (holder, until): a runner works only on a
  batch it holds, and one whose holder died is taken over once its lease has run out.
* ``move`` changes a status only from the status read (compare-and-set), so a cancel and a
  runner's own move cannot both win.
"""

import contextlib
import json
from collections.abc import Callable
from typing import NamedTuple, Protocol

BATCH_TABLES_SQLITE = (
    """CREATE TABLE IF NOT EXISTS batch_files (
        id          TEXT PRIMARY KEY,
        owner       TEXT NOT NULL,
        purpose     TEXT NOT NULL,
        filename    TEXT NOT NULL,
        bytes       INTEGER NOT NULL,
        lines       INTEGER NOT NULL,
        created_at  REAL NOT NULL,
        node        TEXT NOT NULL,
        deleted_at  REAL
    )""",
    """CREATE TABLE IF NOT EXISTS batches (
        id                TEXT PRIMARY KEY,
        owner             TEXT NOT NULL,
        node              TEXT NOT NULL,
        input_file_id     TEXT NOT NULL,
        endpoint          TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        metadata          TEXT,
        status            TEXT NOT NULL,
        total             INTEGER NOT NULL,
        created_at        REAL NOT NULL,
        expires_at        REAL NOT NULL,
        in_progress_at    REAL,
        finalizing_at     REAL,
        completed_at      REAL,
        failed_at         REAL,
        expired_at        REAL,
        cancelling_at     REAL,
        cancelled_at      REAL,
        output_file_id    TEXT,
        error_file_id     TEXT,
        errors            TEXT,
        lease_holder      TEXT,
        lease_until       REAL
    )""",
    "CREATE INDEX IF NOT EXISTS batches_by_owner ON batches (owner, created_at)",
    """CREATE TABLE IF NOT EXISTS batch_results (
        batch_id          TEXT NOT NULL,
        line              INTEGER NOT NULL,
        custom_id         TEXT NOT NULL,
        status_code       INTEGER NOT NULL,
        result            TEXT NOT NULL,
        prompt_tokens     INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        finished_at       REAL NOT NULL,
        PRIMARY KEY (batch_id, line)
    )""",
)
BATCH_TABLES_POSTGRES = tuple(
    statement.replace("INTEGER", "bigint").replace("REAL", "double precision")
    .replace("TEXT", "text") for statement in BATCH_TABLES_SQLITE)

FILE_COLUMNS = "id, owner, purpose, filename, bytes, lines, created_at, node"
BATCH_COLUMNS = ("id, owner, node, input_file_id, endpoint, completion_window, metadata, status,"
                 " total, created_at, expires_at, in_progress_at, finalizing_at, completed_at,"
                 " failed_at, expired_at, cancelling_at, cancelled_at, output_file_id,"
                 " error_file_id, errors")
TIMED = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
         "cancelled")


class Tx(Protocol):
    """One transaction of a backend."""

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]: ...

    def run(self, sql: str, args: tuple = ()) -> int:
        """Run one statement; the rows it changed."""
        ...


SUCCEEDED = "status_code BETWEEN 200 AND 299"
"""A result that goes to the output file (``batch.lines.succeeded``); the rest are errors."""


class LineResult(NamedTuple):
    """One finished line of a batch, as its row in ``batch_results``."""

    batch_id: str
    line: int
    custom_id: str
    status_code: int
    result: str
    """The output or error file's line for it, JSON."""
    prompt_tokens: int
    completion_tokens: int
    finished_at: float


class JobTables:
    """The batch tables, over a backend's ``transaction()`` (each method one transaction)."""

    def __init__(self, transaction: Callable[[], contextlib.AbstractContextManager[Tx]]) -> None:
        self.transaction = transaction

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.transaction() as tx:
            return tx.rows(sql, args)

    # Files

    def add_file(self, row: tuple) -> None:
        """``FILE_COLUMNS`` values; a file already there (a rewritten output) is kept."""
        with self.transaction() as tx:
            tx.run(f"INSERT INTO batch_files ({FILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                   " ON CONFLICT (id) DO NOTHING", row)

    def file(self, owner: str, file_id: str) -> tuple | None:
        rows = self._rows(f"SELECT {FILE_COLUMNS} FROM batch_files WHERE id = ? AND owner = ?"
                          " AND deleted_at IS NULL", (file_id, owner))
        return rows[0] if rows else None

    def files(self, owner: str, purpose: str | None, limit: int,
              after: str | None) -> list[tuple]:
        """Newest first; ``after``: the last id of the previous page."""
        sql = (f"SELECT {FILE_COLUMNS} FROM batch_files WHERE owner = ? AND deleted_at IS NULL")
        args: tuple = (owner,)
        if purpose is not None:
            sql, args = sql + " AND purpose = ?", (*args, purpose)
        if after is not None:
            sql += (" AND (created_at, id) < (SELECT created_at, id FROM batch_files"
                    " WHERE id = ?)")
            args = (*args, after)
        return self._rows(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))

    def delete_file(self, owner: str, file_id: str, now: float) -> bool:
        with self.transaction() as tx:
            return tx.run("UPDATE batch_files SET deleted_at = ? WHERE id = ? AND owner = ?"
                          " AND deleted_at IS NULL", (now, file_id, owner)) > 0

    def file_in_use(self, file_id: str, active: tuple[str, ...]) -> bool:
        """Whether an unfinished batch reads this file."""
        marks = ", ".join("?" * len(active))
        return bool(self._rows(f"SELECT 1 FROM batches WHERE input_file_id = ? AND status IN"
                               f" ({marks}) LIMIT 1", (file_id, *active)))

    def pending_lines(self, node: str, active: tuple[str, ...]) -> int:
        """Lines of this node's unfinished batches without a result yet: work still to do."""
        marks = ", ".join("?" * len(active))
        rows = self._rows(
            "SELECT COALESCE(SUM(b.total - (SELECT COUNT(*) FROM batch_results r"
            f" WHERE r.batch_id = b.id)), 0) FROM batches b WHERE b.node = ? AND b.status IN"
            f" ({marks})", (node, *active))
        return int(rows[0][0])

    def stored_bytes(self, owner: str) -> int:
        rows = self._rows("SELECT COALESCE(SUM(bytes), 0) FROM batch_files WHERE owner = ?"
                          " AND deleted_at IS NULL", (owner,))
        return int(rows[0][0])

    # Batches

    def add_batch(self, row: dict) -> None:
        with self.transaction() as tx:
            tx.run(f"INSERT INTO batches ({', '.join(row)}) VALUES "
                   f"({', '.join('?' * len(row))})", tuple(row.values()))

    def batch(self, batch_id: str, owner: str | None = None) -> tuple | None:
        sql, args = f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,)
        if owner is not None:
            sql, args = sql + " AND owner = ?", (*args, owner)
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def batches(self, owner: str, limit: int, after: str | None) -> list[tuple]:
        sql, args = f"SELECT {BATCH_COLUMNS} FROM batches WHERE owner = ?", (owner,)
        if after is not None:
            sql += " AND (created_at, id) < (SELECT created_at, id FROM batches WHERE id = ?)"
            args = (*args, after)
        return self._rows(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))

    def active_count(self, owner: str, active: tuple[str, ...]) -> int:
        marks = ", ".join("?" * len(active))
        rows = self._rows(f"SELECT COUNT(*) FROM batches WHERE owner = ? AND status IN ({marks})",
                          (owner, *active))
        return int(rows[0][0])

    def move(self, batch_id: str, old: str, new: str, now: float, **columns: object) -> bool:
        """``old`` -> ``new`` (noting when), with ``columns`` set, if it is still ``old``."""
        sets = {"status": new, **({f"{new}_at": now} if new in TIMED else {}), **columns}
        if "errors" in sets and sets["errors"] is not None:
            sets["errors"] = json.dumps(sets["errors"])
        with self.transaction() as tx:
            return tx.run(f"UPDATE batches SET {', '.join(f'{c} = ?' for c in sets)}"
                          " WHERE id = ? AND status = ?",
                          (*sets.values(), batch_id, old)) > 0

    def claim(self, node: str, holder: str, now: float, lease_s: float,
              active: tuple[str, ...], skip: tuple[str, ...] = ()) -> tuple | None:
        """Take the oldest active batch of this node whose lease is free or ran out."""
        marks = ", ".join("?" * len(active))
        not_in = "" if not skip else f" AND id NOT IN ({', '.join('?' * len(skip))})"
        with self.transaction() as tx:
            rows = tx.rows(f"SELECT id FROM batches WHERE node = ? AND status IN ({marks})"
                           " AND (lease_until IS NULL OR lease_until < ?)" + not_in +
                           " ORDER BY created_at LIMIT 1", (node, *active, now, *skip))
            if not rows:
                return None
            taken = tx.run("UPDATE batches SET lease_holder = ?, lease_until = ? WHERE id = ?"
                           " AND (lease_until IS NULL OR lease_until < ?)",
                           (holder, now + lease_s, rows[0][0], now))
            if not taken:
                return None
            return tx.rows(f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?", (rows[0][0],))[0]

    def renew(self, batch_id: str, holder: str, now: float, lease_s: float) -> bool:
        """Extend this holder's lease; False: it was taken over (stop working on it)."""
        with self.transaction() as tx:
            return tx.run("UPDATE batches SET lease_until = ? WHERE id = ? AND lease_holder = ?",
                          (now + lease_s, batch_id, holder)) > 0

    def release(self, batch_id: str, holder: str) -> None:
        with self.transaction() as tx:
            tx.run("UPDATE batches SET lease_until = NULL WHERE id = ? AND lease_holder = ?",
                   (batch_id, holder))

    # Results

    def record_results(self, results: list[LineResult]) -> int:
        """Lines' results, in one transaction, each once: how many were new (a line that
        already had a row keeps it)."""
        with self.transaction() as tx:
            return sum(tx.run(
                "INSERT INTO batch_results (batch_id, line, custom_id, status_code, result,"
                " prompt_tokens, completion_tokens, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (batch_id, line) DO NOTHING", tuple(result)) for result in results)

    def done_lines(self, batch_id: str) -> set[int]:
        return {row[0] for row in self._rows(
            "SELECT line FROM batch_results WHERE batch_id = ?", (batch_id,))}

    def results_page(self, batch_id: str, failed: bool, after: int,
                     limit: int) -> list[tuple[int, str]]:
        """(line, result JSON) of up to ``limit`` finished lines after line ``after``, in
        line order: the succeeded ones, or with ``failed`` the others. Paged, so that writing
        a large batch's output never holds all of it at once."""
        return self._rows(
            "SELECT line, result FROM batch_results WHERE batch_id = ? AND line > ? AND"
            f" {'NOT ' if failed else ''}({SUCCEEDED}) ORDER BY line LIMIT ?",
            (batch_id, after, limit))

    def counts(self, batch_id: str) -> tuple[int, int]:
        """(succeeded, failed) lines so far."""
        rows = self._rows(
            f"SELECT COALESCE(SUM(CASE WHEN {SUCCEEDED} THEN 1 ELSE 0 END), 0),"
            f" COALESCE(SUM(CASE WHEN {SUCCEEDED} THEN 0 ELSE 1 END), 0)"
            " FROM batch_results WHERE batch_id = ?", (batch_id,))
        return int(rows[0][0]), int(rows[0][1])

    def batch_tokens(self) -> dict[str, int]:
        """Tokens each key's batch lines used, for ``appliance-keys usage``."""
        return {owner: int(tokens) for owner, tokens in self._rows(
            "SELECT b.owner, SUM(r.prompt_tokens + r.completion_tokens) FROM batch_results r"
            " JOIN batches b ON b.id = r.batch_id GROUP BY b.owner")}


class SqliteTx:
    def __init__(self, db) -> None:
        self.db = db

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.db.execute(sql, args).fetchall()

    def run(self, sql: str, args: tuple = ()) -> int:
        return self.db.execute(sql, args).rowcount


class PostgresTx:
    def __init__(self, conn) -> None:
        self.conn = conn

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.conn.execute(sql.replace("?", "%s"), args).fetchall()

    def run(self, sql: str, args: tuple = ()) -> int:
        return self.conn.execute(sql.replace("?", "%s"), args).rowcount

