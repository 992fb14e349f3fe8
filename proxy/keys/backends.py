"""Which key store to open: the one module that knows both backends, so neither imports it
back (``store`` says what a key store is; each backend imports it). PostgreSQL's driver is
imported only when a ``postgresql://`` store is opened."""

from pathlib import Path

from .store import KeyStore


def is_postgres(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def open_store(location: str | Path, create: bool = True, pool_size: int = 4,
               timeout_s: float = 5.0) -> KeyStore:
    """The store at ``location``: a ``postgresql://`` URL, else a SQLite file path.

    ``create`` makes a missing SQLite file (PostgreSQL's database must exist; its tables are
    made either way). ``timeout_s`` bounds a wait for a lock or a connection.
    """
    if is_postgres(location):
        from .postgres import PostgresKeyStore

        return PostgresKeyStore(str(location), pool_size=pool_size, timeout_s=timeout_s)
    from .sqlite import SqliteKeyStore

    path = str(location).removeprefix("sqlite://")
    return SqliteKeyStore(Path(path), busy_timeout_s=timeout_s, create=create)
