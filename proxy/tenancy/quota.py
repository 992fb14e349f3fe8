"""Token quotas per calendar period (UTC): reserve before a request runs, settle after.

A request reserves an upper bound of what it can cost before it reaches the engine, and the
reservation is replaced by the engine's count when it ends. A key's settled use plus everything
reserved never exceeds its quota, so concurrent requests cannot take it past the quota however
they interleave; a request whose bound does not fit is refused (429 ``insufficient_quota``).

The bound: ``max_tokens`` (or the route's default) for the completion, and the body's length in
bytes for the prompt: a byte-level tokenizer's token covers at least one byte of text, and a
chat template adds fewer tokens per message than the JSON around the message takes bytes. The
model's context length, when the engine has said it, caps both together.
"""

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..keys.store import Key, period_end, period_label

# What the engine generates when the client names no limit, per route (vLLM's and OpenAI's
# default for completions); chat and Responses run to the end of the context.
DEFAULT_COMPLETION = {"/v1/completions": 16}
COMPLETION_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


class QuotaExceeded(Exception):
    def __init__(self, key: str, quota: int, left: int, retry_after_s: float) -> None:
        super().__init__(key)
        self.key, self.quota, self.left, self.retry_after_s = key, quota, left, retry_after_s


def completion_bound(path: str, body: dict | None, context: int | None) -> int | None:
    """The most tokens the request may generate, or None when only the context bounds it."""
    for name in COMPLETION_FIELDS:
        value = (body or {}).get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if path in DEFAULT_COMPLETION:
        return DEFAULT_COMPLETION[path]
    if path in ("/v1/chat/completions", "/v1/responses"):
        return context
    return 0


def reservation_for(path: str, body: dict | None, body_bytes: int,
                    context: int | None) -> int | None:
    """An upper bound of prompt + completion tokens; None when there is none to be had."""
    completion = completion_bound(path, body, context)
    if completion is None:
        return None
    bound = body_bytes + completion
    return min(bound, context) if context else bound


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
