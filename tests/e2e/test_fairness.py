"""One key's flood does not hold back another key's requests (issue 9's fair admission), on
real vLLM whose batch (``APPLIANCE_MAX_NUM_SEQS``) is small and known to the gateway.

Judged by order, never by time. A flood of six batches is sent at once; once a batch of it
streams, a quiet key sends a few short requests together. vLLM starts requests in the order
they reach it (its request log), so it tells who went first: first come, first served (vLLM's
own queue, or a gateway that only forwards) starts every flood request before any quiet one;
fair admission gives the quiet key the next free slots, taking turns with the flood's backlog.

The quiet requests go together rather than one after another (as ``scripts/bench_fairness.py``
sends them) so that the order does not depend on how fast the machine is: how many flood
requests start while one quiet request runs is a matter of time, not of fairness. For the same
reason the gateway's /metrics say how many flood requests it had let in by the time all quiet
requests were in it: on 2 cores that vLLM's busy loop shares with the gateway and a client
reading the flood, the quiet requests can reach the gateway seconds after the client sent them,
and flood requests let in meanwhile did not go ahead of them. vLLM's log, the judge, is read
only at the end, complete.
"""

import asyncio
import re
import time

import httpx

from tests.e2e.engine_stack import MAX_NUM_SEQS
from tests.e2e.noisy_neighbour import Stream, client_for, completion, timed_stream

FLOOD = 6 * MAX_NUM_SEQS
QUIET_REQUESTS = 3
QUIET_TOKENS = 4


def flood_tokens(i: int) -> int:
    """As long as the context allows, so that the flood's backlog moves slowly while a quiet
    request waits for its turn; spread, so that flood requests end one by one."""
    return 800 + 25 * (i % MAX_NUM_SEQS)


def gauge(metrics: str, name: str, key: str) -> int:
    """One key's sample of a gateway metric, from its /metrics text (0 when absent)."""
    match = re.search(rf'^{name}{{key="{key}"}} (\S+)$', metrics, re.M)
    return int(float(match.group(1))) if match else 0


async def when_all_queued(client: httpx.AsyncClient, url: str, waited_before: int,
                          quieting: asyncio.Future) -> tuple[int, int]:
    """Once every quiet request is in the gateway (waiting, or let in after waiting: every slot
    is taken when they come), how many flood requests the gateway had let into the engine, and
    how many still waited: one /metrics answer, so one instant of the gateway's."""
    while not quieting.done():
        metrics = (await client.get(url + "/metrics")).text
        waited = gauge(metrics, "appliance_queue_wait_seconds_count", "quiet") - waited_before
        if gauge(metrics, "appliance_queue_depth", "quiet") + waited >= QUIET_REQUESTS:
            # The flood's first batch found free slots and never waited.
            let_in = MAX_NUM_SEQS + gauge(metrics, "appliance_queue_wait_seconds_count", "noisy")
            return let_in, gauge(metrics, "appliance_queue_depth", "noisy")
        await asyncio.sleep(0.05)
    return FLOOD, 0


async def noisy_and_quiet(url: str, noisy_key: str,
                          quiet_key: str) -> tuple[list, list, tuple[int, int]]:
    """The whole flood at once; once a batch of it streams, the quiet requests together.

    A first quiet request before the flood, not judged, opens the quiet client's connection.
    Also returns the flood requests let in and still waiting once the quiet requests were all
    in the gateway.
    """
    quiets: list[Stream] = []
    when_queued = (FLOOD, 0)
    async with client_for(FLOOD) as noisy, client_for(QUIET_REQUESTS) as quiet:
        await timed_stream(quiet, url, quiet_key, completion("Quiet hello:", 1),
                           Stream(sent=time.perf_counter()))
        waited_before = gauge((await quiet.get(url + "/metrics")).text,
                              "appliance_queue_wait_seconds_count", "quiet")
        floods = [Stream(sent=time.perf_counter()) for _ in range(FLOOD)]
        flooding = asyncio.gather(*(
            timed_stream(noisy, url, noisy_key, completion(f"Noisy story {i}:", flood_tokens(i)),
                         record)
            for i, record in enumerate(floods)
        ))
        try:
            while sum(f.first is not None for f in floods) < MAX_NUM_SEQS:
                if flooding.done():
                    break
                await asyncio.sleep(0.05)
            async with client_for(1) as observer:
                quiets = [Stream(sent=time.perf_counter()) for _ in range(QUIET_REQUESTS)]
                quieting = asyncio.gather(*(
                    timed_stream(quiet, url, quiet_key,
                                 completion(f"Quiet {i}:", QUIET_TOKENS), record)
                    for i, record in enumerate(quiets)
                ))
                when_queued = await when_all_queued(observer, url, waited_before, quieting)
            await quieting
        finally:
            flooding.cancel()
            await asyncio.gather(flooding, return_exceptions=True)
    return floods, quiets, when_queued


def test_a_flood_from_one_key_does_not_queue_another_keys_requests_behind_it(gw, vllm):
    floods, quiets, (started, backlog) = asyncio.run(
        noisy_and_quiet(gw.url, gw.key("noisy"), gw.key("quiet")))
    vllm.wait_idle()

    assert [(q.status, q.done, q.error, q.tokens[-1:]) for q in quiets] == [
        (200, True, None, [QUIET_TOKENS])
    ] * QUIET_REQUESTS
    refused = [f for f in floods if f.status not in (200, None)]
    assert not refused, f"flood refused: {refused[0].status} {refused[0].error}"
    flood_ids = {f.id for f in floods}
    # The premise: when the quiet requests came, a batch of the flood or more still waited.
    assert backlog >= MAX_NUM_SEQS, f"only {backlog} flood requests still waited"
    order = vllm.arrivals()
    for i, quiet in enumerate(quiets):
        assert quiet.id in order, f"vLLM logged no start for quiet request {i}"
        ahead = len(flood_ids & set(order[: order.index(quiet.id)]))
        print(f"quiet request {i} started after {ahead} of the {FLOOD} flood requests, "
              f"{started} of them started before it came")
        # Equal weights: quiet and flood take turns at each free slot from then on (started,
        # +1, +2), and requests let in at the same instant may reach vLLM in either order: a
        # margin of half a batch. First come, first served puts the whole backlog ahead too.
        assert ahead <= started + MAX_NUM_SEQS // 2, (
            f"quiet request {i} started after {ahead} of the {FLOOD} flood requests, "
            f"{started} of them started before it came")
