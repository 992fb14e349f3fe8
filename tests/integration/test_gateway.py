"""The gateway in front of the fake engine, through real clients (openai, httpx)."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.integration.proxy_stack import ENGINE_KEY, keys_cli

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4}


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def sse_events(text: str) -> list[str]:
    return [block for block in text.split("\n\n") if block.strip()]


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# Forwarding


def test_chat_completion_through_the_openai_client(gw):
    reply = gw.client().chat.completions.create(**CHAT)
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3"
    assert reply.usage.completion_tokens == 4 and reply.usage.prompt_tokens == 2


def test_completion_and_models_and_embeddings(gw):
    client = gw.client()
    assert [m.id for m in client.models.list()] == ["fake-model"]
    done = client.completions.create(model="fake-model", prompt="a b c", max_tokens=2)
    assert done.choices[0].text == "tok0 tok1"
    emb = client.embeddings.create(model="fake-model", input=["x", "y"])
    assert len(emb.data) == 2


def test_stream_arrives_as_chunks_and_ends_with_done(gw):
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=gw.headers(),
                      json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = sse_events(text)
    assert len(events) == 5 and events[-1] == "data: [DONE]"
    assert "usage" not in text, "the usage chunk the proxy asked for must not reach the client"


def test_stream_through_openai_client_with_usage_when_asked(gw):
    stream = gw.client().chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3"
    assert chunks[-1].usage.completion_tokens == 4


def test_stream_chunks_are_relayed_as_they_arrive(gw):
    body = {**CHAT, "max_tokens": 5, "stream": True, "fake": {"interval": 0.3}}
    arrivals = []
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=gw.headers(),
                      json=body, timeout=10) as response:
        for _ in response.iter_raw():
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 5
    assert arrivals[-1] - arrivals[0] > 1.0, "chunks were coalesced, not relayed one by one"


def test_unknown_fields_reach_the_engine_untouched(gw, fake):
    """Untouched but for the one field the gateway owns: the key's prefix-cache salt."""
    body = {**CHAT, "top_k": 7, "guided_json": {"type": "object"}, "repetition_penalty": 1.1}
    response = httpx.post(gw.url + "/v1/chat/completions", headers=gw.headers(), json=body)
    assert response.status_code == 200
    sent = fake.stats()["last_body"]
    assert isinstance(sent.pop("cache_salt"), str) and sent == body


def test_the_gateway_replaces_a_client_cache_salt_with_the_keys_own(gw, fake):
    salts = {}
    for name, client_salt in (("salt-a", None), ("salt-a", "mine"), ("salt-b", "mine")):
        body = {**CHAT, **({"cache_salt": client_salt} if client_salt else {})}
        response = httpx.post(gw.url + "/v1/chat/completions", headers=gw.headers(name),
                              json=body)
        assert response.status_code == 200
        salts.setdefault(name, set()).add(fake.stats()["last_body"]["cache_salt"])
    assert len(salts["salt-a"]) == 1 and salts["salt-a"] != salts["salt-b"]
    assert "mine" not in salts["salt-a"] | salts["salt-b"]


