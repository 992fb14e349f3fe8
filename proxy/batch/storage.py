"""Where batch files and jobs are kept: bytes on disk under ``APPLIANCE_BATCH_DIR``, the rest
in the key store's database (``keys.jobs``), behind one object whose calls run in a thread.

A file's bytes are written to a temporary name, flushed to disk, then renamed: a file id in
the database always names whole bytes (the row is added after the rename; a crash between the
two leaves an orphan file, never a row without bytes).
"""

import asyncio
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..keys.jobs import JobTables
from ..keys.store import KeyStore
from .jobs import Batch, StoredFile

TIMED_COLUMNS = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                 "cancelled")


def file_from_row(row: tuple) -> StoredFile:
    return StoredFile(*row)


def batch_from_row(row: tuple) -> Batch:
    (id_, owner, node, input_file_id, endpoint, window, metadata, status, total, created_at,
     expires_at, *rest) = row
    times = dict(zip(TIMED_COLUMNS, rest[:len(TIMED_COLUMNS)], strict=True))
    output_file_id, error_file_id, errors = rest[len(TIMED_COLUMNS):]
    return Batch(id_, owner, node, input_file_id, endpoint, window,
                 None if metadata is None else json.loads(metadata), status, total, created_at,
                 expires_at, times, output_file_id, error_file_id,
                 None if errors is None else json.loads(errors))


class Storage:
    """The batch tables (through one store connection, one call at a time) and the file
    directory. Every ``call`` runs in a thread: the store blocks."""

    def __init__(self, open_store: Callable[[], KeyStore], directory: Path, node: str) -> None:
        self.open_store = open_store
        self.directory = Path(directory)
        self.node = node
        self.lock = threading.Lock()
        self.store: KeyStore | None = None
        self.tables: JobTables | None = None

    def _tables(self) -> JobTables:
        if self.store is None or not self.store.still_there():
            if self.store is not None:
                self.store.close()
            self.store = self.open_store()
            self.tables = self.store.jobs()
        assert self.tables is not None
        return self.tables

    def twin(self) -> "Storage":
        """The same tables and directory over a connection of its own: what must not wait
        behind the others' queries (a finished line's result) goes through one."""
        return Storage(self.open_store, self.directory, self.node)

    def sync(self, method: str, *args, **kwargs):
        with self.lock:
            return getattr(self._tables(), method)(*args, **kwargs)

    async def call(self, method: str, *args, **kwargs):
        """``JobTables.<method>(*args)`` in a thread."""
        return await asyncio.to_thread(self.sync, method, *args, **kwargs)

    def _key(self, name: str):
        with self.lock:
            self._tables()
            assert self.store is not None
            return self.store.get(name)

    async def key(self, name: str):
        """The key's record as the store has it now (UnknownKey when there is none)."""
        return await asyncio.to_thread(self._key, name)

    def close(self) -> None:
        with self.lock:
            if self.store is not None:
                self.store.close()
                self.store = None

    # Bytes on disk

    def path_of(self, file_id: str) -> Path:
        return self.directory / f"{file_id}.jsonl"

    def write_stream(self, file_id: str, chunks: Iterable[bytes]) -> int:
        """Whole or not at all: a temporary name, fsync, rename, fsync of the directory.
        Returns the bytes written."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.path_of(file_id)
        partial = final.with_suffix(".partial")
        size = 0
        try:
            with open(partial, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, final)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return size

    def lines_of(self, file_id: str) -> Iterator[bytes] | None:
        """A stored file's lines, read as they are asked for; None when its bytes are gone."""
        try:
            source = open(self.path_of(file_id), "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            return None

        def lines() -> Iterator[bytes]:
            with source:
                yield from source

        return lines()

    def remove_bytes(self, file_id: str) -> None:
        self.path_of(file_id).unlink(missing_ok=True)
