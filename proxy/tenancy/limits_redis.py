"""Rate limits and quotas shared by every gateway of a fleet, in Redis (``APPLIANCE_LIMITS_URL``).

The same policy as ``limits.py`` and ``quota.py``, kept where all gateways see it: each check
is one Lua script (``lua/``), so it is atomic however gateways interleave, and it runs on
Redis's clock. ``SharedLimiter`` and ``SharedQuotaBook`` have the interfaces of RateLimiter and
QuotaBook, so the gateway does not know which it has.

When Redis cannot answer, the two fail differently, on purpose:
- rate limits fall back to this gateway's own buckets (what one appliance does alone): service
  goes on, and a fleet of N gateways admits up to N times a key's rpm/tpm until Redis is back;
- quotas fail closed: a key with a quota gets 503 ``limits_store_unavailable``, since no
  gateway alone knows what the others spent. Keys without a quota are not affected.
``appliance_limits_shared`` (1 shared, 0 local) and one log line each way say which holds.
After an error Redis is left alone for ``RETRY_S`` so an outage costs no timeout per request.
Settlements Redis missed are replayed when it answers again; an account Redis lost is read
back from the key store.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..keys.store import Key, period_end, period_label
from ..observe.metrics import Metrics
from .limits import WINDOW_S, Bucket, Decision, RateLimiter, headers_for
from .quota import LimitsUnavailable, QuotaExceeded, Reservation

log = logging.getLogger("appliance.proxy")
RETRY_S = 1.0
POOL_WAIT_S = 10.0
LEASE_S = 30
PREFIX = "appliance:"


def script(name: str) -> str:
    return resources.files("proxy.tenancy").joinpath("lua", f"{name}.lua").read_text()


def connect(url: str, pool_size: int, timeout_s: float) -> aioredis.Redis:
    """One client over ``pool_size`` connections; no retries: an error falls through.

    ``timeout_s`` bounds what Redis itself takes (connecting, answering). A busy pool is this
    gateway's own congestion, not Redis failing: a call waits up to ``POOL_WAIT_S`` for a free
    connection, so a burst of requests on a loaded machine is not mistaken for Redis being down
    (which would refuse every quota key for ``RETRY_S``).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=max(POOL_WAIT_S, timeout_s),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    return aioredis.Redis(connection_pool=pool)


class Link:
    """Whether Redis answers: the metric, the log lines, and the pause after an error."""

    def __init__(self, client: aioredis.Redis, metrics: Metrics) -> None:
        self.client = client
        self.metrics = metrics
        self.down_until = 0.0
        self.up = True
        self.on_recovery: list[Callable[[], Awaitable[None]]] = []
        self.tasks: set[asyncio.Task] = set()
        metrics.limits_shared.set(1)

    def usable(self) -> bool:
        return self.up or time.monotonic() >= self.down_until

    def failed(self, exc: Exception) -> None:
        self.metrics.limits_store_errors.inc()
        self.down_until = time.monotonic() + RETRY_S
        if self.up:
            log.error("limits store unreachable, rate limits are this gateway's own and keys "
                      "with a quota get 503 until it answers: %s", exc)
            self.up = False
            self.metrics.limits_shared.set(0)

    def answered(self) -> None:
        if not self.up:
            log.warning("limits store answers again; rate limits and quotas are shared")
            self.up = True
            self.metrics.limits_shared.set(1)
            for replay in self.on_recovery:
                task = asyncio.ensure_future(replay())
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)


class SharedLimiter:
    """RateLimiter over Redis; this gateway's own RateLimiter while Redis cannot answer."""

    def __init__(self, link: Link, local: RateLimiter | None = None) -> None:
        self.link = link
        self.local = local or RateLimiter()
        self.admit_script = link.client.register_script(script("admit"))
        self.spend_script = link.client.register_script(script("spend"))
        self.tasks: set[asyncio.Task] = set()
        self.tpm: dict[str, int | None] = {}

    async def admit(self, name: str, rpm: int | None, tpm: int | None, now: float) -> Decision:
        self.tpm[name] = tpm
        if not (rpm or tpm):
            return self.local.decide(name, rpm, tpm, now)
        if self.link.usable():
            try:
                allowed, reason, req, tok = await self.admit_script(
                    keys=[f"{PREFIX}rl:{name}:requests", f"{PREFIX}rl:{name}:tokens"],
                    args=[rpm or 0, tpm or 0, WINDOW_S])
            except RedisError as exc:
                self.link.failed(exc)
            else:
                self.link.answered()
                requests = Bucket(rpm, float(req), now) if rpm else None
                tokens = Bucket(tpm, float(tok), now) if tpm else None
                reason = reason.decode() if isinstance(reason, bytes) else reason
                wait = 0.0
                if not allowed:
                    wait = (requests if reason == "requests" else tokens).seconds_until(1)
                return Decision(bool(allowed), headers_for(requests, tokens), wait, reason)
        return self.local.decide(name, rpm, tpm, now)

    def spend_tokens(self, name: str, tokens: int, now: float) -> None:
        tpm = self.tpm.get(name)
        if not tpm or not tokens:
            return
        if not self.link.usable():
            self.local.spend_tokens(name, tokens, now)
            return
        task = asyncio.ensure_future(self._spend(name, tokens, now, tpm))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _spend(self, name: str, tokens: int, now: float, tpm: int) -> None:
        try:
            await self.spend_script(keys=[f"{PREFIX}rl:{name}:tokens"],
                                    args=[tpm, tokens, WINDOW_S])
        except RedisError as exc:
            self.link.failed(exc)
            self.local.spend_tokens(name, tokens, now)
        else:
            self.link.answered()


