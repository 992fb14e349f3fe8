"""A noisy key's flood and a quiet key's requests, every stream timed: the load behind
tests/e2e/test_fairness.py and bench/bench_fairness.py.

Each stream is a ``Stream`` record filled in as the response arrives, so a stream cancelled
half way (the flood is cancelled when a measurement ends) keeps what it had received.
"""

import asyncio
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from tests.e2e.engine_stack import SERVED_NAME

RESPONSE_ID = re.compile(rb'"id":\s*"([^"]+)"')
COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)\s*[,}]')
# A refused flood request waits this long before the next, so a refusing gateway is not spun on.
REFUSED_PAUSE_S = 0.2


@dataclass
class Stream:
    sent: float
    status: int | None = None
    id: str | None = None
    """The completion's id, as vLLM names it in its chunks and its request log."""
    """The response's status; None while none has come (or the connection failed)."""
    stamps: list[float] = field(default_factory=list)
    """When each read that carried tokens arrived ..."""
    tokens: list[int] = field(default_factory=list)
    """... and the completion's tokens so far at each, as vLLM counts them."""
    done: bool = False
    """``data: [DONE]`` arrived."""
    error: str | None = None

    @property
    def first(self) -> float | None:
        return self.stamps[0] if self.stamps else None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None


def completion(prompt: str, max_tokens: int) -> dict:
    """A streamed completion of exactly ``max_tokens`` tokens, every chunk with vLLM's count of
    the tokens so far."""
    return {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }


async def timed_stream(
    client: httpx.AsyncClient, url: str, key: str, body: dict, record: Stream
) -> Stream:
    """Send ``body`` to ``url``/v1/completions and fill ``record`` in as the answer arrives.

    Reads bytes and looks only for vLLM's running token count, never parsing a chunk: dozens of
    streams read event by event in Python fall seconds behind a fast engine on a small machine,
    and then the flood's timestamps and its queue depth would be the client's, not the server's.
    """
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with client.stream(
            "POST", url + "/v1/completions", json=body, headers=headers
        ) as response:
            record.status = response.status_code
            if response.status_code != 200:
                record.error = (await response.aread()).decode(errors="replace")[:200]
                return record
            tail = b""
            async for block in response.aiter_bytes():
                now = time.perf_counter()
                tail = tail[-64:] + block
                if b'"error"' in tail and record.error is None:
                    record.error = tail.decode(errors="replace")[-200:]
                if record.id is None and (named := RESPONSE_ID.search(tail)):
                    record.id = named.group(1).decode()
                counts = COMPLETION_TOKENS.findall(tail)
                if counts and int(counts[-1]) > 0 and (
                    not record.tokens or int(counts[-1]) > record.tokens[-1]
                ):
                    record.stamps.append(now)
                    record.tokens.append(int(counts[-1]))
                if b"data: [DONE]" in tail:
                    record.done = True
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def flood(
    client: httpx.AsyncClient,
    url: str,
    key: str,
    streams: int,
    body_for: Callable[[int, int], dict],
    records: list[Stream],
) -> None:
    """Keep ``streams`` requests in flight until cancelled: each of ``streams`` workers sends
    ``body_for(worker, n)`` again as soon as its previous stream ends. Every stream is appended
    to ``records`` as it is sent."""

    async def worker(i: int) -> None:
        for n in itertools.count():
            record = Stream(sent=time.perf_counter())
            records.append(record)
            await timed_stream(client, url, key, body_for(i, n), record)
            if record.status != 200:
                await asyncio.sleep(REFUSED_PAUSE_S)

    await asyncio.gather(*(worker(i) for i in range(streams)))


def client_for(streams: int, timeout: float = 300.0) -> httpx.AsyncClient:
    """An HTTP client with a connection for every stream, so none waits for the pool."""
    connections = streams + 4
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=timeout, limits=limits)
