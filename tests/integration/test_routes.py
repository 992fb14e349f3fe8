"""The route table on the fake engine (fast): Anthropic's Messages governed like chat, unknown
routes refused in their API's shape, sequences counted. The real engine's side is in
``tests/e2e/test_every_generation_path.py``."""

import anthropic
import httpx
import pytest

from tests.integration.test_gateway import usage_row, wait_for

MODEL = "fake-model"
HELLO = [{"role": "user", "content": "one two three four"}]


def claude(gw, name: str, *options: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key(name, *options), max_retries=0)


def test_messages_plain_and_streamed_are_billed_from_anthropics_usage(gw):
    client = claude(gw, "msg-billed")
    answer = client.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (4, 5)
    with client.messages.stream(model=MODEL, max_tokens=7, messages=HELLO) as stream:
        assert "".join(stream.text_stream).split() == [f"tok{i}" for i in range(7)]
    wait_for(lambda: usage_row(gw, "msg-billed") == [2, 8, 12])


def test_a_message_stream_left_mid_way_is_billed_what_was_relayed(gw, fake):
    key = gw.key("msg-left")
    body = {"model": MODEL, "max_tokens": 200, "messages": HELLO, "stream": True,
            "fake": {"interval": 0.05}}
    disconnects = fake.stats()["disconnects"]
    deltas = 0
    with httpx.stream("POST", gw.url + "/v1/messages", json=body, timeout=10,
                      headers={"x-api-key": key}) as response:
        for line in response.iter_lines():
            deltas += line == "event: content_block_delta"
            if deltas == 5:
                break
    wait_for(lambda: fake.stats()["disconnects"] > disconnects)
    wait_for(lambda: usage_row(gw, "msg-left")[0] == 1)
    _, prompt, completion = usage_row(gw, "msg-left")
    assert prompt == 4 and 5 <= completion < 200


def test_a_message_stream_gets_the_stream_deadlines(tight):
    """Streams on /v1/messages have a first-token and an idle deadline, as chat's do."""
    key = tight.key("msg-idle")
    body = {"model": MODEL, "max_tokens": 3, "messages": HELLO, "stream": True,
            "fake": {"interval": 2}}
    with httpx.stream("POST", tight.url + "/v1/messages", json=body, timeout=10,
                      headers={"x-api-key": key}) as response:
        text = response.read().decode()
    assert response.status_code == 200
    last = text.rstrip("\n").rsplit("\n\n", 1)[-1]
    assert last.startswith("event: error") and '"type": "api_error"' in last
    assert "data: [DONE]" not in text


def test_the_sdk_raises_its_own_classes_for_the_gateways_refusals(gw):
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gw.url, api_key="nope", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=HELLO)
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude(gw, "msg-only-other", "--models", "other").messages.create(
            model=MODEL, max_tokens=4, messages=HELLO)
    assert caught.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.RateLimitError) as caught:
        claude(gw, "msg-quota", "--quota-tokens", "10").messages.create(
            model=MODEL, max_tokens=400, messages=HELLO)
    assert caught.value.response.headers["retry-after"]
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude(gw, "msg-bad").messages.create(model=MODEL, max_tokens=0, messages=HELLO)
    assert caught.value.body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "shape"), [
    ("/v1/load_lora_adapter", "openai"), ("/v1/fine_tuning/jobs", "openai"),
    ("/v1/messages/batches", "anthropic"),
])
def test_a_route_the_table_does_not_know_is_refused_not_forwarded(gw, fake, path, shape):
    fake_seen = fake.stats()["last_body"]
    response = httpx.post(gw.url + path, json={"marker": path}, headers=gw.headers("unknown"))
    assert response.status_code == 404
    if shape == "anthropic":
        assert response.json()["error"]["type"] == "not_found_error"
    else:
        assert response.json()["error"]["code"] == "not_found"
    assert fake.stats()["last_body"] == fake_seen


def test_count_tokens_is_answered_without_a_turn_or_a_reservation(gw):
    key = gw.key("msg-count", "--quota-tokens", "1")
    answer = httpx.post(gw.url + "/v1/messages/count_tokens", headers={"x-api-key": key},
                        json={"model": MODEL, "messages": HELLO})
    assert answer.status_code == 200 and answer.json() == {"input_tokens": 4}


def test_sequences_beyond_the_keys_concurrency_are_a_clear_400(gw):
    headers = gw.headers("seq-capped") | {}
    gw.key("seq-capped2", "--max-concurrent", "2")
    for body in ({"n": 3}, {"best_of": 3}, {"prompt": ["a", "b", "c"]}):
        answer = httpx.post(gw.url + "/v1/completions", headers=gw.headers("seq-capped2"),
                            json={"model": MODEL, "prompt": "x", "max_tokens": 2, **body})
        assert answer.status_code == 400, body
        assert answer.json()["error"]["code"] == "too_many_sequences"
    ok = httpx.post(gw.url + "/v1/completions", headers=headers,
                    json={"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 2})
    assert ok.status_code == 200
    for bad in ({"n": 0}, {"n": "two"}, {"best_of": -1}):
        answer = httpx.post(gw.url + "/v1/chat/completions", headers=headers,
                            json={"model": MODEL, "messages": HELLO, **bad})
        assert answer.status_code == 400 and answer.json()["error"]["param"] in ("n", "best_of")


def test_a_stream_asked_of_a_route_that_answers_in_one_piece_comes_as_the_engine_sent_it(gw):
    """vLLM answers embeddings in one JSON piece whatever ``stream`` says: the client gets that
    JSON with its content type, not a JSON body labelled as an event stream."""
    answer = httpx.post(gw.url + "/v1/embeddings", json={"model": MODEL, "input": "a b c",
                                                          "stream": True},
                        headers={"Authorization": f"Bearer {gw.key('embed-stream')}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["data"]
    wait_for(lambda: usage_row(gw, "embed-stream")[0] == 1)
