"""OpenAI conformance through the front door: real clients -> NGINX (TLS) -> gateway -> vLLM.

Clients: the ``openai`` SDK (sync, async, streaming, Responses, ``with_raw_response``),
LangChain's ``ChatOpenAI`` (an agent framework's client, which sends no ``max_tokens``) and
curl over HTTP/1.1 and HTTP/2. Every error case lands as the SDK's own exception class with
OpenAI's ``type`` and ``code``; error bodies and model answers are checked against the
schemas of OpenAI's published OpenAPI description (``openai_schemas.json``).
"""

import asyncio
import json
import re
import subprocess
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.engine_stack import MAX_MODEL_LEN, SERVED_NAME
from tests.e2e.test_through_proxy import ledger, settled
from tests.e2e.test_tools_and_structured_outputs import CALL_TEXT, WEATHER
from tests.integration.nginx_stack import render, serving
from tests.integration.proxy_stack import gateway

DEFAULT_CAP = 32
SCHEMAS = json.loads((Path(__file__).with_name("openai_schemas.json")).read_text())
HELLO = [{"role": "user", "content": "Hello there"}]
OPENAI_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
                "not_found_error", "rate_limit_error", "server_error"}


def conforms(instance: object, schema: str) -> None:
    jsonschema.validate(instance, {"$ref": f"#/components/schemas/{schema}", **SCHEMAS})


@pytest.fixture(scope="module")
def front(vllm, tmp_path_factory):
    """A gateway of its own (a small default output cap) behind the rendered NGINX site."""
    workdir = tmp_path_factory.mktemp("conformance")
    with gateway(vllm.url, workdir, engine_api_key=vllm.key,
                 default_max_tokens=DEFAULT_CAP) as gw:
        site = render(workdir / "edge", gw.url.removeprefix("http://"))
        with serving(site):
            gw.site = site
            yield gw


def sdk(front, name: str = "default", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=front.site.https + "/v1", api_key=front.key(name),
                         max_retries=0,
                         http_client=openai.DefaultHttpxClient(verify=front.site.trust()),
                         **kwargs)


def assert_openai_error(exc: openai.APIStatusError, kind: str, code: str | None,
                        param: str | None = None) -> None:
    body = exc.response.json()
    conforms(body, "ErrorResponse")
    assert body["error"]["type"] in OPENAI_TYPES
    assert (exc.type, exc.code) == (kind, code), body
    if param is not None:
        assert exc.param == param, body
    assert exc.response.headers["x-request-id"]


# The SDK: the main paths


def test_sdk_chat_completion_and_raw_response(front):
    raw = sdk(front).chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=HELLO, max_tokens=5, extra_headers={"X-Request-Id": "conf-1"})
    assert raw.headers["x-request-id"] == "conf-1"
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens <= 5
    assert any(e["request_id"] == "conf-1" for e in front.site.log_entries())
    assert "conf-1" in front.log.read_text()


