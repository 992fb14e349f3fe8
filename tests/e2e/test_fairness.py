"""One key's flood does not hold back another key's requests (issue 9's fair admission), on
real vLLM whose batch (``APPLIANCE_MAX_NUM_SEQS``) is small and known to the gateway.

Judged by order on the gateway's own clock, never by the client's. A flood of six batches is
sent at once; once most of it waits in the gateway, a quiet key sends a few short requests
together. The gateway's access log says when each request asked for its turn at the engine and
when the engine got it (``ts`` plus ``queued_ms``, plus ``admitted_ms``), and
real vLLM decides when a slot frees. First come, first served (vLLM's own queue, or a gateway
that only forwards) lets every flood request that waited when a quiet one came go before it;
fair admission gives the quiet key the next free slots, taking turns with the flood's backlog.

The client's timing does not enter the judgement: on 2 cores that vLLM's busy loop shares with
the gateway and a client reading the flood, a request's body can reach the gateway seconds after
its headers, and the quiet requests reach it one by one. Each is judged from the instant it
joined the queue: which flood requests waited then, and how many of those went before it.
"""

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.e2e.engine_stack import MAX_NUM_SEQS
from tests.e2e.noisy_neighbour import Stream, client_for, completion, timed_stream

FLOOD = 6 * MAX_NUM_SEQS
QUIET_REQUESTS = 3
QUIET_TOKENS = 4
BACKLOG_BEFORE_QUIET = 3 * MAX_NUM_SEQS
"""Flood requests waiting in the gateway before the quiet key sends."""
LOG_TIMEOUT_S = 60.0
SAME_INSTANT_S = 50e-6
"""The log's instants are to the microsecond, and the gateway hands several free slots out
microseconds apart: flood requests let in that close before a quiet one may be after it."""


def flood_tokens(i: int) -> int:
    """As long as the context allows, so that the flood's backlog moves slowly while a quiet
    request waits for its turn; spread, so that flood requests end one by one."""
    return 800 + 25 * (i % MAX_NUM_SEQS)


def gauge(metrics: str, name: str, key: str) -> int:
    """One key's sample of a gateway metric, from its /metrics text (0 when absent)."""
    match = re.search(rf'^{name}{{key="{key}"}} (\S+)$', metrics, re.M)
    return int(float(match.group(1))) if match else 0


@dataclass(frozen=True)
class Turn:
    """One request as the gateway saw it, on its clock: when it joined its key's queue and when
    the engine got it (never: infinity, e.g. a flood request cancelled while it waited)."""

    queued: float
    admitted: float


def logged(log: Path, offset: int, key: str, count: int) -> list[dict]:
    """The key's completions in the gateway's access log after ``offset``, once all ``count``
    of them are there (a line is written when its request ends)."""
    deadline = time.monotonic() + LOG_TIMEOUT_S
    while True:
        lines = [json.loads(line) for line in log.read_text()[offset:].splitlines()
                 if line.startswith("{")]
        found = [e for e in lines if e["key"] == key and e["route"] == "/v1/completions"]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"{len(found)} of {count} {key} requests logged"
        time.sleep(0.2)


def turns(entries: list[dict]) -> list[Turn]:
    """Those of the requests that joined their key's queue (the others were refused, or
    cancelled before), in queue order."""
    return sorted(
        (Turn(e["ts"] + e["queued_ms"] / 1000, e["ts"] + e.get("admitted_ms", math.inf) / 1000)
         for e in entries if "queued_ms" in e),
        key=lambda turn: turn.queued,
    )


async def until_backlog(client: httpx.AsyncClient, url: str, flooding: asyncio.Future) -> None:
    """Until enough of the flood waits in the gateway (or the flood ended, which the test's
    premise then catches)."""
    while not flooding.done():
        metrics = (await client.get(url + "/metrics")).text
        if gauge(metrics, "appliance_queue_depth", "noisy") >= BACKLOG_BEFORE_QUIET:
            return
        await asyncio.sleep(0.05)


async def noisy_and_quiet(url: str, noisy_key: str, quiet_key: str) -> tuple[list, list]:
    """The whole flood at once; once it waits in the gateway, the quiet requests together.

    A first quiet request before the flood, not judged, opens the quiet client's connection.
    """
    async with client_for(FLOOD) as noisy, client_for(QUIET_REQUESTS + 1) as quiet:
        await timed_stream(quiet, url, quiet_key, completion("Quiet hello:", 1),
                           Stream(sent=time.perf_counter()))
        floods = [Stream(sent=time.perf_counter()) for _ in range(FLOOD)]
        flooding = asyncio.gather(*(
            timed_stream(noisy, url, noisy_key, completion(f"Noisy story {i}:", flood_tokens(i)),
                         record)
            for i, record in enumerate(floods)
        ))
        try:
            await until_backlog(quiet, url, flooding)
            quiets = [Stream(sent=time.perf_counter()) for _ in range(QUIET_REQUESTS)]
            await asyncio.gather(*(
                timed_stream(quiet, url, quiet_key, completion(f"Quiet {i}:", QUIET_TOKENS),
                             record)
                for i, record in enumerate(quiets)
            ))
        finally:
            flooding.cancel()
            await asyncio.gather(flooding, return_exceptions=True)
    return floods, quiets


def test_a_flood_from_one_key_does_not_queue_another_keys_requests_behind_it(gw, vllm):
    offset = len(gw.log.read_text())
    floods, quiets = asyncio.run(noisy_and_quiet(gw.url, gw.key("noisy"), gw.key("quiet")))
    vllm.wait_idle()

    assert [(q.status, q.done, q.error, q.tokens[-1:]) for q in quiets] == [
        (200, True, None, [QUIET_TOKENS])
    ] * QUIET_REQUESTS
    refused = [f for f in floods if f.status not in (200, None)]
    assert not refused, f"flood refused: {refused[0].status} {refused[0].error}"
    started_by_vllm = set(vllm.arrivals())
    assert all(q.id in started_by_vllm for q in quiets), "vLLM logged no start for a quiet one"

    flood = turns(logged(gw.log, offset, "noisy", FLOOD))
    judged = turns(logged(gw.log, offset, "quiet", 1 + QUIET_REQUESTS))[1:]
    assert len(judged) == QUIET_REQUESTS
    for i, quiet in enumerate(judged):
        waiting = [f for f in flood if f.queued < quiet.queued < f.admitted]
        ahead = [f for f in waiting if f.admitted < quiet.admitted - SAME_INSTANT_S]
        print(f"quiet request {i}: {len(waiting)} flood requests waited when it came, "
              f"{len(ahead)} of them went first; it waited "
              f"{(quiet.admitted - quiet.queued) * 1000:.0f} ms")
        # The premise: first come, first served would have let a whole batch or more go first.
        assert len(waiting) >= MAX_NUM_SEQS, f"only {len(waiting)} flood requests waited"
        # Equal weights: the quiet key takes the next free slot and then every other one, so
        # its i-th request goes after at most i flood requests.
        assert len(ahead) <= i, (
            f"quiet request {i} went after {len(ahead)} of the {len(waiting)} flood requests "
            "that waited when it came")
