"""Fleet mode: two gateways in front of one engine share keys and usage in a real PostgreSQL,
and rate limits and quotas in a real Redis.

Both come from Debian's packages and run on loopback on free ports; each test gets a database
of its own and an empty Redis. The gateways are real ``appliance-proxy`` processes; keys are
made with the real ``appliance-keys`` against the same URL.
"""

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from proxy.keys.postgres import SCHEMA_VERSION, PostgresKeyStore, schema_version
from tests.integration.proxy_stack import gateway, keys_cli, make_key
from tests.integration.test_gateway import CHAT, error_of, wait_for
from tests.stores import postgres, redis_server


@pytest.fixture(scope="module")
def pg():
    with postgres() as server:
        yield server


@pytest.fixture
def keys_url(pg):
    if pg.proc.poll() is not None:  # a test that killed it failed before restarting it
        pg.start()
    return pg.new_database()


@pytest.fixture
def pair(fake, tmp_path, keys_url):
    """Two gateways, as two appliances behind one load balancer, sharing one key store."""
    with gateway(fake.url, tmp_path, keys_url=keys_url) as a, \
            gateway(fake.url, tmp_path, keys_url=keys_url) as b:
        yield a, b


@pytest.fixture(scope="module")
def redis_store():
    with redis_server() as server:
        yield server


@pytest.fixture
def shared(fake, tmp_path, keys_url, redis_store):
    """Two gateways sharing keys in PostgreSQL and limits in Redis."""
    if redis_store.proc.poll() is not None:
        redis_store.start()
    redis_store.flush()
    settings = {"keys_url": keys_url, "limits_url": redis_store.url}
    with gateway(fake.url, tmp_path, **settings) as a, gateway(fake.url, tmp_path, **settings) as b:
        yield a, b


def chat(p, secret: str, **extra) -> httpx.Response:
    return httpx.post(p.url + "/v1/chat/completions", json={**CHAT, **extra}, timeout=30,
                      headers={"Authorization": f"Bearer {secret}"})


def usage_of(url: str, name: str) -> list[int]:
    out = keys_cli(url, "usage", name)
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.splitlines()[-1].split()[1:4]]


def test_appliance_keys_manages_keys_in_postgres(keys_url):
    secret = make_key(keys_url, "alice", "--rpm", "10", "--quota-tokens", "500")
    assert secret.startswith("sk-app-")
    assert keys_cli(keys_url, "update", "alice", "--tpm", "900").returncode == 0
    shown = keys_cli(keys_url, "show", "alice").stdout
    assert "rpm:                10" in shown and "tpm:                900" in shown
    assert "500 tokens per month" in shown
    assert "alice" in keys_cli(keys_url, "list").stdout
    again = keys_cli(keys_url, "create", "--name", "alice")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert keys_cli(keys_url, "revoke", "alice").returncode == 0
    assert "revoked" in keys_cli(keys_url, "list").stdout
    assert secret not in keys_cli(keys_url, "list").stdout


def test_schema_upgrade_runs_once_when_appliances_start_together(keys_url):
    with ThreadPoolExecutor(8) as pool:
        stores = list(pool.map(lambda _: PostgresKeyStore(keys_url, pool_size=1), range(8)))
    store = stores[0]
    with store.connection() as conn:
        assert schema_version(conn) == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM appliance_schema").fetchone()[0] == 1
    store.create("bob")
    for s in stores:
        s.close()
    reopened = PostgresKeyStore(keys_url)
    assert [k.name for k in reopened.all_keys()] == ["bob"]
    reopened.close()


def test_a_failed_upgrade_step_leaves_the_schema_as_it_was(keys_url, monkeypatch):
    from proxy.keys import postgres as keys_postgres

    PostgresKeyStore(keys_url).close()
    broken = ("ALTER TABLE keys ADD COLUMN team text", "ALTER TABLE nowhere ADD COLUMN x int")
    monkeypatch.setattr(keys_postgres, "MIGRATIONS", (*keys_postgres.MIGRATIONS, broken))
    monkeypatch.setattr(keys_postgres, "SCHEMA_VERSION", len(keys_postgres.MIGRATIONS))
    with pytest.raises(psycopg.errors.UndefinedTable):
        PostgresKeyStore(keys_url)
    monkeypatch.undo()
    store = PostgresKeyStore(keys_url)
    with store.connection() as conn:
        assert schema_version(conn) == SCHEMA_VERSION
        columns = conn.execute("SELECT column_name FROM information_schema.columns"
                               " WHERE table_name = 'keys'").fetchall()
    assert ("team",) not in columns
    store.close()


