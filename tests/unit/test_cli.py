"""appliance-keys: settings in and out, updates that keep usage, clear refusals, real process."""

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.keys.sqlite import SqliteKeyStore as KeyStore
from proxy.keys.store import period_label

CLI = Path(sys.executable).parent / "appliance-keys"


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "keys.db"


def keys(db: Path, *args: str) -> int:
    return main(["--db", str(db), *args])


def stored(db: Path, name: str):
    store = KeyStore(db, create=False)
    try:
        return store.get(name)
    finally:
        store.close()


def rows(text: str) -> dict[str, list[str]]:
    """A table the CLI printed, as name -> its columns (the header row included)."""
    return {line.split()[0]: line.split() for line in text.splitlines()}


def test_create_takes_every_setting(db):
    assert keys(db, "create", "--name", "alice", "--rpm", "60", "--tpm", "1000",
                "--expires-days", "30", "--max-concurrent", "4", "--weight", "2.5",
                "--models", "tiny, big", "--quota-tokens", "5000", "--quota-period", "day") == 0
    key = stored(db, "alice")
    assert (key.rpm, key.tpm, key.max_concurrent, key.weight) == (60, 1000, 4, 2.5)
    assert key.models == frozenset({"tiny", "big"})
    assert (key.quota_tokens, key.quota_period) == (5000, "day")
    assert key.expires_at is not None


def test_create_defaults_to_no_limits_every_model_and_weight_1(db):
    assert keys(db, "create", "--name", "alice") == 0
    key = stored(db, "alice")
    assert (key.rpm, key.tpm, key.expires_at, key.max_concurrent, key.models) == (None,) * 5
    assert (key.weight, key.quota_tokens, key.quota_period) == (1.0, None, "month")


def test_a_cache_group_is_set_shown_and_left(db, capsys):
    assert keys(db, "create", "--name", "alice", "--cache-group", "team") == 0
    assert stored(db, "alice").cache_group == "team"
    assert keys(db, "show", "alice") == 0
    assert "team" in rows(capsys.readouterr().out)["cache"]
    assert keys(db, "update", "alice", "--own-cache") == 0
    assert stored(db, "alice").cache_group is None
    assert keys(db, "update", "alice", "--cache-group", "two words") == 1


def test_update_changes_only_what_it_is_given_and_keeps_usage(db, capsys):
    keys(db, "create", "--name", "alice", "--rpm", "60", "--tpm", "1000", "--models", "a")
    store = KeyStore(db)
    store.add_usage([("alice", 2, 10, 20)])
    store.close()
    assert keys(db, "update", "alice", "--no-rpm", "--max-concurrent", "2", "--weight", "0.5",
                "--quota-tokens", "100") == 0
    key = stored(db, "alice")
    assert (key.rpm, key.tpm, key.max_concurrent, key.weight) == (None, 1000, 2, 0.5)
    assert (key.models, key.quota_tokens) == (frozenset({"a"}), 100)
    assert keys(db, "update", "alice", "--all-models", "--no-quota", "--no-tpm") == 0
    key = stored(db, "alice")
    assert (key.models, key.quota_tokens, key.tpm) == (None, None, None)
    capsys.readouterr()
    keys(db, "usage", "alice")
    assert rows(capsys.readouterr().out)["alice"][1:4] == ["2", "10", "20"]


@pytest.mark.parametrize("args", [
    ["create", "--name", "x", "--weight", "0"],
    ["create", "--name", "x", "--weight", "-1"],
    ["create", "--name", "x", "--weight", "nan"],
    ["create", "--name", "x", "--weight", "inf"],
    ["create", "--name", "x", "--rpm", "0"],
    ["create", "--name", "x", "--rpm", "ten"],
    ["create", "--name", "x", "--max-concurrent", "0"],
    ["create", "--name", "x", "--quota-tokens", "-5"],
    ["create", "--name", "x", "--quota-period", "week"],
    ["create", "--name", "x", "--models", ""],
    ["create", "--name", "x", "--models", "a,,b"],
    ["create", "--name", "x", "--models", "a, "],
    ["update", "x"],
    ["update", "x", "--rpm", "5", "--no-rpm"],
    ["update", "x", "--models", "a", "--all-models"],
])
def test_bad_values_are_refused_by_the_parser(db, capsys, args):
    keys(db, "create", "--name", "x")
    with pytest.raises(SystemExit) as refused:
        keys(db, *args)
    assert refused.value.code == 2
    assert "error:" in capsys.readouterr().err
    key = stored(db, "x")
    assert (key.rpm, key.weight, key.models) == (None, 1.0, None)


