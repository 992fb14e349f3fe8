"""The whole request path on a real vLLM (CPU build, tiny model) behind the real proxy."""

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.e2e.engine_stack import MAX_MODEL_LEN, SERVED_NAME
from tests.integration.proxy_stack import keys_cli

GREEDY = {"temperature": 0.0}
IGNORE_EOS = {"ignore_eos": True}


def tokenized_length(vllm, **body) -> int:
    """How many prompt tokens vLLM counts, from its own /tokenize route."""
    response = httpx.post(
        vllm.url + "/tokenize",
        json={"model": SERVED_NAME, **body},
        headers={"Authorization": f"Bearer {vllm.key}"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["count"]


def ledger(gw, name: str) -> tuple[int, int, int]:
    """(requests, prompt tokens, completion tokens) that ``appliance-keys usage`` shows."""
    out = keys_cli(gw.db, "usage", name)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:] if line.split()[:1] == [name]]
    assert len(rows) == 1, out.stdout
    return int(rows[0][1]), int(rows[0][2]), int(rows[0][3])


def settled(read, interval: float = 0.3, timeout: float = 15.0):
    """Read a value until two reads ``interval`` apart agree (usage flushes, metric updates)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        if now == last:
            return now
        last = now
    return last


def eventually(check, timeout: float = 120.0, interval: float = 0.2) -> bool:
    """Poll ``check`` until it holds; the timeout only ends a wait for what never comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def test_engine_refuses_requests_without_the_internal_key(vllm):
    assert httpx.get(vllm.url + "/v1/models").status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    assert httpx.get(vllm.url + "/v1/models", headers=wrong).status_code == 401
    right = {"Authorization": f"Bearer {vllm.key}"}
    assert httpx.get(vllm.url + "/v1/models", headers=right).status_code == 200


def test_client_keys_do_not_reach_the_engine_directly(vllm, gw):
    client_key = {"Authorization": f"Bearer {gw.key('default')}"}
    assert httpx.get(vllm.url + "/v1/models", headers=client_key).status_code == 401


def test_models_lists_the_served_name(gw):
    models = gw.client().models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]


def test_completion_returns_text_and_usage(gw, vllm):
    prompt = "Once upon a time"
    result = gw.client().completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=16, extra_body=IGNORE_EOS, **GREEDY
    )
    assert result.choices[0].text
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 16
    assert result.usage.prompt_tokens == tokenized_length(vllm, prompt=prompt)
    assert result.usage.total_tokens == result.usage.prompt_tokens + 16


def test_chat_completion_returns_text_and_usage(gw, vllm):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me a story about a robot."},
    ]
    result = gw.client().chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=12, extra_body=IGNORE_EOS, **GREEDY
    )
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content
    assert result.usage.completion_tokens == 12
    assert result.usage.prompt_tokens == tokenized_length(
        vllm, messages=messages, add_generation_prompt=True
    )


def test_stream_arrives_in_chunks_ends_with_done_and_usage_reaches_the_ledger(gw):
    name = "e2e-stream-usage"
    client = gw.client(name)
    with client.chat.completions.with_streaming_response.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
        **GREEDY,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text
    assert len([c for c in chunks if c["choices"]]) >= 20
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 40
    expected = (1, usage["prompt_tokens"], usage["completion_tokens"])
    assert settled(lambda: ledger(gw, name)) == expected


ABANDON_TRIES = 5


def abandon_after_three_chunks(gw, body: dict) -> tuple[str, list[dict]]:
    """Open the stream, read three chunks, hang up; the response's id and the chunks."""
    with httpx.stream(
        "POST", gw.url + "/v1/completions", json=body, headers=gw.headers(), timeout=60
    ) as response:
        assert response.status_code == 200
        chunks = [
            json.loads(line.removeprefix("data: "))
            for line in itertools.islice(
                (line for line in response.iter_lines() if line.startswith("data: ")), 3
            )
        ]
    return chunks[0]["id"], chunks