def test_client_key_never_reaches_the_engine_and_request_id_round_trips(gw, fake):
    response = httpx.post(gw.url + "/v1/chat/completions", json=CHAT,
                          headers={**gw.headers(), "X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    seen = fake.stats()["last_headers"]
    assert seen["authorization"] == f"Bearer {ENGINE_KEY}"
    assert seen["x-request-id"] == "abc-123"


def test_request_id_is_generated_and_returned_on_errors_too(gw):
    ok = httpx.get(gw.url + "/v1/models", headers=gw.headers())
    refused = httpx.get(gw.url + "/v1/models")
    health = httpx.get(gw.url + "/health")
    ids = {r.headers["x-request-id"] for r in (ok, refused, health)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)


def test_engine_errors_keep_their_message_in_openai_vocabulary(gw):
    for status, kind in ((400, "invalid_request_error"), (500, "server_error"),
                         (503, "server_error")):
        response = httpx.post(gw.url + "/v1/chat/completions", headers=gw.headers(),
                              json={**CHAT, "fake": {"status": status}})
        assert response.status_code == status
        error = error_of(response)
        assert error["message"] == "injected failure"
        assert error["type"] == kind and isinstance(error["code"], str)
    streamed = httpx.post(gw.url + "/v1/chat/completions", headers=gw.headers(),
                          json={**CHAT, "stream": True, "fake": {"status": 400}})
    assert streamed.status_code == 400
    assert streamed.headers["content-type"] == "application/json"
    assert error_of(streamed)["type"] == "invalid_request_error"
    assert "injected failure" in gw.log.read_text()


def test_engine_404_names_the_route_like_openai(gw):
    response = httpx.post(gw.url + "/v1/rerank", headers=gw.headers(),
                          json={"model": "fake-model"})
    assert response.status_code == 404
    error = error_of(response)
    assert error["type"] == "not_found_error" and error["code"] == "not_found"


def test_model_list_and_one_model_without_server_paths(gw):
    listed = httpx.get(gw.url + "/v1/models", headers=gw.headers())
    assert listed.status_code == 200 and "/srv/" not in listed.text
    [model] = listed.json()["data"]
    one = httpx.get(gw.url + f"/v1/models/{model['id']}", headers=gw.headers())
    assert one.status_code == 200 and one.json() == model
    missing = httpx.get(gw.url + "/v1/models/gpt-4o", headers=gw.headers())
    assert missing.status_code == 404
    error = error_of(missing)
    assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model",
                                                              "invalid_request_error")
    with pytest.raises(openai.NotFoundError):
        gw.client().models.retrieve("gpt-4o")
    assert gw.client().models.retrieve(model["id"]).id == model["id"]


# Keys


def test_requests_without_a_valid_key_get_401(gw):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        response = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 401
        assert error_of(response)["type"] == "authentication_error"
        assert response.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="wrong").models.list()


def test_revoked_key_is_refused_within_a_second(gw):
    headers = gw.headers("soon-revoked")
    assert httpx.get(gw.url + "/v1/models", headers=headers).status_code == 200
    assert keys_cli(gw.db, "revoke", "soon-revoked").returncode == 0
    revoked_at = time.monotonic()
    wait_for(lambda: httpx.get(gw.url + "/v1/models", headers=headers).status_code == 401, 1.0)
    assert time.monotonic() - revoked_at < 1.0


def test_health_and_ready_need_no_key(gw):
    assert httpx.get(gw.url + "/health").json() == {"status": "ok"}
    assert httpx.get(gw.url + "/ready").status_code == 200


