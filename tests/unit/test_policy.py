"""Pure policy: deadlines, rate-limit buckets and headers, request checks, usage parsing."""

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol.body import parse_request, usage_requested
from proxy.protocol.errors import ProxyError
from proxy.protocol.usage import TokenUsage, from_json_body, take_usage, usage_of
from proxy.relay.forward import Forwarder, StreamOutcome
from proxy.settings import ProxySettings
from proxy.tenancy.deadlines import Deadlines, deadlines_for
from proxy.tenancy.limits import RateLimiter, reset_text

SETTINGS = ProxySettings(timeout_base_s=10, timeout_per_token_s=0.5, timeout_max_s=100,
                         stream_first_token_timeout_s=7, stream_idle_timeout_s=3,
                         short_timeout_s=2)


def test_deadline_grows_with_max_tokens_and_is_capped():
    assert deadlines_for({"max_tokens": 10}, True, SETTINGS) == Deadlines(total=15)
    assert deadlines_for({"max_completion_tokens": 20}, True, SETTINGS) == Deadlines(total=20)
    assert deadlines_for({"max_tokens": 10_000}, True, SETTINGS) == Deadlines(total=100)


def test_deadline_without_max_tokens_is_the_cap():
    assert deadlines_for({}, True, SETTINGS) == Deadlines(total=100)


def test_stream_gets_first_token_and_idle_deadlines_not_a_total():
    got = deadlines_for({"stream": True, "max_tokens": 5}, True, SETTINGS)
    assert got == Deadlines(first_token=7, idle=3)


def test_routes_that_generate_nothing_get_the_short_deadline():
    assert deadlines_for(None, False, SETTINGS) == Deadlines(total=2)


def headers(decision) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in decision.headers}


def test_request_bucket_admits_limit_then_refuses_with_retry_after():
    limiter = RateLimiter()
    for i in range(3):
        decision = limiter.decide("a", 3, None, now=100.0)
        assert decision.allowed
        assert headers(decision)["x-ratelimit-remaining-requests"] == str(2 - i)
    refused = limiter.decide("a", 3, None, now=100.0)
    assert not refused.allowed and refused.reason == "requests"
    assert refused.retry_after_s == pytest.approx(20.0)
    assert headers(refused)["x-ratelimit-limit-requests"] == "3"
    assert limiter.decide("a", 3, None, now=121.0).allowed


def test_one_keys_limit_never_touches_another():
    limiter = RateLimiter()
    assert limiter.decide("a", 1, None, now=0).allowed
    assert not limiter.decide("a", 1, None, now=0).allowed
    assert limiter.decide("b", 1, None, now=0).allowed


def test_token_bucket_refuses_once_usage_spent_it():
    limiter = RateLimiter()
    assert limiter.decide("a", None, 100, now=0).allowed
    limiter.spend_tokens("a", 150, now=0)
    refused = limiter.decide("a", None, 100, now=1)
    assert not refused.allowed and refused.reason == "tokens"
    assert headers(refused)["x-ratelimit-remaining-tokens"] == "0"
    assert limiter.decide("a", None, 100, now=60).allowed


def test_unlimited_key_carries_no_limit_headers():
    assert RateLimiter().decide("a", None, None, now=0).headers == []


@pytest.mark.parametrize(("seconds", "text"), [(0.12, "120ms"), (1, "1s"), (59.2, "1m0s"),
                                               (61, "1m1s")])
def test_reset_written_as_openai_does(seconds, text):
    assert reset_text(seconds) == text.encode()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages"),
        ({"model": 3}, "model"),
        ({"stream": "yes"}, "stream"),
        ({"prompt": {"a": 1}}, "prompt"),
        ({"stream_options": []}, "stream_options"),
    ],
)
def test_wrong_field_types_are_refused_naming_the_field(body, param):
    with pytest.raises(ProxyError) as caught:
        parse_request(json.dumps(body).encode())
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize("raw", [b"{", b"[1,2]", b"\xff", b"null"])
def test_malformed_or_non_object_json_is_refused(raw):
    with pytest.raises(ProxyError) as caught:
        parse_request(raw)
    assert caught.value.status == 400


def test_valid_request_keeps_unknown_fields():
    body = {"model": "m", "prompt": [[1, 2], [3]], "top_k": 5, "guided_json": {"a": 1}}
    assert parse_request(json.dumps(body).encode()) == body


def test_usage_is_requested_on_every_chunk_and_what_the_client_did_not_ask_is_stripped():
    body = {"stream": True, "stream_options": {"continuous_usage_stats": False}}
    content, strip_final, strip_running = usage_requested(body)
    assert json.loads(content)["stream_options"] == {"continuous_usage_stats": True,
                                                     "include_usage": True}
    assert strip_final and strip_running
    content, strip_final, strip_running = usage_requested(
        {"stream": True, "stream_options": {"include_usage": True}})
    assert not strip_final and strip_running
    both = {"stream": True, "stream_options": {"include_usage": True,
                                               "continuous_usage_stats": True}}
    assert usage_requested(both) == (None, False, False)


