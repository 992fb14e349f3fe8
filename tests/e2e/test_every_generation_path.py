"""Every path that runs the model is governed, on the real engine: Anthropic's Messages API with
its own SDK, several choices and prompt lists held to a quota, and a prefix cache kept apart
per key (vLLM's ``cache_salt``, set by the gateway, never by the client)."""

import concurrent.futures
import json
import time

import anthropic
import httpx
import pytest

from tests.e2e.engine_stack import MAX_NUM_SEQS, SERVED_NAME
from tests.e2e.test_through_proxy import eventually, ledger, settled
from tests.integration.proxy_stack import gateway

LONG = 900  # tokens: a greedy answer of the tiny model runs to this cap
HELLO = [{"role": "user", "content": "Tell me a long story about the sea and its ships."}]


def claude(gw, name: str, *options: str, **kwargs) -> anthropic.Anthropic:
    """The ``anthropic`` SDK as a client would point it at the appliance: ``x-api-key``."""
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key(name, *options), max_retries=0,
                               **kwargs)


def billed(gw, name: str) -> tuple[int, int]:
    """(prompt, completion) tokens the key's ledger holds, once the usage flush has settled."""
    _, prompt, completion = settled(lambda: ledger(gw, name))
    return prompt, completion


def metric(url: str, name: str, label: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and label in line and not line.startswith("#"))


def test_the_anthropic_sdk_sends_x_api_key_and_is_answered_plain_and_streaming(gw):
    client = claude(gw, "e2e-claude")
    message = client.messages.create(model=SERVED_NAME, max_tokens=12, messages=HELLO)
    assert message.type == "message" and message.role == "assistant"
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 12
    with client.messages.stream(model=SERVED_NAME, max_tokens=12, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0 and isinstance(text, str)
    counted = client.messages.count_tokens(model=SERVED_NAME, messages=HELLO)
    assert counted.input_tokens == message.usage.input_tokens


def test_a_bad_key_is_the_sdks_authentication_error_in_anthropics_shape(gw):
    client = anthropic.Anthropic(base_url=gw.url, api_key="sk-app-not-a-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(model=SERVED_NAME, max_tokens=4, messages=HELLO)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        claude(gw, "e2e-claude-models", "--models", "another-model").messages.create(
            model=SERVED_NAME, max_tokens=4, messages=HELLO)


def test_a_rate_limited_key_gets_the_sdks_rate_limit_error_with_retry_after(gw):
    client = claude(gw, "e2e-claude-rpm", "--rpm", "1")
    client.messages.create(model=SERVED_NAME, max_tokens=4, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model=SERVED_NAME, max_tokens=4, messages=HELLO)
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_messages_are_billed_what_vllm_reported_and_held_to_the_quota(gw):
    name = "e2e-claude-quota"
    client = claude(gw, name, "--quota-tokens", "200")
    reported, refused = 0, None
    for _ in range(10):
        try:
            answer = client.messages.create(model=SERVED_NAME, max_tokens=20, messages=HELLO)
        except anthropic.RateLimitError as exc:
            refused = exc
            break
        reported += answer.usage.input_tokens + answer.usage.output_tokens
    assert refused is not None and refused.body["error"]["type"] == "rate_limit_error"
    assert "tokens left" in refused.body["error"]["message"]
    assert sum(billed(gw, name)) == reported <= 200


def test_a_long_message_is_not_cut_by_the_short_deadline(vllm, tmp_path):
    with gateway(vllm.url, tmp_path, engine_api_key=vllm.key, max_num_seqs=MAX_NUM_SEQS,
                 short_timeout_s=0.5) as short:
        client = claude(short, "e2e-claude-long", timeout=120)
        started = time.monotonic()
        answer = client.messages.create(model=SERVED_NAME, max_tokens=400, messages=HELLO)
        took = time.monotonic() - started
    assert took > 0.5, "the answer came within the short deadline: nothing was proven"
    assert answer.usage.output_tokens > 0


def leave_after_five_deltas(gw, key: str) -> None:
    """Read a long greedy answer's stream until its fifth content delta, then hang up."""
    body = {"model": SERVED_NAME, "max_tokens": LONG, "messages": HELLO, "stream": True,
            "temperature": 0.0}  # greedy: the same answer every run, as long as it was once
    deltas = 0
    with httpx.stream("POST", gw.url + "/v1/messages", json=body, timeout=60,
                      headers={"x-api-key": key}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            deltas += line == "event: content_block_delta"
            if deltas == 5:
                break
    assert deltas == 5, "the answer ended before the client left: nothing was proven"


def access_entry(gw, name: str) -> dict:
    """The key's one request in the gateway's access log (a line is written when it ends)."""
    found: list[dict] = []

    def logged() -> bool:
        found[:] = [entry for line in gw.log.read_text().splitlines() if line.startswith("{")
                    for entry in [json.loads(line)] if entry["key"] == name]
        return bool(found)

    assert eventually(logged, timeout=30), f"no access log line for {name}"
    assert len(found) == 1, found
    return found[0]


def test_a_stream_left_mid_way_is_aborted_and_billed_what_was_relayed(gw, vllm):
    """The tiny model on a loaded machine may finish the whole answer, and the gateway relay it,
    before the client's hang-up reaches the gateway (vLLM merges the steps of a lagging stream
    into a few large deltas). Such a try is billed exactly the whole answer and proves nothing
    about leaving, so the test tries again with a fresh key until the gateway saw the hang-up."""
    for attempt in range(4):
        name = f"e2e-claude-leave-{attempt}"
        leave_after_five_deltas(gw, gw.key(name))
        vllm.wait_idle()
        entry = access_entry(gw, name)
        assert eventually(lambda name=name: ledger(gw, name)[2] >= 5), ledger(gw, name)
        prompt, completion = billed(gw, name)
        assert prompt > 0
        if entry.get("error") == "client_disconnected":
            assert 5 <= completion < LONG, entry
            return
        assert completion <= LONG and "error" not in entry, entry
    pytest.fail("every answer was whole before the client left: leaving was never tested")


def concurrent_status(gw, key: str, route: str, bodies: list[dict]) -> list[int]:
    """Statuses of the bodies sent at once; every refusal must be the quota's."""
    def send(body: dict) -> int:
        answer = httpx.post(gw.url + route, json=body, timeout=120,
                            headers={"Authorization": f"Bearer {key}"})
        if answer.status_code == 429:
            assert answer.json()["error"]["code"] == "insufficient_quota", answer.text
        return answer.status_code

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def test_several_choices_never_overshoot_a_quota_under_concurrency(gw):
    """Each request may cost its prompt and 6 x 30 tokens: two never fit in the quota at once
    (counted as one sequence each, all four used to run and overshoot it)."""
    name = "e2e-n-quota"
    key = gw.key(name, "--quota-tokens", "600")
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hi there."}],
            "n": 6, "max_tokens": 30, "ignore_eos": True}
    statuses = concurrent_status(gw, key, "/v1/chat/completions", [body] * 4)
    assert 200 in statuses and set(statuses) <= {200, 429}
    assert 0 < sum(billed(gw, name)) <= 600


def test_prompt_lists_never_overshoot_a_quota_under_concurrency(gw):
    name = "e2e-prompts-quota"
    key = gw.key(name, "--quota-tokens", "400")
    body = {"model": SERVED_NAME, "prompt": ["Once upon a time", "In a land far away",
                                            "The ship sailed", "A storm came"],
            "max_tokens": 30, "ignore_eos": True}
    statuses = concurrent_status(gw, key, "/v1/completions", [body] * 4)
    assert 200 in statuses and set(statuses) <= {200, 429}
    assert 0 < sum(billed(gw, name)) <= 400


def test_more_sequences_than_the_engine_runs_at_once_is_a_clear_400(gw):
    key = gw.key("e2e-n-too-many")
    answer = httpx.post(gw.url + "/v1/completions", timeout=30,
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": SERVED_NAME, "prompt": "Once upon a time",
                              "n": MAX_NUM_SEQS + 1, "max_tokens": 2})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "too_many_sequences"