def test_metrics_are_for_loopback_and_hold_no_secret(gw):
    gw.client().chat.completions.create(**CHAT)
    metrics = httpx.get(gw.url + "/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'appliance_requests_total{key="default",route="/v1/chat/completions",status="200"}' \
        in text
    assert "appliance_completion_tokens_total" in text
    for secret in gw.keys.values():
        assert secret not in text
    forwarded = httpx.get(gw.url + "/metrics", headers={"X-Real-IP": "203.0.113.9"})
    assert forwarded.status_code == 403 and error_of(forwarded)["code"] == "forbidden"


# Bad input


def test_malformed_json_is_400(gw):
    response = httpx.post(gw.url + "/v1/chat/completions", headers=gw.headers(),
                          content=b'{"model": ')
    assert response.status_code == 400 and error_of(response)["type"] == "invalid_request_error"


@pytest.mark.parametrize(("field", "value"), [("max_tokens", "ten"), ("messages", "hi"),
                                              ("stream", "yes")])
def test_wrong_types_are_400_naming_the_field(gw, field, value):
    response = httpx.post(gw.url + "/v1/chat/completions", headers=gw.headers(),
                          json={**CHAT, field: value})
    assert response.status_code == 400 and error_of(response)["param"] == field


def test_oversize_body_is_413(tight):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    response = httpx.post(tight.url + "/v1/chat/completions", headers=tight.headers(), json=big)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"


def test_unknown_route_outside_the_api_is_404_json(gw):
    response = httpx.get(gw.url + "/nowhere")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


# Deadlines and disconnects


def test_slow_answer_past_the_deadline_is_504_and_aborted_upstream(tight, fake):
    before = fake.stats()["disconnects"]
    response = httpx.post(tight.url + "/v1/chat/completions", headers=tight.headers(),
                          json={**CHAT, "fake": {"delay": 5}})
    assert response.status_code == 504 and error_of(response)["type"] == "server_error"
    wait_for(lambda: fake.stats()["disconnects"] > before, 2)


def test_deadline_grows_with_max_tokens(fake, tmp_path):
    from tests.integration.proxy_stack import gateway

    with gateway(fake.url, tmp_path, timeout_base_s=0.2, timeout_per_token_s=0.1) as p:
        slow = {**CHAT, "fake": {"delay": 0.8}}
        assert httpx.post(p.url + "/v1/chat/completions", headers=p.headers(),
                          json={**slow, "max_tokens": 2}).status_code == 504
        assert httpx.post(p.url + "/v1/chat/completions", headers=p.headers(),
                          json={**slow, "max_tokens": 20}).status_code == 200


@pytest.mark.parametrize("fault", [{"first_delay": 5}, {"stall_after": 2}])
def test_stalled_stream_ends_with_an_error_event_and_is_aborted(tight, fake, fault):
    before = fake.stats()["disconnects"]
    with httpx.stream("POST", tight.url + "/v1/chat/completions", headers=tight.headers(),
                      json={**CHAT, "stream": True, "fake": fault}, timeout=10) as response:
        text = response.read().decode()
    events = sse_events(text)
    assert events[-2].startswith("event: error\ndata: ")
    error = json.loads(events[-2].split("data: ", 1)[1])["error"]
    assert error["type"] == "server_error" and set(error) == {"message", "type", "param", "code"}
    wait_for(lambda: fake.stats()["disconnects"] > before, 2)


def test_client_disconnect_mid_stream_aborts_upstream(gw, fake):
    before = fake.stats()["disconnects"]
    body = {**CHAT, "max_tokens": 1000, "stream": True, "fake": {"interval": 0.05}}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=gw.headers(),
                      json=body) as response:
        next(response.iter_raw())
    wait_for(lambda: fake.stats()["disconnects"] > before, 2)
    assert fake.stats()["in_progress"] == 0


@pytest.mark.parametrize("leaves_after_s", [0.5, 0.01], ids=["watched", "before-the-watch"])
def test_client_disconnect_while_waiting_aborts_upstream(gw, fake, leaves_after_s):
    """The gateway watches a plain request for a hang-up once it has run WATCH_AFTER_S (50 ms):
    a client gone sooner is noticed then."""
    before = fake.stats()["disconnects"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", headers=gw.headers(),
                   json={**CHAT, "fake": {"delay": 10}}, timeout=leaves_after_s)
    wait_for(lambda: fake.stats()["disconnects"] > before, 2)
    assert fake.stats()["in_progress"] == 0


# Limits and usage


def test_requests_per_minute_limit_gives_429_with_headers(gw):
    headers = {"Authorization": f"Bearer {gw.key('limited', '--rpm', '2')}"}
    first = httpx.get(gw.url + "/v1/models", headers=headers)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert "x-ratelimit-reset-requests" in first.headers
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=headers,
                      json={**CHAT, "stream": True}) as streamed:
        assert streamed.headers["x-ratelimit-remaining-requests"] == "0"
        streamed.read()
    refused = httpx.get(gw.url + "/v1/models", headers=headers)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert error_of(refused)["type"] == "rate_limit_error"
    assert httpx.get(gw.url + "/v1/models", headers=gw.headers("other")).status_code == 200


def test_tokens_per_minute_limit_counts_reported_usage(gw):
    headers = {"Authorization": f"Bearer {gw.key('tpm', '--tpm', '10')}"}
    body = {**CHAT, "max_tokens": 20}
    assert httpx.post(gw.url + "/v1/chat/completions", headers=headers,
                      json=body).status_code == 200
    refused = httpx.post(gw.url + "/v1/chat/completions", headers=headers, json=body)
    assert refused.status_code == 429 and "tokens" in error_of(refused)["message"]


def usage_row(proxy, name: str) -> list[int]:
    out = keys_cli(proxy.db, "usage", name).stdout.splitlines()[-1].split()
    return [int(x) for x in out[1:4]]