def test_usage_from_json_body():
    content = json.dumps({"choices": [], "usage": {"prompt_tokens": 3,
                                                   "completion_tokens": 4}}).encode()
    assert from_json_body(content) == TokenUsage(3, 4)
    assert from_json_body(b'{"data": []}') is None
    assert from_json_body(b'{"data": [], "usage": null}') is None
    # A "usage" in the generated text is escaped; the answer's own comes after its choices.
    tricky = {"choices": [{"message": {"content": '{"usage": {"prompt_tokens": 99}}'}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                        "prompt_tokens_details": {"cached_tokens": 2}},
              "kv_transfer_params": None}
    assert from_json_body(json.dumps(tricky).encode()) == TokenUsage(3, 4, cached_tokens=2)
    assert from_json_body(json.dumps(tricky, separators=(",", ":")).encode()) == TokenUsage(3, 4, 2)
    text_only = {"choices": [{"text": '"usage": {"prompt_tokens": 99}'}]}
    assert from_json_body(json.dumps(text_only).encode()) is None


# Shaped as vllm 0.32 writes them (pydantic, compact, exclude_unset).
RUNNING = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
           b'"choices":[{"index":0,"delta":{"content":" \\"usage\\": {"},"logprobs":null,'
           b'"finish_reason":null}],"usage":{"prompt_tokens":7,"total_tokens":10,'
           b'"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":0}}}')
FINAL = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[],"usage":{"prompt_tokens":7,"total_tokens":19,"completion_tokens":12}}')


def test_running_usage_is_read_and_cut_out_to_the_byte():
    event, usage, only_usage = take_usage(RUNNING, strip_running=True)
    assert usage == TokenUsage(7, 3) and not only_usage
    assert event == RUNNING[:RUNNING.index(b',"usage":{"prompt_tokens"')] + b"}"
    assert json.loads(event[5:])["choices"][0]["delta"]["content"] == ' "usage": {'
    assert take_usage(RUNNING, strip_running=False) == (RUNNING, TokenUsage(7, 3), False)


def test_the_final_usage_only_chunk_is_recognised_and_never_cut():
    assert take_usage(FINAL, strip_running=True) == (FINAL, TokenUsage(7, 12), True)
    spaced = b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 5}}'
    assert take_usage(spaced, strip_running=True)[1:] == (TokenUsage(2, 5), True)


def test_anthropic_usage_counts_cached_and_cache_written_tokens_as_prompt():
    final = b'{"input_tokens": 5, "output_tokens": 9, "cache_read_input_tokens": 32}'
    assert usage_of(final) == TokenUsage(37, 9, 32)
    written = b'{"input_tokens":5,"output_tokens":1,"cache_creation_input_tokens":4}'
    assert usage_of(written) == TokenUsage(9, 1, 0)
    assert usage_of(b'{"input_tokens": 12, "output_tokens": 0}') == TokenUsage(12, 0)


def test_events_without_usage_are_left_alone():
    text_event = b'data: {"choices":[{"delta":{"content":"the \\"usage\\": {x}"}}]}'
    assert take_usage(text_event, strip_running=True) == (text_event, None, False)


@settings(max_examples=300, deadline=None)
@given(content=st.text(), prompt=st.integers(0, 10**6), completion=st.integers(0, 10**6),
       details=st.booleans(), compact=st.booleans())
def test_a_chunks_running_usage_is_read_and_cut_whatever_its_text(content, prompt, completion,
                                                                   details, compact):
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": content}}]}
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    if details:
        usage["prompt_tokens_details"] = {"cached_tokens": 1}
    separators = (",", ":") if compact else (", ", ": ")
    event = b"data: " + json.dumps({**chunk, "usage": usage}, separators=separators).encode()
    cut, found, only_usage = take_usage(event, strip_running=True)
    assert found == TokenUsage(prompt, completion, 1 if details else 0) and not only_usage
    assert json.loads(cut[len(b"data: "):]) == chunk


def test_a_stream_reads_only_the_last_usage_it_relays():
    outcome = StreamOutcome()
    ex = SimpleNamespace(strip_chunk_usage=True, strip_final_usage=False)
    second = RUNNING.replace(b'"total_tokens":10,"completion_tokens":3',
                             b'"total_tokens":11,"completion_tokens":4')
    kept = Forwarder._take_usage(RUNNING + b"\n\n" + second + b"\n\n", ex, outcome)
    assert kept.count(b"data: ") == 2 and b'"usage"' not in kept.replace(b'\\"usage\\"', b"")
    assert outcome.usage_object.startswith(b'{"prompt_tokens":7,"total_tokens":11')
    assert outcome.usage == TokenUsage(7, 4)