@pytest.mark.parametrize("args", [
    ["create", "--name", "has space"],
    ["create", "--name", ""],
    ["create", "--name", "x"],
    ["update", "nobody", "--rpm", "1"],
    ["show", "nobody"],
    ["usage", "nobody"],
])
def test_bad_names_exit_1_with_a_message(db, capsys, args):
    keys(db, "create", "--name", "x")
    capsys.readouterr()
    assert keys(db, *args) == 1
    assert capsys.readouterr().err.startswith("appliance-keys: ")


def test_a_revoked_key_cannot_be_updated(db, capsys):
    keys(db, "create", "--name", "x")
    keys(db, "revoke", "x")
    assert keys(db, "update", "x", "--rpm", "5") == 1
    assert "no active key" in capsys.readouterr().err


def test_show_prints_settings_and_usage_but_never_the_secret(db, capsys):
    keys(db, "create", "--name", "alice", "--max-concurrent", "3", "--models", "m2,m1",
         "--quota-tokens", "1000", "--quota-period", "day")
    secret = capsys.readouterr().out.strip()
    store = KeyStore(db)
    store.add_usage([("alice", 2, 100, 150)])
    store.close()
    assert keys(db, "show", "alice") == 0
    out = capsys.readouterr().out
    assert secret not in out and secret[-4:] in out
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines()}
    assert fields["max concurrent"] == "3"
    assert fields["weight"] == "1"
    assert fields["models"] == "m1, m2"
    assert fields["quota"] == "1000 tokens per day"
    assert fields["period used"] == "250 tokens, 750 left"
    assert fields["requests"] == "2"
    assert fields["rpm"] == "-"


def test_usage_shows_the_period_against_the_quota(db, capsys):
    keys(db, "create", "--name", "alice", "--quota-tokens", "100")
    keys(db, "create", "--name", "bob")
    store = KeyStore(db)
    store.add_usage([("alice", 1, 70, 60), ("bob", 3, 1, 2)])
    store.close()
    capsys.readouterr()
    assert keys(db, "usage") == 0
    table = rows(capsys.readouterr().out)
    assert table["NAME"] == ["NAME", "REQUESTS", "PROMPT", "COMPLETION", "PERIOD", "QUOTA",
                             "USED", "LEFT", "BATCH"]
    month = period_label("month", time.time())
    assert table["alice"] == ["alice", "1", "70", "60", month, "100", "130", "0", "0"]
    assert table["bob"] == ["bob", "3", "1", "2", month, "-", "3", "-", "0"]


def test_list_shows_the_limits_compactly(db, capsys):
    keys(db, "create", "--name", "alice", "--rpm", "5", "--max-concurrent", "2",
         "--weight", "3", "--models", "b,a", "--quota-tokens", "9", "--quota-period", "day")
    keys(db, "create", "--name", "bob")
    capsys.readouterr()
    assert keys(db, "list") == 0
    table = rows(capsys.readouterr().out)
    assert table["alice"][2:8] == ["5", "-", "2", "3", "9/day", "a,b"]
    assert table["bob"][2:8] == ["-", "-", "-", "1", "-", "*"]


def test_the_installed_command_creates_updates_and_upgrades_an_old_store(tmp_path):
    """The console script for real: secret alone on stdout, and a pre-tenancy file upgraded."""
    db = tmp_path / "keys.db"
    old = sqlite3.connect(db)
    old.executescript("CREATE TABLE keys (name TEXT PRIMARY KEY, secret_hash BLOB NOT NULL"
                      " UNIQUE, hint TEXT NOT NULL, rpm INTEGER, tpm INTEGER, created_at REAL"
                      " NOT NULL, expires_at REAL, revoked_at REAL);"
                      " INSERT INTO keys VALUES ('old', x'00', 'abcd', 7, NULL, 1, NULL, NULL);")
    old.close()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(CLI), "--db", str(db), *args], capture_output=True,
                              text=True, timeout=30)

    created = run("create", "--name", "new", "--models", "tiny", "--quota-tokens", "50")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("sk-app-") and len(created.stdout.split()) == 1
    assert run("update", "old", "--weight", "4", "--quota-period", "day").returncode == 0
    shown = run("show", "old")
    assert shown.returncode == 0 and "weight:" in shown.stdout and " 4\n" in shown.stdout
    assert "7" in shown.stdout.split("rpm:")[1].splitlines()[0]
    refused = run("update", "new", "--weight", "0")
    assert refused.returncode == 2 and "greater than 0" in refused.stderr
