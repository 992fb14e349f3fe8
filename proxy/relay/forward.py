"""The forwarder: one shared connection pool to the engine, and the two ways of relaying.

A plain answer is read whole under the request's total deadline. A stream is relayed event by
event as each arrives, under a first-token deadline and an idle deadline between chunks.
Whenever the relay stops early (deadline, engine failure, client gone) the upstream response
is closed, which closes its connection, which makes vLLM abort the generation.
"""

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx

from ..protocol.engine_errors import STREAM_ERROR, stream_errors
from ..protocol.errors import ProxyError, engine_unavailable
from ..protocol.usage import TokenUsage, cut_usage, usage_of
from .engines import Engines
from .exchange import Exchange
from .transport import CONNECT_TIMEOUT_S, EngineAnswer

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"transfer-encoding", b"upgrade", b"content-length", b"host",
        b"authorization", b"date", b"server",
    }
)
log = logging.getLogger("appliance.proxy")
PARTIAL_EVENT_LIMIT = 1 << 20
FINISHED = re.compile(rb'"finish_reason":\s*"')
FINGERPRINT = re.compile(rb',\s*"system_fingerprint":\s*"[^"]*"')
# Anthropic's streams report usage at their start (the prompt) and in their last
# ``message_delta`` (everything), not on every event: a stream cut short is billed one token for
# each content delta relayed (vLLM sends one per engine step, each at least one token).
CONTENT_DELTA = b"event: content_block_delta"
MESSAGE_DELTA = b"event: message_delta"


def quote_path(path: str) -> bytes:
    """The request target for ``path`` (ASGI's, percent-decoded), escaped as httpx would."""
    if path.isascii() and " " not in path and "%" not in path and "?" not in path \
            and "#" not in path:
        return path.encode()
    return quote(path, safe="/:@!$&'()*+,;=-._~").encode()


def timeout_error(what: str) -> ProxyError:
    return ProxyError(504, f"The engine did not answer in time ({what}).", "timeout")


def upstream_failed(exc: Exception) -> ProxyError:
    return ProxyError(502, f"The engine failed while answering: {type(exc).__name__}.",
                      "upstream_error")


def client_headers(upstream: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in upstream if k.lower() not in HOP_BY_HOP]