LONG_PROMPT = "The harbour wakes before the town. " * 40  # about 560 tokens: whole blocks


def prefix_hits(vllm, gw, key: str, salt: str = "guessed") -> float:
    """vLLM's prefix-cache hits that one completion of ``LONG_PROMPT`` adds."""
    before = vllm.metric("vllm:prefix_cache_hits_total")
    answer = httpx.post(gw.url + "/v1/completions", timeout=60,
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": SERVED_NAME, "prompt": LONG_PROMPT, "max_tokens": 1,
                              "cache_salt": salt})
    assert answer.status_code == 200
    return vllm.metric("vllm:prefix_cache_hits_total") - before


def test_a_second_key_never_hits_the_first_keys_prefix_cache(vllm, gw):
    first, second = gw.key("e2e-cache-a"), gw.key("e2e-cache-b")
    prefix_hits(vllm, gw, first)
    assert prefix_hits(vllm, gw, second) == 0, "the second key read the first key's cache"
    assert prefix_hits(vllm, gw, first) > 0, "a key's own repeat must stay cached"
    assert metric(gw.url, "appliance_prompt_cached_tokens_total", 'key="e2e-cache-a"') > 0


def test_keys_of_one_cache_group_share_their_cache(vllm, gw):
    first = gw.key("e2e-group-a", "--cache-group", "team")
    second = gw.key("e2e-group-b", "--cache-group", "team")
    prefix_hits(vllm, gw, first, salt="x")
    assert prefix_hits(vllm, gw, second, salt="y") > 0
