"""The shared quota book and limiter against a real Redis (Debian's redis-server on loopback).

Each test plays several gateways as several books on one Redis, with a short lease, so a
gateway that dies holding a reservation and one that outlives a Redis restart take seconds.
"""

import asyncio
import time

import pytest

from proxy.keys.store import Key
from proxy.observe.metrics import Metrics
from proxy.tenancy import limits_redis
from proxy.tenancy.limits_redis import Link, SharedLimiter, SharedQuotaBook, connect
from proxy.tenancy.quota import LimitsUnavailable, QuotaExceeded
from tests.stores import redis_server

NOW = time.time()  # accounts expire at the end of NOW's month, on Redis's clock


@pytest.fixture(scope="module")
def redis_store():
    with redis_server() as server:
        yield server


@pytest.fixture
def url(redis_store, monkeypatch):
    if redis_store.proc.poll() is not None:
        redis_store.start()
    redis_store.flush()
    monkeypatch.setattr(limits_redis, "LEASE_S", 2)
    monkeypatch.setattr(limits_redis, "RETRY_S", 0.1)
    return redis_store.url


def key(quota: int | None = 100, rpm: int | None = None) -> Key:
    return Key("k", "abcd", rpm, None, 0.0, None, None, quota_tokens=quota)


def book(url: str, used: int = 0) -> tuple[SharedQuotaBook, Metrics]:
    metrics = Metrics()
    return SharedQuotaBook(Link(connect(url, 4, 0.25), metrics), lambda name, period: used), metrics


def shared_gauge(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("appliance_limits_shared")


def test_reservations_across_books_never_pass_the_quota(url):
    async def go():
        a, _ = book(url, used=10)
        b, _ = book(url, used=10)
        first = await a.reserve(key(), 60, NOW)
        with pytest.raises(QuotaExceeded) as refused:
            await b.reserve(key(), 40, NOW)
        assert refused.value.left == 30
        a.settle(first, 5)
        await asyncio.gather(*a.tasks)
        assert await b.reserve(key(), 85, NOW)

    asyncio.run(go())


def test_a_dead_gateways_reservation_lapses_and_a_live_one_is_renewed(url):
    async def go():
        dead, _ = book(url)
        live, _ = book(url)
        live.start()
        await dead.reserve(key(), 50, NOW)  # never settled: its gateway died
        await live.reserve(key(), 40, NOW)  # still running, renewed every LEASE_S / 3
        other, _ = book(url)
        with pytest.raises(QuotaExceeded):
            await other.reserve(key(), 20, NOW)
        await asyncio.sleep(limits_redis.LEASE_S + 1.5)
        with pytest.raises(QuotaExceeded):
            await other.reserve(key(), 61, NOW)  # the live 40 still holds
        assert await other.reserve(key(), 60, NOW)  # the dead 50 lapsed
        await live.stop()

    asyncio.run(go())


def test_redis_down_fails_quota_closed_and_replays_settlements(url, redis_store):
    async def go():
        a, metrics = book(url)
        running = await a.reserve(key(), 30, NOW)
        redis_store.kill()
        a.settle(running, 20)
        await asyncio.gather(*a.tasks)
        assert a.unsettled and shared_gauge(metrics) == 0
        with pytest.raises(LimitsUnavailable):
            await a.reserve(key(), 1, NOW)
        redis_store.start()
        await asyncio.sleep(0.2)
        # Redis lost everything: the account is read again from the store (here: 70 used).
        a.read_used = lambda name, period: 70
        with pytest.raises(QuotaExceeded) as refused:
            await a.reserve(key(), 31, NOW)
        assert refused.value.left == 30
        await asyncio.gather(*a.link.tasks, *a.tasks)
        assert not a.unsettled and shared_gauge(metrics) == 1

    asyncio.run(go())


def test_rate_limits_fall_back_to_the_gateways_own_buckets(url, redis_store):
    async def go():
        metrics = Metrics()
        limiter = SharedLimiter(Link(connect(url, 4, 0.25), metrics))
        other = SharedLimiter(Link(connect(url, 4, 0.25), Metrics()))
        assert (await limiter.admit("k", 2, None, 0.0)).allowed
        assert (await other.admit("k", 2, None, 0.0)).allowed
        shared = await limiter.admit("k", 2, None, 0.0)
        assert not shared.allowed and shared.reason == "requests"
        redis_store.kill()
        local = [(await limiter.admit("k", 2, None, 0.0)).allowed for _ in range(3)]
        assert local == [True, True, False]
        assert shared_gauge(metrics) == 0

    asyncio.run(go())


def test_a_call_waits_for_a_busy_pool_longer_than_redis_may_take_to_answer(url):
    """Every pooled connection taken is this gateway's congestion, not Redis down: a call waits
    for one past ``timeout_s`` (the bound on Redis itself) instead of failing."""
    async def go():
        client = connect(url, 1, 0.1)
        pool = client.connection_pool
        held = await pool.get_connection()
        asyncio.get_running_loop().call_later(0.5, lambda: asyncio.ensure_future(
            pool.release(held)))
        started = time.monotonic()
        assert await client.ping()
        assert time.monotonic() - started >= 0.4
        await client.aclose()

    asyncio.run(go())