def test_a_key_made_once_works_on_both_gateways(pair):
    a, b = pair
    secret = make_key(a.db, "shared")
    assert chat(a, secret).status_code == 200
    assert chat(b, secret).status_code == 200


def test_a_revoke_is_refused_by_both_gateways_within_a_second(pair):
    a, b = pair
    secret = make_key(a.db, "leaving")
    assert chat(a, secret).status_code == 200 and chat(b, secret).status_code == 200
    assert keys_cli(a.db, "revoke", "leaving").returncode == 0
    revoked_at = time.monotonic()
    refused: dict[str, float] = {}
    while len(refused) < 2 and time.monotonic() - revoked_at < 5:
        for p in (a, b):
            if p.url not in refused and chat(p, secret).status_code == 401:
                refused[p.url] = time.monotonic() - revoked_at
    print(f"revoke refused after {sorted(round(s, 3) for s in refused.values())} s")
    assert len(refused) == 2 and max(refused.values()) <= 1.0


def test_usage_adds_up_exactly_across_gateways(pair):
    a = pair[0]
    secret = make_key(a.db, "metered")
    gateways = itertools.cycle(pair)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: chat(next(gateways), secret, max_tokens=1 + n % 5),
                                range(60)))
    assert all(r.status_code == 200 for r in answers)
    prompt = sum(r.json()["usage"]["prompt_tokens"] for r in answers)
    completion = sum(r.json()["usage"]["completion_tokens"] for r in answers)
    wait_for(lambda: usage_of(a.db, "metered") == [60, prompt, completion])