def test_usage_is_recorded_per_key_for_plain_and_streamed_requests(gw):
    client = gw.client("metered")
    client.chat.completions.create(**CHAT)
    list(client.chat.completions.create(**{**CHAT, "max_tokens": 6}, stream=True))
    wait_for(lambda: usage_row(gw, "metered") == [2, 4, 10])


# Logs


def test_access_log_is_json_per_request_without_secrets(gw):
    sent = time.time()
    gw.client().chat.completions.create(**CHAT)

    def chat_lines() -> list[dict]:
        """This request's line: the line is written after the answer, so earlier tests' lines
        may be all there is when the client has its answer."""
        lines = [json.loads(line) for line in gw.log.read_text().splitlines()
                 if line.startswith("{")]
        return [line for line in lines
                if line["route"] == "/v1/chat/completions" and line["ts"] >= sent]

    wait_for(chat_lines)
    chat = chat_lines()
    assert len(chat) == 1
    assert {"request_id", "key", "status", "duration_ms", "prompt_tokens"} <= set(chat[0])
    # When it came and when the engine got it, on one clock that orders requests.
    assert sent <= chat[0]["ts"] <= time.time()
    assert 0 <= chat[0]["queued_ms"] <= chat[0]["admitted_ms"] <= chat[0]["duration_ms"]
    log_text = gw.log.read_text()
    for secret in [*gw.keys.values(), ENGINE_KEY]:
        assert secret not in log_text


def test_a_key_limited_to_other_models_sees_none_of_the_engines(gw):
    headers = {"Authorization": f"Bearer {gw.key('other-models', '--models', 'other-model')}"}
    listed = httpx.get(gw.url + "/v1/models", headers=headers)
    assert listed.status_code == 200 and listed.json() == {"object": "list", "data": []}
    one = httpx.get(gw.url + "/v1/models/fake-model", headers=headers)
    assert one.status_code == 404 and error_of(one)["code"] == "model_not_found"


def test_default_output_cap_is_set_when_the_client_sends_none(fake, tmp_path):
    from tests.integration.proxy_stack import gateway

    with gateway(fake.url, tmp_path, default_max_tokens=64) as p:
        bare = {"model": CHAT["model"], "messages": CHAT["messages"]}
        answer = httpx.post(p.url + "/v1/chat/completions", headers=p.headers(), json=bare)
        assert answer.status_code == 200
        assert fake.stats()["last_body"]["max_tokens"] == 64
        assert answer.json()["usage"]["completion_tokens"] == 64
        own = httpx.post(p.url + "/v1/chat/completions", headers=p.headers(),
                         json={**bare, "max_tokens": 200})
        assert own.status_code == 200 and fake.stats()["last_body"]["max_tokens"] == 200
    with gateway(fake.url, tmp_path, default_max_tokens=100000) as p:
        httpx.post(p.url + "/v1/completions", headers=p.headers(),
                   json={"model": CHAT["model"], "prompt": "hi"})
        assert fake.stats()["last_body"]["max_tokens"] == 4096  # the fake model's context


async def post_again_after(url: str, key: str, gap_s: float) -> str:
    """One POST, ``gap_s`` idle, a second POST on the same connection: how the second fared."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({**CHAT, "max_tokens": 2}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}"
               f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await reader.readuntil(b"\r\n0\r\n\r\n")  # the whole chunked answer
        await asyncio.sleep(gap_s)
        writer.write(request)
        status_line = await asyncio.wait_for(reader.readline(), 10)
        return status_line.decode().strip() or "dropped"
    except (asyncio.IncompleteReadError, ConnectionError):
        return "dropped"
    finally:
        writer.close()


def test_reused_connection_after_five_idle_seconds_is_answered(gw):
    """uvicorn's default keep-alive was 5 s, as is httpx's pool expiry: a request sent on a
    connection idle about 5 s could arrive as the gateway closed it, and the client saw the
    connection dropped without an answer. The gateway now keeps idle connections 75 s."""
    gaps = [4.9 + i * 0.01 for i in range(20)]

    async def probe() -> list[str]:
        key = gw.key("default")
        return await asyncio.gather(*(post_again_after(gw.url, key, g) for g in gaps))

    assert asyncio.run(probe()) == ["HTTP/1.1 200 OK"] * len(gaps)
