"""Quota policy without I/O: the bound a request reserves, and reserve/settle arithmetic."""

import asyncio

import pytest

from proxy.keys.store import Key
from proxy.protocol.routes import route_for
from proxy.tenancy.quota import QuotaBook, QuotaExceeded, completion_bound, reservation_for

NOW = 1_795_000_000.0  # 2026-11-18


def key(quota: int | None = 1000, period: str = "month") -> Key:
    return Key("k", "abcd", None, None, 0.0, None, None, quota_tokens=quota, quota_period=period)


@pytest.mark.parametrize(("path", "body", "context", "bound"), [
    ("/v1/chat/completions", {"max_tokens": 50}, 4096, 50),
    ("/v1/chat/completions", {"max_completion_tokens": 60, "max_tokens": 50}, 4096, 60),
    ("/v1/responses", {"max_output_tokens": 70}, None, 70),
    ("/v1/completions", {}, None, 16),
    ("/v1/chat/completions", {}, 4096, 4096),
    ("/v1/chat/completions", {}, None, None),
    ("/v1/embeddings", {"input": "x"}, None, 0),
])
def test_completion_bound_per_route(path, body, context, bound):
    assert completion_bound(route_for(path), body, context) == bound


def test_reservation_is_prompt_bytes_plus_completion_capped_by_the_context():
    chat = route_for("/v1/chat/completions")
    assert reservation_for(chat, {"max_tokens": 50}, 120, None) == 170
    assert reservation_for(chat, {"max_tokens": 50}, 5000, 1024) == 1024
    assert reservation_for(chat, {}, 100, None) is None


def test_reservation_counts_every_sequence_each_capped_by_the_context():
    chat, completions = route_for("/v1/chat/completions"), route_for("/v1/completions")
    assert reservation_for(chat, {"max_tokens": 30, "n": 6}, 100, None, 6) == 100 + 6 * 30
    assert reservation_for(completions, {"prompt": ["a", "b", "c"]}, 60, None, 3) == 60 + 3 * 16
    assert reservation_for(chat, {"max_tokens": 900}, 200, 1000, 4) == 200 + 4 * 900
    assert reservation_for(chat, {"max_tokens": 1000}, 200, 1000, 2) == 2 * 1000


def test_reservations_add_up_and_settle_to_what_was_spent():
    async def main():
        book = QuotaBook(lambda name, period: 100)
        first = await book.reserve(key(), 500, NOW)
        second = await book.reserve(key(), 400, NOW)
        with pytest.raises(QuotaExceeded) as caught:
            await book.reserve(key(), 1, NOW)
        assert caught.value.left == 0 and caught.value.retry_after_s > 0
        book.settle(first, 120)
        book.settle(second, 80)
        assert book.accounts["k"].used == 300 and book.accounts["k"].reserved == 0
        assert await book.reserve(key(), 700, NOW)
    asyncio.run(main())


def test_an_unbounded_request_takes_what_is_left_and_runs_alone():
    async def main():
        book = QuotaBook(lambda name, period: 0)
        alone = await book.reserve(key(), None, NOW)
        assert alone.tokens == 1000
        with pytest.raises(QuotaExceeded):
            await book.reserve(key(), 1, NOW)
    asyncio.run(main())


def test_a_new_period_reads_its_use_afresh_and_keeps_running_reservations():
    async def main():
        reads = []
        book = QuotaBook(lambda name, period: reads.append(period) or 900)
        running = await book.reserve(key(period="day"), 50, NOW)
        tomorrow = NOW + 86400
        with pytest.raises(QuotaExceeded):
            await book.reserve(key(period="day"), 60, tomorrow)
        assert reads == ["2026-11-18", "2026-11-19"]
        book.settle(running, 10)
        assert book.accounts["k"].reserved == 0
    asyncio.run(main())


def test_keys_without_a_quota_reserve_nothing():
    async def main():
        book = QuotaBook(lambda name, period: pytest.fail("no read for a key without quota"))
        assert await book.reserve(key(None), 10**9, NOW) is None
    asyncio.run(main())