class IdleWatch:
    """The idle deadline between chunks, with one timer per stream instead of one per chunk.

    Re-arming ``asyncio.Timeout`` on every chunk (twice: off while the client is written to, on
    while the engine is awaited) cancelled and created a timer each time, a quarter of a
    stream's CPU in profiles. Here a chunk only notes the time; the one timer, when it fires,
    expires the deadline if the engine has been awaited for ``idle_s``, else sleeps again until
    it could have been.
    """

    __slots__ = ("deadline", "idle_s", "loop", "timer", "waiting_since")

    def __init__(self, deadline: asyncio.Timeout, idle_s: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.deadline = deadline
        self.idle_s = idle_s
        self.loop = loop
        self.waiting_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    def awaiting_engine(self) -> None:
        self.waiting_since = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(self.waiting_since + self.idle_s, self._check)

    def writing_to_client(self) -> None:
        self.waiting_since = None

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        now = self.loop.time()
        expires = now + self.idle_s if self.waiting_since is None \
            else self.waiting_since + self.idle_s
        if expires > now:
            self.timer = self.loop.call_at(expires, self._check)
            return
        self.timer = None
        with contextlib.suppress(RuntimeError):  # the stream's deadline block has ended
            self.deadline.reschedule(now)


@dataclass
class StreamOutcome:
    """How a relayed stream ended, for accounting."""

    usage_object: bytes | None = None
    """The last usage the engine reported, as it sent it (``usage`` reads it)."""
    answered: bool = False
    """The client has had the answer's headers: later errors travel as an SSE event."""
    first_chunk_at: float | None = None
    error: ProxyError | None = None
    held: list[bytes] = field(default_factory=list)
    """Terminal chunks waiting for the usage chunk's fingerprint (see ``_take_usage``)."""
    deltas: int = 0
    """Anthropic's content deltas relayed (``CONTENT_DELTA``) ..."""
    final_usage: bool = False
    """... and whether its closing usage came (``MESSAGE_DELTA``)."""

    @property
    def usage(self) -> TokenUsage | None:
        usage = None if self.usage_object is None else usage_of(self.usage_object)
        if self.deltas and not self.final_usage:
            usage = usage or TokenUsage()
            return usage._replace(completion_tokens=max(usage.completion_tokens, self.deltas))
        return usage


class Forwarder:
    """Requests to an engine over its shared pool (``EngineTransport.send``); which engine is
    the exchange's (``Exchange.engine``, chosen by ``Engines.engine_for``).

    httpx's ``AsyncClient`` and its Request and Response objects are skipped on purpose:
    cookies, redirects, auth flows, URL parsing and header normalisation cost about half of a
    small request's CPU in profiles and mean nothing between the gateway and vLLM.
    """

    def __init__(self, engines: Engines, on_error: Callable[[str], None]) -> None:
        self.engines = engines
        self.engine_key = engines.engine_key
        self.on_error = on_error

    async def close(self) -> None:
        await self.engines.close()

    def _send(self, ex: Exchange) -> Awaitable[EngineAnswer]:
        target = quote_path(ex.path) + (b"?" + ex.query if ex.query else b"")
        return ex.engine.transport.send(ex.method.encode(), target, ex.upstream_headers,
                                        ex.content, CONNECT_TIMEOUT_S, None)

    def _failure(self, exc: httpx.HTTPError, ex: Exchange) -> ProxyError:
        """The client's error for a failed exchange with the engine; the cause goes to the log
        (the client gets only the kind of failure)."""
        log.warning("engine exchange failed: %s: %s", type(exc).__name__, exc)
        if isinstance(exc, httpx.ConnectError):
            ex.engine.ready = False  # it must be healthy and generate again before it serves
            self.on_error("connect")
            return engine_unavailable("The engine is not accepting connections.")
        self.on_error("transport")
        return upstream_failed(exc)

    async def call(self, ex: Exchange) -> EngineAnswer:
        """Send and read a whole answer; the caller's deadline bounds it and drops it when past."""
        response = None
        try:
            response = await self._send(ex)
            await response.aread()
            return response
        except httpx.HTTPError as exc:
            raise self._failure(exc, ex) from None
        finally:
            if response is not None:
                await response.aclose()

    async def open_stream(self, ex: Exchange) -> EngineAnswer:
        """Send and wait for the answer's headers; the caller's deadline bounds the wait."""
        try:
            return await self._send(ex)
        except httpx.HTTPError as exc:
            raise self._failure(exc, ex) from None

    async def relay(self, ex: Exchange, response: EngineAnswer, deadline: asyncio.Timeout,
                    outcome: StreamOutcome) -> None:
        """Send the client complete SSE events as they arrive, noting usage and stripping what
        we added (the answer's start is the caller's, and so is its end). Written rather than
        yielded: an async generator between the engine and the client was a step more on every
        event.

        ``deadline`` is already armed with the first-token deadline; from the first chunk on the
        idle deadline applies instead, counting only time spent awaiting the engine, not time
        spent writing to the client (``IdleWatch``).
        """
        watch = IdleWatch(deadline, ex.deadlines.idle, asyncio.get_running_loop())
        partial = b""
        next_chunk = response.stream.next_chunk
        send = ex.send
        anthropic = ex.route.stream_usage == "anthropic"
        try:
            while True:
                try:
                    chunk = await next_chunk()
                except httpx.HTTPError as exc:
                    outcome.error = self._failure(exc, ex)
                    break
                if not chunk:
                    break
                watch.writing_to_client()
                if outcome.first_chunk_at is None:
                    outcome.first_chunk_at = time.monotonic()
                    deadline.reschedule(None)  # the first-token deadline is met
                data = partial + chunk if partial else chunk
                cut = data.rfind(b"\n\n") + 2
                if cut == 1:
                    if len(data) <= PARTIAL_EVENT_LIMIT:
                        partial = data
                        watch.awaiting_engine()
                        continue
                    cut = len(data)
                ready, partial = data[:cut], data[cut:]
                if b'"usage"' in ready:
                    ready = self._take_usage(ready, ex, outcome)
                if anthropic:
                    outcome.deltas += ready.count(CONTENT_DELTA)
                    outcome.final_usage = outcome.final_usage or MESSAGE_DELTA in ready
                if STREAM_ERROR in ready:
                    ready = stream_errors(ready)
                if ready:
                    await send({"type": "http.response.body", "body": ready, "more_body": True})
                watch.awaiting_engine()
        finally:
            watch.close()
        if outcome.held:  # the usage chunk never came: relay the terminal chunks as they were
            partial = b"".join(_stamped(event, b"") for event in outcome.held) + partial
        if partial:
            await send({"type": "http.response.body", "body": partial, "more_body": True})

    @staticmethod
    def _take_usage(ready: bytes, ex: Exchange, outcome: StreamOutcome) -> bytes:
        """Note the latest usage; drop or cut what the gateway asked for on the client's behalf.

        vLLM stamps ``system_fingerprint`` on a stream's terminal chunks only when no usage chunk
        follows, and on the usage chunk otherwise. When that chunk is dropped, the terminal
        chunks are held until it arrives (at once: vLLM writes them back to back) and get the
        fingerprint it carried, so the client reads what vLLM sends a client without usage.
        """
        kept = []
        for event in ready.split(b"\n\n"):
            if not event:
                continue
            event, usage, only_usage = cut_usage(event, ex.strip_chunk_usage)
            if usage is not None:
                outcome.usage_object = usage
            if only_usage and ex.strip_final_usage:
                stamp = FINGERPRINT.search(event)
                kept.extend(_stamped(held, stamp.group(0) if stamp else b"")
                            for held in outcome.held)
                outcome.held.clear()
            elif ex.strip_final_usage and FINISHED.search(event):
                outcome.held.append(event)
            else:
                kept.append(event + b"\n\n")
        return b"".join(kept)


def _stamped(event: bytes, fingerprint: bytes) -> bytes:
    """The terminal chunk with the fingerprint as vLLM's last field, and its event's end."""
    if fingerprint and event.endswith(b"}"):
        event = event[:-1] + fingerprint + b"}"
    return event + b"\n\n"