def test_postgres_down_fails_keys_closed_and_loses_no_usage(pg, pair):
    """Mid-load the store goes away: 503 for keys it must look up, the gateways stay up, and
    every answered request is in the store once it is back."""
    a, b = pair
    secret = make_key(a.db, "steady")
    statuses: list[tuple[int, str | None]] = []
    tokens = [0, 0]
    stop = threading.Event()

    def load(p) -> None:
        while not stop.is_set():
            r = chat(p, secret)
            code = error_of(r)["code"] if r.status_code != 200 else None
            statuses.append((r.status_code, code))
            if r.status_code == 200:
                tokens[0] += r.json()["usage"]["prompt_tokens"]
                tokens[1] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=load, args=(p,)) for p in (a, b, a, b)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(statuses) > 40, timeout=30)
        pg.kill()
        wait_for(lambda: sum(s == 503 for s, _ in statuses[-8:]) == 8, timeout=30)
        for p in (a, b):
            assert httpx.get(p.url + "/health").status_code == 200
        pg.start()
        seen = len(statuses)
        wait_for(lambda: len(statuses) > seen + 8 and all(
            s == 200 for s, _ in statuses[-8:]), timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join()
    refused = [code for s, code in statuses if s != 200]
    assert refused and set(refused) == {"key_store_unavailable"}
    served = sum(s == 200 for s, _ in statuses)
    print(f"{served} served, {len(refused)} refused with 503 while PostgreSQL was down")
    wait_for(lambda: usage_of(a.db, "steady") == [served, *tokens], timeout=30)


def metric(p, name: str) -> float:
    for line in httpx.get(p.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def refilled(limit: int, since: float) -> int:
    """Requests a per-minute bucket gives back between ``since`` and now."""
    return int((time.monotonic() - since) * limit / 60)


def test_a_key_with_rpm_10_gets_10_a_minute_across_both_gateways_not_20(shared):
    a = shared[0]
    secret = make_key(a.db, "ten", "--rpm", "10")
    started = time.monotonic()
    answers = [chat(p, secret) for p, _ in zip(itertools.cycle(shared), range(30), strict=False)]
    served = sum(r.status_code == 200 for r in answers)
    print(f"rpm 10 over two gateways: {served} of 30 served")
    assert 10 <= served <= 10 + refilled(10, started)
    refused = [r for r in answers if r.status_code != 200]
    assert {error_of(r)["code"] for r in refused} == {"rate_limit_exceeded"}
    assert {r.headers["x-ratelimit-limit-requests"] for r in answers} == {"10"}


def test_a_quota_is_never_overshot_across_both_gateways(shared):
    a, b = shared
    quota = 400
    secret = make_key(a.db, "capped", "--quota-tokens", str(quota))
    spent: list[int] = []

    def spend(p) -> None:
        while True:
            r = chat(p, secret)
            if r.status_code != 200:
                assert error_of(r)["code"] == "insufficient_quota"
                return
            spent.append(r.json()["usage"]["total_tokens"])

    threads = [threading.Thread(target=spend, args=(p,)) for p in (a, b, a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"quota {quota} over two gateways: {len(spent)} requests spent {sum(spent)} tokens")
    assert 0 < sum(spent) <= quota
    wait_for(lambda: sum(usage_of(a.db, "capped")[1:]) == sum(spent))


def test_redis_down_keeps_serving_with_local_limits_and_quotas_fail_closed(shared, redis_store):
    """Mid-load Redis dies: keys without a quota are served under each gateway's own limits,
    keys with one get 503, and once Redis is back quotas are shared again from the store."""
    a, b = shared
    steady = make_key(a.db, "steady", "--rpm", "100000")
    limited = make_key(a.db, "limited", "--rpm", "3")
    paying = make_key(a.db, "paying", "--quota-tokens", "100000")
    assert chat(a, paying).status_code == 200 and chat(b, paying).status_code == 200
    statuses: list[int] = []
    stop = threading.Event()

    def load(p) -> None:
        while not stop.is_set():
            statuses.append(chat(p, steady).status_code)

    threads = [threading.Thread(target=load, args=(p,)) for p in (a, b)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(statuses) > 20, timeout=30)
        redis_store.kill()
        down = len(statuses)
        wait_for(lambda: all(metric(p, "appliance_limits_shared") == 0 for p in shared))
        for p in shared:
            r = chat(p, paying)
            assert r.status_code == 503 and error_of(r)["code"] == "limits_store_unavailable"
            assert httpx.get(p.url + "/health").status_code == 200
        started = time.monotonic()
        local = {p.url: sum(chat(p, limited).status_code == 200 for _ in range(6)) for p in shared}
        print(f"rpm 3 while Redis is down, served per gateway: {sorted(local.values())}")
        assert all(3 <= n <= 3 + refilled(3, started) for n in local.values())
        wait_for(lambda: len(statuses) > down + 20, timeout=30)
        redis_store.start()
        wait_for(lambda: chat(a, paying).status_code == 200 and chat(b, paying).status_code == 200,
                 timeout=30)
        assert all(metric(p, "appliance_limits_shared") == 1 for p in shared)
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"{len(statuses)} requests of a key without quota, {statuses.count(200)} served")
    assert set(statuses) == {200}
    wait_for(lambda: usage_of(a.db, "steady")[0] == len(statuses))


def test_a_gateway_started_while_postgres_is_down_serves_once_it_is_back(pg, fake, tmp_path,
                                                                        keys_url):
    secret = make_key(keys_url, "early")
    pg.kill()
    try:
        with gateway(fake.url, tmp_path, keys_url=keys_url) as p:
            r = chat(p, secret)
            assert r.status_code == 503 and error_of(r)["code"] == "key_store_unavailable"
            pg.start()
            wait_for(lambda: chat(p, secret).status_code == 200, timeout=30)
    finally:
        if pg.proc.poll() is not None:
            pg.start()


def test_a_burst_wider_than_the_redis_pool_waits_for_connections(fake, tmp_path, keys_url,
                                                                 redis_store):
    """More requests at once than pooled connections: they queue for one, none sees Redis as
    down (a 503 for the quota key, or a fallback to local limits, would say it did)."""
    if redis_store.proc.poll() is not None:
        redis_store.start()
    with gateway(fake.url, tmp_path, keys_url=keys_url, limits_url=redis_store.url,
                 limits_pool_size=2) as p:
        secret = make_key(keys_url, "bursty", "--rpm", "100000", "--quota-tokens", "10000000")
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda _: chat(p, secret), range(96)))
        assert [r.status_code for r in answers] == [200] * 96
        assert metric(p, "appliance_limits_store_errors_total") == 0
        assert metric(p, "appliance_limits_shared") == 1
