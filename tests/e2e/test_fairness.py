"""One key's flood does not hold back another key's requests (issue 9's fair admission), on
real vLLM whose batch (``APPLIANCE_MAX_NUM_SEQS``) is small and known to the gateway.

Judged by order, never by time. A flood of six batches is sent at once; once a batch of it
streams, a quiet key sends short requests one after another. vLLM starts requests in the order
they reach it (its request log), so it tells who went first: first come, first served (vLLM's
own queue, or a gateway that only forwards) starts every flood request before any quiet one;
fair admission lets each quiet request in at the next free slot, ahead of the flood's backlog.
"""

import asyncio
import time

from tests.e2e.engine_stack import MAX_NUM_SEQS
from tests.e2e.noisy_neighbour import Stream, client_for, completion, timed_stream

FLOOD = 6 * MAX_NUM_SEQS
QUIET_REQUESTS = 3
QUIET_TOKENS = 4


def flood_tokens(i: int) -> int:
    """As long as the context allows, so that the flood's backlog moves slowly while a quiet
    request waits for its turn; spread, so that flood requests end one by one."""
    return 800 + 25 * (i % MAX_NUM_SEQS)


async def noisy_and_quiet(url: str, noisy_key: str, quiet_key: str) -> tuple[list, list]:
    """The whole flood at once; once a batch of it streams, the quiet requests one by one.

    A first quiet request before the flood, not judged, opens the quiet client's connection.
    """
    quiets: list[Stream] = []
    async with client_for(FLOOD) as noisy, client_for(1) as quiet:
        await timed_stream(quiet, url, quiet_key, completion("Quiet hello:", 1),
                           Stream(sent=time.perf_counter()))
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
            for i in range(QUIET_REQUESTS):
                record = Stream(sent=time.perf_counter())
                quiets.append(record)
                await timed_stream(quiet, url, quiet_key, completion(f"Quiet {i}:", QUIET_TOKENS),
                                   record)
        finally:
            flooding.cancel()
            await asyncio.gather(flooding, return_exceptions=True)
    return floods, quiets


def test_a_flood_from_one_key_does_not_queue_another_keys_requests_behind_it(gw, vllm):
    floods, quiets = asyncio.run(noisy_and_quiet(gw.url, gw.key("noisy"), gw.key("quiet")))
    vllm.wait_idle()

    assert [(q.status, q.done, q.error, q.tokens[-1:]) for q in quiets] == [
        (200, True, None, [QUIET_TOKENS])
    ] * QUIET_REQUESTS
    refused = [f for f in floods if f.status not in (200, None)]
    assert not refused, f"flood refused: {refused[0].status} {refused[0].error}"
    flood_ids = {f.id for f in floods}
    order = vllm.arrivals()
    for i, quiet in enumerate(quiets):
        assert quiet.id in order, f"vLLM logged no start for quiet request {i}"
        ahead = len(flood_ids & set(order[: order.index(quiet.id)]))
        print(f"quiet request {i} started after {ahead} of the {FLOOD} flood requests, all sent "
              "before it")
        assert ahead <= FLOOD - MAX_NUM_SEQS, (
            f"quiet request {i} started after {ahead} of the {FLOOD} flood requests")
