"""Token quotas per calendar period (UTC): reserve before a request runs, settle after.

A request reserves an upper bound of what it can cost before it reaches the engine, and the
reservation is replaced by the engine's count when it ends. A key's settled use plus everything
reserved never exceeds its quota, so concurrent requests cannot take it past the quota however
they interleave; a request whose bound does not fit is refused (429 ``insufficient_quota``).

The bound: ``max_tokens`` (or the route's default) for each sequence the request asks for
(``n``, ``best_of``, every prompt of a list), and the body's length in bytes for the prompts:
a byte-level tokenizer's token covers at least one byte of text, and a chat template adds
fewer tokens per message than the JSON around the message takes bytes. The model's context
length, when the engine has said it, caps each sequence's prompt and completion together.
"""

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..keys.store import Key, period_end, period_label
from ..protocol.routes import Route


class QuotaExceeded(Exception):
    def __init__(self, key: str, quota: int, left: int, retry_after_s: float) -> None:
        super().__init__(key)
        self.key, self.quota, self.left, self.retry_after_s = key, quota, left, retry_after_s


def completion_bound(route: Route, body: dict | None, context: int | None) -> int | None:
    """The most tokens one sequence may generate, or None when nothing bounds it (the route
    runs to the end of the context and the context is not known)."""
    for name in route.cap_fields:
        value = (body or {}).get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return context if route.default_completion is None else route.default_completion


def reservation_for(route: Route, body: dict | None, body_bytes: int, context: int | None,
                    sequences: int = 1) -> int | None:
    """An upper bound of prompt + completion tokens over every sequence; None when there is
    none to be had."""
    completion = completion_bound(route, body, context)
    if completion is None:
        return None
    bound = body_bytes + sequences * completion
    return min(bound, sequences * context) if context else bound


@dataclass
class Account:
    period: str
    used: int
    reserved: int = 0


@dataclass(frozen=True)
class Reservation:
    key: str
    tokens: int
    period: str = ""
    id: str = ""
    """The period's label and the reservation's own name, where a shared book needs them."""


class LimitsUnavailable(Exception):
    """The shared limits store cannot answer: a key with a quota fails closed."""


@dataclass
class QuotaBook:
    """In-memory accounts for keys with a quota; a period's use is read from the store once.

    After that first read the book adds each settled request itself, so unflushed usage is
    never missed; the gateway is the only writer of usage.
    """

    read_used: Callable[[str, str], int]
    """(key name, period label) -> tokens used in the store; run in a thread."""
    accounts: dict[str, Account] = field(default_factory=dict)

    async def reserve(self, key: Key, tokens: int | None, now: float) -> Reservation | None:
        if key.quota_tokens is None:
            return None
        account = await self._account(key, now)
        quota = key.quota_tokens
        left = quota - account.used - account.reserved
        if tokens is None:
            tokens = max(left, 0)  # no bound: the request may spend whatever is left, alone
        if tokens > left or left <= 0:
            retry = period_end(key.quota_period, now) - now
            raise QuotaExceeded(key.name, quota, max(left, 0), retry)
        account.reserved += tokens
        return Reservation(key.name, tokens)

    def settle(self, reservation: Reservation | None, spent: int) -> None:
        if reservation is None:
            return
        account = self.accounts.get(reservation.key)
        if account is not None:
            account.reserved -= reservation.tokens
            account.used += spent

    async def _account(self, key: Key, now: float) -> Account:
        label = period_label(key.quota_period, now)
        account = self.accounts.get(key.name)
        if account is None or account.period != label:
            used = await asyncio.to_thread(self.read_used, key.name, label)
            reserved = account.reserved if account is not None else 0
            account = self.accounts.get(key.name)  # another request may have loaded it
            if account is None or account.period != label:
                account = Account(label, used, reserved)
                self.accounts[key.name] = account
        return account


def retry_after_text(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