class SharedQuotaBook:
    """QuotaBook over Redis: one account per key and period, reservations held as leases.

    A gateway renews the leases of its requests in flight every ``LEASE_S / 3`` seconds, so a
    stream may run as long as it likes, and the reservations of a gateway that died lapse
    within ``LEASE_S``.
    """

    def __init__(self, link: Link, read_used: Callable[[str, str], int]) -> None:
        self.link = link
        self.read_used = read_used
        client = link.client
        self.reserve_script = client.register_script(script("reserve"))
        self.settle_script = client.register_script(script("settle"))
        self.renew_script = client.register_script(script("renew"))
        self.held: dict[str, tuple[Reservation, int]] = {}
        self.unsettled: list[tuple[Reservation, int]] = []
        self.task: asyncio.Task | None = None
        self.tasks: set[asyncio.Task] = set()
        link.on_recovery.append(self.replay)

    @staticmethod
    def account_keys(name: str, period: str) -> list[str]:
        account = f"{PREFIX}quota:{name}:{period}"
        return [account, account + ":reservations"]

    async def reserve(self, key: Key, tokens: int | None, now: float) -> Reservation | None:
        if key.quota_tokens is None:
            return None
        if not self.link.usable():
            raise LimitsUnavailable("limits store unreachable")
        label = period_label(key.quota_period, now)
        ends = int(period_end(key.quota_period, now))
        rid = uuid.uuid4().hex
        keys = self.account_keys(key.name, label)
        used = ""
        try:
            for _ in range(2):
                answer = await self.reserve_script(
                    keys=keys, args=[key.quota_tokens, -1 if tokens is None else tokens, used,
                                     rid, LEASE_S, ends])
                if answer[0] != -1:
                    break
                used = str(await asyncio.to_thread(self.read_used, key.name, label))
        except RedisError as exc:
            self.link.failed(exc)
            raise LimitsUnavailable(str(exc)) from exc
        self.link.answered()
        ok, amount = int(answer[0]), int(answer[1])
        if not ok:
            retry = period_end(key.quota_period, now) - now
            raise QuotaExceeded(key.name, key.quota_tokens, max(amount, 0), retry)
        reservation = Reservation(key.name, amount, label, rid)
        self.held[rid] = (reservation, ends)
        return reservation

    def settle(self, reservation: Reservation | None, spent: int) -> None:
        if reservation is None:
            return
        self.held.pop(reservation.id, None)
        task = asyncio.ensure_future(self._settle(reservation, spent))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _settle(self, reservation: Reservation, spent: int) -> None:
        try:
            await self.settle_script(keys=self.account_keys(reservation.key, reservation.period),
                                     args=[reservation.id, spent])
        except RedisError as exc:
            self.link.failed(exc)
            self.unsettled.append((reservation, spent))
        else:
            self.link.answered()

    async def replay(self) -> None:
        """Settle what Redis missed while it was away, so its accounts miss no spending."""
        pending, self.unsettled = self.unsettled, []
        for reservation, spent in pending:
            await self._settle(reservation, spent)

    def start(self) -> None:
        self.task = asyncio.create_task(self._renew_leases())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            for rid, (reservation, ends) in list(self.held.items()):
                if rid not in self.held or not self.link.usable():
                    continue
                try:
                    await self.renew_script(
                        keys=self.account_keys(reservation.key, reservation.period)[1:],
                        args=[rid, reservation.tokens, LEASE_S, ends])
                except RedisError as exc:
                    self.link.failed(exc)
