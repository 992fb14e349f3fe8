"""The route table, sequences, prefix-cache salts and Anthropic's error shape: pure, no I/O."""

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol import routes
from proxy.protocol.errors import ProxyError, engine_unavailable, unauthorized
from proxy.protocol.routes import api_of, completion_sequences, is_gateway_path, route_for
from proxy.protocol.salt import CacheSalts
from proxy.tenancy.admission import FairQueue, Tenant


def test_every_generating_route_is_governed_and_the_rest_is_not():
    assert route_for("/v1/messages").generates and route_for("/v1/messages").api == "anthropic"
    assert not route_for("/v1/messages/count_tokens").generates
    assert route_for("/v1/models/some/model").methods == ("GET",)
    assert route_for("/v1/models/") is None and route_for("/v1/load_lora_adapter") is None
    assert is_gateway_path("/v1/anything") and not is_gateway_path("/health")
    assert api_of("/v1/messages/batches") == "anthropic" and api_of("/v1/unknown") == "openai"
    salted = {path for path, route in routes.ROUTES.items() if route.salted}
    assert salted == {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}


@pytest.mark.parametrize(("body", "sequences"), [
    ({"prompt": "a"}, 1), ({"prompt": [1, 2, 3]}, 1), ({"prompt": ["a", "b", "c"]}, 3),
    ({"prompt": [[1, 2], [3]]}, 2), ({"prompt": ["a", "b"], "n": 3}, 6),
    ({"prompt": "a", "n": 2, "best_of": 5}, 5), ({"prompt": [], "n": None}, 1),
])
def test_completions_count_every_prompt_and_choice(body, sequences):
    assert completion_sequences(body) == sequences


def test_chat_counts_its_choices():
    assert routes.CHAT.sequences({"n": 4}) == 4 and routes.CHAT.sequences({}) == 1


def test_salts_differ_per_key_and_are_shared_within_a_group():
    salts = CacheSalts("secret")
    assert salts.salt_for("a") != salts.salt_for("b")
    assert salts.salt_for("a", "team") == salts.salt_for("b", "team") != salts.salt_for("team")
    assert CacheSalts("other").salt_for("a") != salts.salt_for("a")
    salt = salts.salt_for("a")
    assert len(salt) == 43 and not set(salt) & set("@/\\\0")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(body=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
       indent=st.sampled_from([None, 2]), lead=st.sampled_from(["", " ", "\n"]))
def test_the_salt_is_the_keys_whatever_the_body(body, indent, lead):
    raw = (lead + json.dumps(body, indent=indent)).encode()
    salts = CacheSalts("secret")
    salt = salts.salt_for("a")
    assert json.loads(salts.salted(body, raw, salt)) == {**body, "cache_salt": salt}


def test_errors_take_anthropics_shape_on_its_routes():
    err = unauthorized("Invalid API key.")
    assert json.loads(err.body("anthropic")) == {
        "type": "error", "error": {"type": "authentication_error", "message": "Invalid API key."}}
    assert engine_unavailable("away").payload("anthropic")["error"]["type"] == "overloaded_error"
    assert ProxyError(504, "slow", "timeout").payload("anthropic")["error"]["type"] == "api_error"
    assert ProxyError(429, "wait", "x").payload("anthropic")["error"]["type"] == "rate_limit_error"
    assert err.sse_event("anthropic").endswith(b"\n\n") and b"[DONE]" not in err.sse_event(
        "anthropic")
    assert err.sse_event().endswith(b"data: [DONE]\n\n")


def test_a_request_of_several_sequences_takes_as_many_slots_and_nobody_passes_it():
    async def main():
        queue = FairQueue(capacity=4, max_queued_per_key=10)
        order = []
        small, big = Tenant("small"), Tenant("big")
        assert queue.fits(big, 4) and not queue.fits(big, 5)
        assert not queue.fits(Tenant("capped", max_concurrent=2), 3)
        hold = queue.slot(small, size=3)
        await hold.__aenter__()

        async def run(tenant, size, name):
            async with queue.slot(tenant, size=size):
                order.append(name)
                await asyncio.sleep(0.01)

        waiting = [asyncio.create_task(run(big, 4, "big"))]
        await asyncio.sleep(0)
        waiting.append(asyncio.create_task(run(small, 1, "small")))
        await asyncio.sleep(0.01)
        assert order == [] and queue.running == 3
        await hold.__aexit__(None, None, None)
        await asyncio.gather(*waiting)
        assert order == ["big", "small"] and queue.running == 0

    asyncio.run(main())