def test_client_disconnect_mid_stream_stops_generation(gw, vllm):
    """A client that hangs up mid-stream gets its request aborted at vLLM, before its end.

    vLLM judges it, not a clock: a stream read to its end adds all its tokens to vLLM's
    generated-token counter and one finished request; an abandoned one, once vLLM is done with
    it, is logged as aborted, adds no finished request, and fewer tokens than it asked for. The
    stream is as long as the context allows, so a disconnect that lands late on a busy machine
    still lands before the end. (This vLLM counts no client abort in ``request_success_total``.)

    On a busy machine vLLM's front end can fall so far behind its engine that it delivers a
    whole stream at once, at its end (its output collector merges what the stream's reader has
    not taken yet; seen straight at vLLM too): then the client's first chunks are the stream's
    last and there is nothing left to abort. Such a try proves nothing either way and is made
    again, up to ``ABANDON_TRIES`` times; a gateway that does not abort fails every try.
    """
    tokens, finished = "vllm:generation_tokens_total", "vllm:request_success_total"
    full = MAX_MODEL_LEN - 24
    body = {
        "model": SERVED_NAME,
        "prompt": "Hello",
        "max_tokens": full,
        "stream": True,
        "ignore_eos": True,
    }

    before = settled(lambda: (vllm.metric(tokens), vllm.metric(finished)))
    with httpx.stream(
        "POST", gw.url + "/v1/completions", json=body, headers=gw.headers(), timeout=60
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
    completed_id = json.loads(lines[0].removeprefix("data: "))["id"]
    after_full = settled(lambda: (vllm.metric(tokens), vllm.metric(finished)))
    assert (after_full[0] - before[0], after_full[1] - before[1]) == (full, 1)
    assert not vllm.aborted(completed_id)

    delivered_whole = []
    for _ in range(ABANDON_TRIES):
        abandoned_id, chunks = abandon_after_three_chunks(gw, body)
        finished_before = after_full[1]
        assert eventually(
            lambda rid=abandoned_id, n=finished_before:
                vllm.aborted(rid) or vllm.metric(finished) > n
        ), "vLLM neither aborted nor finished the abandoned stream"
        after_abandoned = settled(lambda: (vllm.metric(tokens), vllm.metric(finished)))
        generated = after_abandoned[0] - after_full[0]
        if vllm.aborted(abandoned_id):
            break
        delivered_whole.append(generated)
        after_full = after_abandoned
    else:
        pytest.fail(f"vLLM finished every abandoned stream ({delivered_whole} tokens): the "
                    "gateway never aborted one, or vLLM delivered each whole at its end")
    print(f"abandoned stream generated {generated:.0f} of {full} tokens "
          f"({len(delivered_whole)} tries delivered whole before)")
    assert after_abandoned[1] == after_full[1]
    assert len(chunks) <= generated < full


def test_max_tokens_beyond_context_is_vllms_400_in_openai_shape(gw):
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client().chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=MAX_MODEL_LEN * 4,
        )
    assert caught.value.status_code == 400
    response = httpx.post(
        gw.url + "/v1/chat/completions",
        headers=gw.headers(),
        timeout=30,
        json={
            "model": SERVED_NAME,
            "max_tokens": MAX_MODEL_LEN * 4,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert "max_tokens" in error["message"]


def test_sixteen_concurrent_streams_all_complete(gw):
    client = gw.client()

    def stream(i: int) -> tuple[int, str | None]:
        tokens, finish = 0, None
        for chunk in client.completions.create(
            model=SERVED_NAME,
            prompt=f"Story number {i}:",
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        ):
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return tokens, finish

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(stream, range(16)))
    assert results == [(32, "length")] * 16


def test_no_key_reaches_the_engine_or_proxy_logs(vllm, gw):
    gw.key("default")
    logs = vllm.log.read_text() + gw.log.read_text()
    assert vllm.key not in logs
    for secret in gw.keys.values():
        assert secret not in logs
