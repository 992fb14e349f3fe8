"""The SQLite key store: hashes only, revocation, expiry, usage that adds up under concurrency."""

import sqlite3
import threading

import pytest

from proxy.keys import SECRET_PREFIX, KeyExists, KeyStore, UnknownKey, hash_secret


@pytest.fixture
def store(tmp_path):
    s = KeyStore(tmp_path / "keys.db")
    yield s
    s.close()


def test_only_a_hash_of_the_secret_is_stored(store, tmp_path):
    secret = store.create("alice")
    assert secret.startswith(SECRET_PREFIX) and len(secret) > 40
    raw = (tmp_path / "keys.db").read_bytes() + (tmp_path / "keys.db-wal").read_bytes()
    assert secret.encode() not in raw
    assert hash_secret(secret) in raw


def test_lookup_finds_the_key_and_nothing_else(store):
    secret = store.create("alice", rpm=5)
    assert store.lookup(secret).name == "alice"
    assert store.lookup(secret).rpm == 5
    assert store.lookup(secret + "x") is None


def test_names_are_unique(store):
    store.create("alice")
    with pytest.raises(KeyExists):
        store.create("alice")


def test_revoked_key_is_unusable(store):
    secret = store.create("alice")
    store.revoke("alice")
    assert not store.lookup(secret).usable(now=1e12)
    with pytest.raises(UnknownKey):
        store.revoke("alice")


def test_expired_key_is_unusable(store):
    secret = store.create("alice", expires_days=1)
    key = store.lookup(secret)
    assert key.usable(key.created_at + 3600)
    assert not key.usable(key.created_at + 2 * 86400)


def test_store_file_is_private(tmp_path):
    KeyStore(tmp_path / "k.db").close()
    assert (tmp_path / "k.db").stat().st_mode & 0o077 == 0


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "keys.db"
    KeyStore(path).create("alice")

    def writer() -> None:
        s = KeyStore(path, create=False)
        for _ in range(50):
            s.add_usage([("alice", 1, 2, 3)])
        s.close()

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (usage,) = KeyStore(path).usage("alice")
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (200, 400, 600)


def test_readers_are_not_blocked_by_a_long_write_transaction(tmp_path):
    path = tmp_path / "keys.db"
    secret = KeyStore(path).create("alice")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        assert KeyStore(path, busy_timeout_s=0.1, create=False).lookup(secret).name == "alice"
    finally:
        writer.execute("ROLLBACK")
        writer.close()
