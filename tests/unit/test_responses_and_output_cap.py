"""The Responses route's fields, the default output cap, and usage in Responses' words."""

import json

import pytest

from proxy.protocol import routes
from proxy.protocol.body import output_cap, parse_request, with_output_cap
from proxy.protocol.errors import ProxyError
from proxy.protocol.usage import from_json_body, take_usage
from proxy.settings import ProxySettings
from proxy.tenancy.deadlines import deadlines_for

RESPONSES = "/v1/responses"
CHAT = "/v1/chat/completions"
SETTINGS = ProxySettings(_env_file=None, timeout_base_s=30, timeout_per_token_s=0.05,
                         timeout_max_s=600)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"max_output_tokens": "ten"}, "max_output_tokens", "invalid_type"),
        ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
        ({"max_output_tokens": True}, "max_output_tokens", "invalid_type"),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"model": 3}, "model", "invalid_type"),
        ({"input": 42}, "input", "invalid_type"),
        ({"input": [1, 2]}, "input", "invalid_type"),
    ],
)
def test_responses_fields_the_gateway_acts_on_are_checked(body, param, code):
    with pytest.raises(ProxyError) as caught:
        parse_request(json.dumps({"model": "m", "input": "hi", **body}).encode(),
                      routes.RESPONSES)
    assert caught.value.status == 400
    assert (caught.value.param, caught.value.code) == (param, code)


def test_responses_input_may_be_text_or_items_and_embeddings_input_is_left_alone():
    for value in ("hi", [{"role": "user", "content": "hi"}], ["hi"]):
        parse_request(json.dumps({"input": value}).encode(), routes.RESPONSES)
    parse_request(json.dumps({"input": [1, 2, 3]}).encode(), routes.route_for("/v1/embeddings"))


def test_responses_deadline_grows_with_max_output_tokens():
    assert deadlines_for({"max_output_tokens": 100}, True, SETTINGS).total == 35


@pytest.mark.parametrize(
    ("route", "body", "expected"),
    [
        (CHAT, {}, {"max_tokens": 512}),
        (CHAT, {"max_tokens": 9}, None),
        (CHAT, {"max_completion_tokens": 9}, None),
        ("/v1/completions", {}, {"max_tokens": 512}),
        (RESPONSES, {}, {"max_output_tokens": 512}),
        (RESPONSES, {"max_output_tokens": 2000}, None),
        ("/v1/embeddings", {}, None),
        ("/tokenize", {}, None),
    ],
)
def test_default_output_cap_only_where_the_client_set_none(route, body, expected):
    capped = with_output_cap({"model": "m", **body}, routes.route_for(route), 512)
    if expected is None:
        assert capped is None
    else:
        assert capped == {"model": "m", **expected}


def test_default_cap_never_exceeds_the_models_context():
    assert output_cap(4096, 1024) == 1024
    assert output_cap(4096, 32768) == 4096
    assert output_cap(4096, None) == 4096


def test_default_max_tokens_setting():
    assert ProxySettings(_env_file=None).default_max_tokens == 4096
    assert ProxySettings(_env_file=None, default_max_tokens="").default_max_tokens is None


def test_usage_is_asked_for_only_on_routes_that_report_it_on_request():
    assert routes.CHAT.usage_on_request and not routes.RESPONSES.usage_on_request


def test_responses_usage_counts_input_and_output_tokens():
    answer = {"object": "response", "usage": {"input_tokens": 7, "output_tokens": 5,
                                              "total_tokens": 12}}
    usage = from_json_body(json.dumps(answer).encode())
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 5)
    completed = {"type": "response.completed", "response": {
        "id": "resp_1", "usage": {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 3},
                                  "output_tokens": 5, "total_tokens": 12}}}
    event = b"event: response.completed\ndata: " + json.dumps(completed).encode()
    kept, usage, only_usage = take_usage(event, False)
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 5) and not only_usage
    assert kept == event
    created = b'data: {"type":"response.created","response":{"usage":null}}'
    assert take_usage(created, False) == (created, None, False)
