"""The SQLite key store: hashes only, revocation, expiry, usage that adds up under concurrency."""

import calendar
import sqlite3
import threading
import time

import pytest

from proxy.keys import sqlite as keys
from proxy.keys.sqlite import SCHEMA_VERSION, schema_version
from proxy.keys.sqlite import SqliteKeyStore as KeyStore
from proxy.keys.store import (
    SECRET_PREFIX,
    KeyExists,
    StoreUnavailable,
    UnknownKey,
    Usage,
    hash_secret,
    period_end,
    period_label,
)


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


# The schema before per-key tenancy controls (proxy/keys/store.py before issue 9), verbatim:
# a file made by that code must open, upgrade in place and keep its keys and usage.
V1_SCHEMA = """
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


@pytest.fixture
def v1_store(tmp_path):
    """A v1 file with one key ('old', rpm 7, secret 'sk-app-old') and usage (3, 40, 50)."""
    path = tmp_path / "keys.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO keys (name, secret_hash, hint, rpm, tpm, created_at, expires_at)"
               " VALUES ('old', ?, '-old', 7, NULL, 1000.0, NULL)", (hash_secret("sk-app-old"),))
    db.execute("INSERT INTO usage VALUES ('old', 3, 40, 50, 1000.0)")
    db.close()
    return path


def columns(path, table: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return [row[1:] for row in db.execute(f"PRAGMA table_info({table})")]
    finally:
        db.close()


def test_a_v1_file_is_upgraded_in_place_keeping_keys_and_usage(v1_store, tmp_path):
    store = KeyStore(v1_store, create=False)
    assert schema_version(store.db) == SCHEMA_VERSION
    key = store.lookup("sk-app-old")
    assert (key.name, key.rpm, key.created_at) == ("old", 7, 1000.0)
    assert (key.max_concurrent, key.weight, key.models, key.quota_tokens, key.quota_period) == (
        None, 1.0, None, None, "month")
    assert store.usage("old") == [Usage("old", 3, 40, 50)]
    store.add_usage([("old", 1, 2, 3)])
    assert store.period_usage("old", period_label("month", time.time())) == 5
    store.close()
    fresh = tmp_path / "fresh.db"
    KeyStore(fresh).close()
    assert columns(v1_store, "keys") == columns(fresh, "keys")
    assert columns(v1_store, "period_usage") == columns(fresh, "period_usage")


def test_upgrading_twice_changes_nothing(v1_store):
    KeyStore(v1_store, create=False).close()
    before = columns(v1_store, "keys")
    store = KeyStore(v1_store, create=False)
    store.migrate()
    assert columns(v1_store, "keys") == before
    assert schema_version(store.db) == SCHEMA_VERSION
    store.close()


def test_concurrent_openers_of_a_v1_file_upgrade_it_once(v1_store):
    openers = 8
    barrier = threading.Barrier(openers)
    failures: list[BaseException] = []

    def opener() -> None:
        barrier.wait()
        try:
            s = KeyStore(v1_store, create=False)
            assert s.lookup("sk-app-old").weight == 1.0
            s.close()
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(openers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    names = [c[0] for c in columns(v1_store, "keys")]
    assert len(names) == len(set(names))
    assert KeyStore(v1_store, create=False).usage("old") == [Usage("old", 3, 40, 50)]


def test_a_failed_upgrade_step_leaves_the_file_as_it_was(v1_store, monkeypatch):
    def broken(db) -> None:
        db.execute("ALTER TABLE keys ADD COLUMN max_concurrent INTEGER")
        raise sqlite3.OperationalError("disk went away")

    monkeypatch.setattr(keys, "MIGRATIONS", (keys.MIGRATIONS[0], broken))
    with pytest.raises(StoreUnavailable):
        KeyStore(v1_store, create=False)
    assert "max_concurrent" not in [c[0] for c in columns(v1_store, "keys")]
    monkeypatch.undo()
    assert KeyStore(v1_store, create=False).lookup("sk-app-old").max_concurrent is None


def test_tenancy_settings_are_stored_and_looked_up(store):
    secret = store.create("alice", rpm=5, max_concurrent=2, weight=2.5, models=["m1", "m2"],
                          quota_tokens=1000, quota_period="day")
    key = store.lookup(secret)
    assert (key.rpm, key.max_concurrent, key.weight, key.quota_tokens, key.quota_period) == (
        5, 2, 2.5, 1000, "day")
    assert key.models == frozenset({"m1", "m2"})
    assert key.allows_model("m1") and not key.allows_model("m3")
    assert hash(key) == hash(store.lookup(secret))
    assert store.lookup(store.create("bob")).allows_model("anything")


@pytest.mark.parametrize("settings", [
    {"rpm": 0}, {"tpm": -1}, {"rpm": 1.5}, {"rpm": True}, {"max_concurrent": 0},
    {"weight": 0}, {"weight": -1}, {"weight": float("inf")}, {"weight": float("nan")},
    {"weight": None}, {"models": []}, {"models": [""]}, {"models": [" m"]}, {"models": "m1"},
    {"quota_tokens": 0}, {"quota_period": "week"}, {"quota_period": None},
    {"expires_days": 0}, {"colour": "red"},
])
def test_invalid_settings_are_refused_with_the_setting_named(store, settings):
    (option,) = settings
    with pytest.raises(ValueError, match=option[:5]):
        store.create("alice", **settings)
    with pytest.raises(UnknownKey):
        store.get("alice")


@pytest.mark.parametrize("name", ["", "a b", "tab\tname", "x" * 65, "nl\n"])
def test_key_names_are_refused_when_empty_long_or_spaced(store, name):
    with pytest.raises(ValueError, match="key name"):
        store.create(name)


def test_update_changes_settings_and_keeps_usage_and_secret(store):
    secret = store.create("alice", rpm=5, tpm=100)
    store.add_usage([("alice", 2, 10, 20)])
    key = store.update("alice", rpm=None, max_concurrent=3, weight=0.5, models={"m"},
                       quota_tokens=500, quota_period="day")
    assert key == store.lookup(secret)
    assert (key.rpm, key.tpm, key.max_concurrent, key.weight, key.quota_tokens) == (
        None, 100, 3, 0.5, 500)
    assert key.models == frozenset({"m"}) and key.quota_period == "day"
    assert store.usage("alice") == [Usage("alice", 2, 10, 20)]
    assert store.update("alice", models=None).models is None


def test_update_expiry_counts_from_now_and_renews_an_expired_key(store):
    store.create("alice", expires_days=1)
    store.db.execute("UPDATE keys SET expires_at = 1 WHERE name = 'alice'")
    key = store.update("alice", expires_days=2)
    assert key.usable(time.time())
    assert abs(key.expires_at - (time.time() + 2 * 86400)) < 60
    assert store.update("alice", expires_days=None).expires_at is None


def test_update_refuses_missing_revoked_and_empty_changes(store):
    with pytest.raises(UnknownKey):
        store.update("nobody", rpm=1)
    store.create("alice")
    store.revoke("alice")
    with pytest.raises(UnknownKey):
        store.update("alice", rpm=1)
    store.create("bob")
    with pytest.raises(ValueError, match="nothing"):
        store.update("bob")
    with pytest.raises(ValueError, match="weight"):
        store.update("bob", weight=0)
    assert store.get("bob").weight == 1.0


NOV_24 = calendar.timegm((2026, 11, 24, 13, 5, 0))


@pytest.mark.parametrize(("period", "now", "label", "end"), [
    ("day", NOV_24, "2026-11-24", calendar.timegm((2026, 11, 25, 0, 0, 0))),
    ("month", NOV_24, "2026-11", calendar.timegm((2026, 12, 1, 0, 0, 0))),
    ("month", calendar.timegm((2026, 12, 31, 23, 59, 59)), "2026-12",
     calendar.timegm((2027, 1, 1, 0, 0, 0))),
    ("day", calendar.timegm((2028, 2, 28, 23, 0, 0)), "2028-02-28",
     calendar.timegm((2028, 2, 29, 0, 0, 0))),
    ("day", calendar.timegm((2026, 11, 25, 0, 0, 0)), "2026-11-25",
     calendar.timegm((2026, 11, 26, 0, 0, 0))),
])
def test_periods_are_utc_calendar_days_and_months(period, now, label, end):
    assert period_label(period, now) == label
    assert period_end(period, now) == end
    assert period_label(period, end - 0.001) == label != period_label(period, end)


def test_unknown_period_is_refused():
    with pytest.raises(ValueError, match="period"):
        period_label("week", NOV_24)


def test_usage_adds_up_per_day_and_month(store, monkeypatch):
    store.create("alice", quota_tokens=100, quota_period="day")
    store.create("bob")
    monkeypatch.setattr(time, "time", lambda: NOV_24)
    store.add_usage([("alice", 1, 10, 5), ("bob", 1, 1, 1)])
    store.add_usage([("alice", 1, 20, 5)])
    monkeypatch.setattr(time, "time", lambda: NOV_24 + 86400)
    store.add_usage([("alice", 1, 1, 2)])
    assert store.period_usage("alice", "2026-11-24") == 40
    assert store.period_usage("alice", "2026-11-25") == 3
    assert store.period_usage("alice", "2026-11") == 43
    assert store.period_usage("bob", "2026-11") == 2
    assert store.period_usage("alice", "2026-10") == 0
    assert store.usage("alice") == [Usage("alice", 3, 31, 12)]


def test_report_reads_the_period_the_key_has_now(store, monkeypatch):
    store.create("alice", quota_tokens=100, quota_period="day")
    monkeypatch.setattr(time, "time", lambda: NOV_24)
    store.add_usage([("alice", 1, 30, 10)])
    report = store.report("alice", now=NOV_24 + 86400)
    assert (report.period, report.period_tokens, report.quota_left) == ("2026-11-25", 0, 100)
    report = store.report("alice", now=NOV_24)
    assert (report.period, report.period_tokens, report.quota_left) == ("2026-11-24", 40, 60)
    store.update("alice", quota_period="month", quota_tokens=30)
    report = store.report("alice", now=NOV_24 + 86400)
    assert (report.period, report.period_tokens, report.quota_left) == ("2026-11", 40, 0)
    assert report.total == Usage("alice", 1, 30, 10)
    with pytest.raises(UnknownKey):
        store.report("nobody")

