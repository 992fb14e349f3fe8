"""Per-key requests- and tokens-per-minute, as token buckets, and OpenAI's x-ratelimit-* headers.

A bucket holds up to ``limit`` units and refills at ``limit`` per minute, continuously, as
OpenAI describes its own limits. Requests take one unit when admitted; tokens are debited
after the engine reports usage, so a bucket may go negative and then refuses until it refills.
Each key has its own buckets: one key's limit never slows another.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

WINDOW_S = 60.0


@dataclass
class Bucket:
    limit: int
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        rate = self.limit / WINDOW_S
        self.level = min(float(self.limit), self.level + (now - self.stamp) * rate)
        self.stamp = now

    def seconds_until(self, level: float) -> float:
        """Time until the bucket holds ``level`` units again."""
        missing = level - self.level
        return max(0.0, missing * WINDOW_S / self.limit)


class Decision(NamedTuple):
    allowed: bool
    headers: list[tuple[bytes, bytes]]
    """``x-ratelimit-*``, as the answer will carry them."""
    retry_after_s: float = 0.0
    reason: str = ""


@dataclass
class KeyBuckets:
    requests: Bucket | None = None
    tokens: Bucket | None = None


def reset_text(seconds: float) -> bytes:
    """OpenAI writes resets as durations such as ``1s``, ``6m0s`` or ``120ms``."""
    if seconds < 1:
        return b"%dms" % math.ceil(seconds * 1000)
    whole = math.ceil(seconds)
    return b"%dm%ds" % divmod(whole, 60) if whole >= 60 else b"%ds" % whole


@dataclass
class RateLimiter:
    """In-memory buckets for each key name; limits come from the key store with each request."""

    buckets: dict[str, KeyBuckets] = field(default_factory=dict)

    def _for(self, name: str, rpm: int | None, tpm: int | None, now: float) -> KeyBuckets:
        kb = self.buckets.get(name)
        if kb is None:
            kb = self.buckets[name] = KeyBuckets()
        kb.requests = _resized(kb.requests, rpm, now)
        kb.tokens = _resized(kb.tokens, tpm, now)
        return kb

    async def admit(self, name: str, rpm: int | None, tpm: int | None, now: float) -> Decision:
        """The gateway's call; a fleet's SharedLimiter answers the same one from Redis."""
        return self.decide(name, rpm, tpm, now)

    def decide(self, name: str, rpm: int | None, tpm: int | None, now: float) -> Decision:
        kb = self._for(name, rpm, tpm, now)
        req, tok = kb.requests, kb.tokens
        if req is not None and req.level < 1:
            wait = req.seconds_until(1)
            return Decision(False, headers_for(req, tok), wait, "requests")
        if tok is not None and tok.level <= 0:
            wait = tok.seconds_until(1)
            return Decision(False, headers_for(req, tok), wait, "tokens")
        if req is not None:
            req.level -= 1
        return Decision(True, headers_for(req, tok))

    def spend_tokens(self, name: str, tokens: int, now: float) -> None:
        kb = self.buckets.get(name)
        if kb is not None and kb.tokens is not None and tokens:
            kb.tokens.refill(now)
            kb.tokens.level -= tokens


def _resized(bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
    """Follow a key's limit as the operator changes it, keeping what was already spent."""
    if not limit:
        return None
    if bucket is None:
        return Bucket(limit, float(limit), now)
    if bucket.limit != limit:
        bucket.level = min(bucket.level, float(limit))
        bucket.limit = limit
    bucket.refill(now)
    return bucket


def headers_for(req: Bucket | None, tok: Bucket | None) -> list[tuple[bytes, bytes]]:
    headers = []
    if req is not None:
        headers += [(b"x-ratelimit-limit-requests", b"%d" % req.limit),
                    (b"x-ratelimit-remaining-requests", b"%d" % max(0, math.floor(req.level))),
                    (b"x-ratelimit-reset-requests", reset_text(req.seconds_until(req.limit)))]
    if tok is not None:
        headers += [(b"x-ratelimit-limit-tokens", b"%d" % tok.limit),
                    (b"x-ratelimit-remaining-tokens", b"%d" % max(0, math.floor(tok.level))),
                    (b"x-ratelimit-reset-tokens", reset_text(tok.seconds_until(tok.limit)))]
    return headers