def test_sdk_streaming_chat_with_usage(front):
    stream = sdk(front).chat.completions.create(
        model=SERVED_NAME, messages=HELLO, max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 8


def test_sdk_async_client(front):
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(
            base_url=front.site.https + "/v1", api_key=front.key("default"), max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(verify=front.site.trust()))
        async with client:
            results = await asyncio.gather(*(
                client.completions.create(model=SERVED_NAME, prompt=f"Number {i}", max_tokens=3)
                for i in range(4)))
        return [r.choices[0].finish_reason for r in results]

    assert len(asyncio.run(run())) == 4


def test_sdk_responses_plain_and_streamed_count_usage(front):
    client = sdk(front, "responses")
    response = client.responses.create(model=SERVED_NAME, input="Tell me a story",
                                        max_output_tokens=6)
    assert response.usage.output_tokens <= 6 and response.usage.input_tokens > 0
    events = list(client.responses.create(model=SERVED_NAME, input="Tell me a story",
                                          max_output_tokens=6, stream=True))
    completed = [e for e in events if e.type == "response.completed"]
    assert completed and completed[0].response.usage.output_tokens <= 6
    streamed = completed[0].response.usage
    assert settled(lambda: ledger(front, "responses")) == (
        2, response.usage.input_tokens + streamed.input_tokens,
        response.usage.output_tokens + streamed.output_tokens)


def test_responses_tokens_count_against_the_keys_tpm(front):
    front.key("responses-tpm", "--tpm", "40")
    client = sdk(front, "responses-tpm")
    client.responses.create(model=SERVED_NAME, input="Tell me a long story " * 8,
                            max_output_tokens=20)
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(3):
            client.responses.create(model=SERVED_NAME, input="again", max_output_tokens=20)
    assert_openai_error(caught.value, "rate_limit_error", "rate_limit_exceeded")


def test_models_list_and_retrieve_conform_and_leak_no_path(front, vllm):
    client = sdk(front)
    raw = client.models.with_raw_response.list()
    body = json.loads(raw.content)
    conforms(body, "ListModelsResponse")
    assert [m["id"] for m in body["data"]] == [SERVED_NAME]
    assert "root" not in body["data"][0] and str(vllm.log.parent) not in raw.content.decode()
    one = client.models.with_raw_response.retrieve(SERVED_NAME)
    conforms(json.loads(one.content), "Model")
    assert one.parse().id == SERVED_NAME


def test_output_cap_applies_when_the_client_sends_none(front):
    completion = sdk(front).chat.completions.create(model=SERVED_NAME, messages=HELLO,
                                                    extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == DEFAULT_CAP
    own = sdk(front).chat.completions.create(model=SERVED_NAME, messages=HELLO, max_tokens=40,
                                             extra_body={"ignore_eos": True})
    assert own.usage.completion_tokens == 40


# The SDK: every error case as its own exception class, OpenAI's type and code


def test_context_too_long_is_bad_request_context_length_exceeded(front):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(front).chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "hello " * MAX_MODEL_LEN}],
            max_tokens=4)
    assert_openai_error(caught.value, "invalid_request_error", "context_length_exceeded",
                        "messages")
    assert "maximum context length" in caught.value.message


def test_output_cap_over_the_context_is_bad_request_on_max_tokens(front):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(front).completions.create(model=SERVED_NAME, prompt="hi",
                                      max_tokens=MAX_MODEL_LEN * 4)
    assert_openai_error(caught.value, "invalid_request_error", "invalid_value", "max_tokens")


def test_unknown_model_is_not_found_model_not_found(front):
    """OpenAI answers an unknown model with 404, type invalid_request_error."""
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(front).chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert_openai_error(caught.value, "invalid_request_error", "model_not_found", "model")
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(front).models.retrieve("gpt-4o")
    assert_openai_error(caught.value, "invalid_request_error", "model_not_found", "model")


def test_responses_validation_is_bad_request_naming_the_field(front):
    client = sdk(front)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=SERVED_NAME, input="hi",
                                extra_body={"max_output_tokens": "ten"})
    assert_openai_error(caught.value, "invalid_request_error", "invalid_type",
                        "max_output_tokens")
    with pytest.raises(openai.BadRequestError) as caught:  # checked by the engine
        client.responses.create(model=SERVED_NAME, input="hi", max_output_tokens=3,
                                extra_body={"temperature": "hot"})
    assert_openai_error(caught.value, "invalid_request_error", "invalid_type", "temperature")
    assert "validation error" not in caught.value.message


def test_route_the_model_does_not_serve_is_not_found(front):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(front).embeddings.create(model=SERVED_NAME, input="hi")
    assert_openai_error(caught.value, "not_found_error", "not_found")
    assert "Invalid URL (POST /v1/embeddings)" in caught.value.message


def test_route_outside_the_api_is_not_found_from_nginx(front):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(front).fine_tuning.jobs.list()
    assert_openai_error(caught.value, "not_found_error", "not_found")


