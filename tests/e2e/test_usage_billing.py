"""Usage a client cannot escape, on the real engine: billed per chunk, bytes left as vLLM sends.

The gateway asks every stream for vLLM's running usage (``continuous_usage_stats``) and cuts
it out of each chunk before the client sees it, so hanging up before the end no longer means
a free stream, and a client that asked for nothing gets exactly what vLLM would send it.
"""

import re

import httpx

from tests.e2e.engine_stack import MAX_MODEL_LEN, SERVED_NAME
from tests.e2e.test_through_proxy import ledger, settled
from tests.integration.test_gateway import wait_for

ASKED = MAX_MODEL_LEN - 24
VOLATILE = re.compile(rb'"(id|created)":("[^"]*"|\d+)')
CONTENT = re.compile(rb'"content":"((?:[^"\\]|\\.)*)"')


def stream_shape(url: str, key: str, body: dict) -> tuple[bytes, list[bytes]]:
    """The stream's text, and its events byte for byte but for ids, times and text.

    vLLM may merge several tokens' text into one chunk when its reader falls behind, so two
    runs can cut the same text differently; everything else in each event must match.
    """
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200
        raw = VOLATILE.sub(rb'"\1":0', response.read())
    events = [event for event in raw.split(b"\n\n") if event]
    text = b"".join(match.group(1) for match in CONTENT.finditer(raw))
    return text, [CONTENT.sub(b'"content":""', event) for event in events]


def same_stream(through: tuple[bytes, list[bytes]], direct: tuple[bytes, list[bytes]]) -> None:
    assert through[0] == direct[0]
    assert set(through[1]) == set(direct[1])
    assert through[1][-2:] == direct[1][-2:]  # the terminal chunk and [DONE]


def test_a_streams_bytes_are_what_vllm_sends_a_client_that_asked_for_no_usage(gw, vllm):
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 12, "temperature": 0.0, "ignore_eos": True, "stream": True}
    key = gw.key("e2e-bytes")
    through = stream_shape(gw.url, key, body)
    same_stream(through, stream_shape(vllm.url, vllm.key, body))
    assert not any(b'"usage"' in event for event in through[1])
    assert b'"system_fingerprint"' in through[1][-2]
    asked_final = {**body, "stream_options": {"include_usage": True}}
    through = stream_shape(gw.url, key, asked_final)
    same_stream(through, stream_shape(vllm.url, vllm.key, asked_final))
    assert [b'"usage"' in event for event in through[1]].count(True) == 1


def test_an_abandoned_stream_is_billed_for_what_the_engine_generated(gw, vllm):
    """Every try is billed between half and all of what vLLM generated for it, and at least one
    of three is truly abandoned (vLLM stopped before the end).

    The stream is as long as the context allows (as in the disconnect test), yet the tiny model
    on CPU can still finish it before the hang-up reaches vLLM through two processes; such a try
    abandoned nothing, so it is billed but does not count as the abandoned one.
    """
    name = "e2e-abandon"
    body = {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": ASKED, "stream": True,
            "ignore_eos": True}
    tries = []
    for _ in range(3):
        generated, billed = abandon(gw, vllm, name, body)
        print(f"engine generated {generated:.0f} tokens, the key was billed {billed}")
        assert generated / 2 <= billed <= generated
        tries.append(generated)
        if generated < ASKED:
            break
    assert min(tries) < ASKED, f"vLLM ran every try to its end: {tries}"


def abandon(gw, vllm, name: str, body: dict) -> tuple[float, int]:
    """Read five events of a stream and hang up: what vLLM generated, what the key was billed."""
    counter = "vllm:generation_tokens_total"
    before_usage = settled(lambda: ledger(gw, name)) if gw.keys.get(name) else (0, 0, 0)
    before = settled(lambda: vllm.metric(counter))
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=gw.headers(name),
                      timeout=60) as response:
        chunks = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks += 1
                if chunks == 5:
                    break
    generated = settled(lambda: vllm.metric(counter)) - before
    wait_for(lambda: ledger(gw, name)[0] > before_usage[0], timeout=30)
    requests, _, completion = settled(lambda: ledger(gw, name))
    assert requests - before_usage[0] == 1
    return generated, completion - before_usage[2]
