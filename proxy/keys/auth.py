"""A client's key (``Authorization: Bearer`` or ``x-api-key``) -> the key's record, through a
short-lived cache in front of the key store.

Fails closed: a store that cannot answer means 503, never a guessed yes. Entries live at most
``ttl`` seconds, so a revoked or expired key is refused within a second without a restart.
"""

import asyncio
import threading
import time
from collections.abc import Callable

from ..protocol.errors import ProxyError, unauthorized
from .store import Key, KeyReport, KeyStore, StoreUnavailable

CACHE_LIMIT = 10_000


def api_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The key's header: ``Authorization: Bearer <key>`` (OpenAI's), else ``x-api-key: <key>``
    (Anthropic's, as its SDK, curl examples and coding agents send it), read as a bearer."""
    header = headers.get(b"authorization")
    if header is None:
        key = headers.get(b"x-api-key")
        return None if key is None else b"Bearer " + key
    return header


def bearer_secret(header: bytes | None) -> str | None:
    """The secret from ``Authorization: Bearer <secret>``, or None when absent or malformed."""
    if not header:
        return None
    scheme, _, secret = header.decode("latin-1").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        return None
    return secret


class Authenticator:
    def __init__(self, open_store: Callable[[], KeyStore], ttl: float) -> None:
        self.open_store = open_store
        self.ttl = ttl
        self.cache: dict[str, tuple[Key | None, float]] = {}
        self.pending: dict[str, asyncio.Future] = {}
        self.lock = threading.Lock()
        self.store: KeyStore | None = None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    async def authenticate(self, header: bytes | None) -> Key:
        secret = bearer_secret(header)
        if secret is None:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <key>' or "
                               "'x-api-key: <key>'.")
        cached = self.cache.get(secret)
        if cached is None or time.monotonic() - cached[1] > self.ttl:
            key = await self._refresh(secret)
        else:
            key = cached[0]
        if key is None:
            raise unauthorized("Invalid API key.")
        if not key.usable(time.time()):
            state = "revoked" if key.revoked_at is not None else "expired"
            raise unauthorized(f"API key {key.name!r} is {state}.")
        return key

    async def _refresh(self, secret: str) -> Key | None:
        """One store lookup per secret at a time: concurrent misses share its answer."""
        pending = self.pending.get(secret)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._lookup, secret))
            self.pending[secret] = pending
            pending.add_done_callback(lambda _: self.pending.pop(secret, None))
        key = await asyncio.shield(pending)
        if len(self.cache) >= CACHE_LIMIT:
            self.cache.clear()
        self.cache[secret] = (key, time.monotonic())
        return key

    def _lookup(self, secret: str) -> Key | None:
        with self.lock:
            try:
                return self._store().lookup(secret)
            except StoreUnavailable as exc:
                raise store_error(exc) from exc

    def period_usage(self, name: str, period: str) -> int:
        """Tokens ``name`` used in ``period``, for its quota (blocking: run it in a thread)."""
        with self.lock:
            return self._store().period_usage(name, period)

    def reports(self) -> list[KeyReport]:
        """Every key with its use this period, for the quota gauges (blocking: run it in a
        thread)."""
        with self.lock:
            return self._store().reports()

    def _store(self) -> KeyStore:
        """The open store, reopened when it went away (a SQLite file removed or replaced)."""
        if self.store is None or not self.store.still_there():
            if self.store is not None:
                self.store.close()
                self.store = None
            self.store = self.open_store()
        return self.store


def store_error(exc: Exception) -> ProxyError:
    return ProxyError(503, "The key store is unavailable; try again shortly.",
                      "key_store_unavailable", headers={"Retry-After": "1"})