def test_wrong_key_is_authentication_error_with_a_bearer_challenge(front):
    client = openai.OpenAI(base_url=front.site.https + "/v1", api_key="sk-wrong", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=front.site.trust()))
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert_openai_error(caught.value, "authentication_error", "invalid_api_key")
    assert caught.value.response.headers["www-authenticate"].startswith("Bearer")


def test_rate_limit_is_rate_limit_error_with_retry_after(front):
    front.key("one-a-minute", "--rpm", "1")
    client = sdk(front, "one-a-minute")
    client.models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        client.models.list()
    assert_openai_error(caught.value, "rate_limit_error", "rate_limit_exceeded")
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_wrong_method_is_405_with_allow(front):
    with httpx.Client(verify=front.site.trust()) as client:
        answer = client.get(front.site.https + "/v1/chat/completions")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    conforms(answer.json(), "ErrorResponse")


# Tools through an agent framework's client: LangChain


def langchain_chat(front, **kwargs):
    from langchain_openai import ChatOpenAI

    kwargs.setdefault("model", SERVED_NAME)
    return ChatOpenAI(base_url=front.site.https + "/v1",
                      api_key=front.key("default"), max_retries=0,
                      http_client=httpx.Client(verify=front.site.trust()),
                      http_async_client=httpx.AsyncClient(verify=front.site.trust()), **kwargs)


def test_langchain_chat_without_max_tokens_is_capped(front):
    message = langchain_chat(front, extra_body={"ignore_eos": True}).invoke("Hello there")
    assert message.response_metadata["token_usage"]["completion_tokens"] == DEFAULT_CAP


def test_langchain_tool_call_reaches_the_agent(front):
    forced = {"structured_outputs": {"regex": re.escape(CALL_TEXT)}}
    model = langchain_chat(front, max_tokens=300, extra_body=forced)
    message = model.bind_tools([WEATHER], tool_choice="auto").invoke(
        "What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather",
                                                                      {"city": "Paris"})]


def test_langchain_streams(front):
    pieces = list(langchain_chat(front, max_tokens=6).stream("Hello there"))
    assert pieces and any(p.content for p in pieces)


def test_langchain_sees_openai_errors(front):
    with pytest.raises(openai.NotFoundError) as caught:
        langchain_chat(front, model="gpt-4o", max_tokens=2).invoke("hi")
    assert caught.value.code == "model_not_found"


# curl, over HTTP/1.1 and HTTP/2


@pytest.mark.parametrize(("flag", "version"), [("--http1.1", "1.1"), ("--http2", "2")])
def test_curl_chat_plain_streamed_and_error(front, flag, version):
    def curl(body: dict, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["curl", "-sS", flag, "--cacert", str(front.site.cert), "-N",
             "-H", f"Authorization: Bearer {front.key('default')}",
             "-H", "Content-Type: application/json", "-d", json.dumps(body),
             "-w", "\n%{http_version} %{http_code}", *extra,
             front.site.https + "/v1/chat/completions"],
            capture_output=True, text=True, timeout=60, check=True)

    plain = curl({"model": SERVED_NAME, "messages": HELLO, "max_tokens": 4})
    body, status = plain.stdout.rsplit("\n", 1)
    assert status == f"{version} 200"
    assert json.loads(body)["usage"]["completion_tokens"] <= 4
    streamed = curl({"model": SERVED_NAME, "messages": HELLO, "max_tokens": 4, "stream": True})
    events, status = streamed.stdout.rsplit("\n", 1)
    assert status == f"{version} 200"
    assert events.rstrip().endswith("data: [DONE]")
    assert '"usage"' not in events  # asked for by the gateway, not by this client: stripped
    missing = curl({"model": "nope", "messages": HELLO})
    body, status = missing.stdout.rsplit("\n", 1)
    assert status == f"{version} 404"
    error = json.loads(body)
    conforms(error, "ErrorResponse")
    assert (error["error"]["type"], error["error"]["code"]) == ("invalid_request_error",
                                                                "model_not_found")
