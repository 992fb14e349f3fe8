"""Through the real NGINX to the real proxy to the fake engine: what the public edge guarantees."""

import json
import re
import socket
import subprocess
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration import test_fuzz as fuzz
from tests.integration.nginx_stack import SECURITY_HEADERS, render, serving
from tests.integration.proxy_stack import gateway
from tests.servers import free_port

SHORT_TIMEOUT_S = 2
LONG_TIMEOUT_S = 30
CHAT = "/v1/chat/completions"


def hostport(url: str) -> str:
    return url.removeprefix("http://")


@pytest.fixture(scope="module")
def edge(gw, tmp_path_factory):
    site = render(
        tmp_path_factory.mktemp("edge"),
        hostport(gw.url),
        short_timeout_s=SHORT_TIMEOUT_S,
        long_timeout_s=LONG_TIMEOUT_S,
    )
    with serving(site):
        yield site


@pytest.fixture(scope="module")
def client(edge):
    with httpx.Client(base_url=edge.https, verify=edge.trust(), timeout=60) as c:
        yield c


def chat_body(**extra) -> dict:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **extra,
    }


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, f"{name} on {response.request.url}"
    assert response.headers["server"] == "nginx"  # server_tokens off: no version


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_openai_client_chats_through_the_edge(edge, gw):
    http = httpx.Client(verify=edge.trust())
    api = openai.OpenAI(
        base_url=edge.https + "/v1", api_key=gw.key("default"), http_client=http, max_retries=0
    )
    reply = api.chat.completions.create(
        model="fake-model", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "tok0 tok1 tok2"
    assert [m.id for m in api.models.list()] == ["fake-model"]


def test_first_sse_chunk_arrives_long_before_the_stream_ends(client, gw):
    body = chat_body(stream=True, max_tokens=8, fake={"interval": 0.25})
    started = time.monotonic()
    arrivals = []
    with client.stream("POST", CHAT, json=body, headers=gw.headers()) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in response.headers
        assert_security_headers(response)
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 9  # 8 chunks and [DONE]
    assert arrivals[-1] >= 1.75
    assert arrivals[0] < arrivals[-1] - 1.0, arrivals


def test_stream_over_http2_is_not_buffered(edge, gw):
    """curl over HTTP/2 sees the first token well before the last one."""
    body = json.dumps(chat_body(stream=True, max_tokens=6, fake={"interval": 0.3}))
    proc = subprocess.Popen(
        [
            "curl",
            "-sS",
            "-N",
            "--http2",
            "--cacert",
            str(edge.cert),
            "-X",
            "POST",
            "-H",
            f"Authorization: Bearer {gw.key('default')}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            "-w",
            "\nhttp_version=%{http_version}\n",
            edge.https + CHAT,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    started = time.monotonic()
    first = proc.stdout.readline()
    first_at = time.monotonic() - started
    rest = proc.stdout.read()
    ended_at = time.monotonic() - started
    assert proc.wait() == 0
    assert first.startswith("data: ")
    assert "http_version=2" in rest
    assert first_at < ended_at - 1.0


def test_stream_is_relayed_unbuffered_even_without_x_accel_buffering(fake, tmp_path):
    """The fake engine sends no X-Accel-Buffering header (the proxy does): NGINX alone must
    not buffer."""
    site = render(tmp_path, hostport(fake.url))
    body = chat_body(stream=True, max_tokens=6, fake={"interval": 0.3})
    with (
        serving(site),
        httpx.Client(base_url=site.https, verify=site.trust()) as c,
        c.stream(
            "POST", CHAT, json=body, headers={"Authorization": "Bearer internal-engine-key"}
        ) as response,
    ):
        assert "x-accel-buffering" not in response.headers
        started = time.monotonic()
        arrivals = [
            time.monotonic() - started
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]
    assert arrivals[0] < arrivals[-1] - 1.0, arrivals


def test_long_generation_outlives_the_short_route_timeout(client, gw):
    delay = SHORT_TIMEOUT_S + 1.5
    started = time.monotonic()
    response = client.post(CHAT, json=chat_body(fake={"delay": delay}), headers=gw.headers())
    assert response.status_code == 200, response.text
    assert time.monotonic() - started >= delay
    assert response.json()["choices"][0]["message"]["content"]


def test_long_stream_gap_outlives_the_short_route_timeout(client, gw):
    body = chat_body(stream=True, max_tokens=2, fake={"first_delay": SHORT_TIMEOUT_S + 1})
    with client.stream("POST", CHAT, json=body, headers=gw.headers()) as response:
        text = "".join(response.iter_text())
    assert response.status_code == 200
    assert text.rstrip().endswith("data: [DONE]")


def test_oversize_body_gets_413_json_from_nginx(client, gw):
    body = b'{"prompt": "' + b"x" * (16 * 1024 * 1024) + b'"}'
    response = client.post("/v1/completions", content=body, headers=gw.headers())
    error = assert_openai_error(response, 413)
    assert error["code"] == "request_too_large"
    assert error["message"] == "Request body too large."  # NGINX's own, not the proxy's
    assert_security_headers(response)


def test_nginx_own_errors_on_anthropic_routes_take_anthropics_shape(client, gw):
    body = b'{"messages": "' + b"x" * (16 * 1024 * 1024) + b'"}'
    response = client.post("/v1/messages", content=body, headers={"x-api-key": gw.key("edge")})
    assert response.status_code == 413
    assert response.json() == {"type": "error", "error": {
        "type": "request_too_large", "message": "Request body too large."}}
    assert_security_headers(response)


def test_body_just_under_the_limit_reaches_the_proxy(client, gw):
    prompt = "x " * (8 * 1024 * 1024 - 1024)
    response = client.post(
        "/v1/completions",
        headers=gw.headers(),
        json={"model": "fake-model", "prompt": prompt, "max_tokens": 1},
    )
    assert response.status_code == 200, response.text[:300]


def test_unknown_path_is_404_json_without_reaching_the_proxy(client, edge):
    response = client.get("/admin/secret")
    error = assert_openai_error(response, 404)
    assert error["code"] == "not_found"
    assert_security_headers(response)
    for path in ("/v1/fine_tuning/jobs", "/v1/assistants"):
        assert_openai_error(client.post(path, json={}), 404)
    entries = [e for e in edge.log_entries() if e["path"] in ("/admin/secret", "/v1/assistants")]
    assert entries and all(e["upstream_status"] == "" for e in entries)


def test_anthropic_messages_reach_the_gateway_with_either_key_header(client, gw):
    """Both Messages routes are routed to the gateway (its Anthropic-shaped answers, not
    NGINX's 404), and a key sent as x-api-key is as good as a bearer."""
    body = {"model": "fake-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        refused = client.post(path, json=body, headers={"x-api-key": "sk-app-wrong"})
        assert refused.status_code == 401
        assert refused.json()["type"] == "error"
        assert refused.json()["error"]["type"] == "authentication_error"
    key = gw.key("edge-anthropic")
    for headers in ({"x-api-key": key}, {"Authorization": f"Bearer {key}"}):
        answer = client.post("/v1/messages/count_tokens", json=body, headers=headers)
        assert answer.status_code != 401, answer.text


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", CHAT, "POST"),
        ("PUT", "/v1/completions", "POST"),
        ("DELETE", "/v1/models", "GET"),
        ("DELETE", "/v1/models/fake-model", "GET"),
        ("POST", "/health", "GET"),
        ("GET", "/tokenize", "POST"),
        ("OPTIONS", CHAT, "POST"),
        ("TRACE", "/health", "GET"),
        ("POST", "/metrics", "GET"),
    ],
)
def test_methods_the_api_does_not_use_get_405_json_with_allow(client, method, path, allow):
    response = client.request(method, path)
    error = assert_openai_error(response, 405)
    assert error["code"] == "method_not_allowed"
    assert response.headers["allow"] == allow
    assert_security_headers(response)
    # No CORS unless an operator names origins.
    assert "access-control-allow-origin" not in response.headers
    assert "vary" not in response.headers


# Request ids


def gateway_log_ids(gw) -> list[str]:
    return [json.loads(line)["request_id"] for line in gw.log.read_text().splitlines()
            if line.startswith('{"request_id"')]


def test_client_request_id_is_kept_end_to_end(client, edge, gw, fake):
    sent = "client-trace.42:abc"
    response = client.post(CHAT, json=chat_body(), headers={**gw.headers(), "X-Request-Id": sent})
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == [sent]
    assert fake.stats()["last_headers"]["x-request-id"] == sent
    assert [e["request_id"] for e in edge.log_entries() if e["request_id"] == sent] == [sent]
    assert sent in gateway_log_ids(gw)


@pytest.mark.parametrize("sent", [None, "has spaces", "x" * 129, "quote\"d"])
def test_missing_or_unsafe_request_id_is_replaced_by_nginx_once(client, edge, gw, sent):
    headers = gw.headers() | ({"X-Request-Id": sent} if sent else {})
    response = client.get("/v1/models", headers=headers)
    assert response.status_code == 200
    [given] = response.headers.get_list("x-request-id")
    assert re.fullmatch(r"[0-9a-f]{32}", given)
    assert any(e["request_id"] == given for e in edge.log_entries())
    assert given in gateway_log_ids(gw)


def test_nginx_own_errors_carry_the_request_id(client, edge):
    response = client.get("/nowhere", headers={"X-Request-Id": "lost-42"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "lost-42"
    assert any(e["request_id"] == "lost-42" and e["status"] == 404 for e in edge.log_entries())


def test_metrics_from_loopback_reaches_the_proxy(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert_security_headers(response)


def test_metrics_from_another_address_is_refused(edge):
    transport = httpx.HTTPTransport(local_address="127.0.0.2", verify=edge.trust())
    with httpx.Client(transport=transport, base_url=edge.https) as other:
        response = other.get("/metrics")
    error = assert_openai_error(response, 403)
    assert error["type"] == "permission_error"
    assert_security_headers(response)
    assert any(
        e["path"] == "/metrics" and e["remote_addr"] == "127.0.0.2" and e["upstream_status"] == ""
        for e in edge.log_entries()
    )


def test_plain_http_redirects_to_https(edge):
    response = httpx.get(edge.http + "/v1/models?limit=2")
    assert response.status_code == 301
    assert response.headers["location"] == f"{edge.https}/v1/models?limit=2"
    assert_security_headers(response)
    post = httpx.post(edge.http + CHAT, json={})
    assert post.status_code == 301


def test_plain_http_to_the_https_port_is_json(edge):
    response = httpx.get(f"http://127.0.0.1:{edge.https_port}/health")
    assert assert_openai_error(response, 400)["code"] == "http_to_https_port"


def test_acme_challenge_is_served_over_plain_http(edge):
    challenge = edge.webroot / ".well-known" / "acme-challenge"
    challenge.mkdir(parents=True, exist_ok=True)
    (challenge / "token123").write_text("token123.thumbprint")
    response = httpx.get(edge.http + "/.well-known/acme-challenge/token123")
    assert response.status_code == 200
    assert response.text == "token123.thumbprint"
    assert_security_headers(response)
    missing = httpx.get(edge.http + "/.well-known/acme-challenge/nope")
    assert_openai_error(missing, 404)


def test_security_headers_on_every_route(client, edge, gw):
    """NGINX drops inherited add_header in a block with its own: check every kind of answer."""
    key = gw.headers()
    answers = [
        client.get("/health"),
        client.get("/ready"),
        client.get("/metrics"),
        client.get("/v1/models", headers=key),
        client.get("/v1/models"),  # the proxy's 401
        client.post(CHAT, json=chat_body(), headers=key),
        client.post(CHAT, json=chat_body(stream=True), headers=key),
        client.post(
            "/v1/completions",
            headers=key,
            json={"model": "fake-model", "prompt": "hi", "max_tokens": 2},
        ),
        client.post("/v1/embeddings", json={"model": "fake-model", "input": "hi"}, headers=key),
        client.post("/tokenize", json={"model": "fake-model", "prompt": "hi"}, headers=key),
        client.get("/nowhere"),
        client.delete(CHAT),
        httpx.get(edge.http + "/anything"),
    ]
    for response in answers:
        assert_security_headers(response)
    assert answers[3].status_code == 200
    assert answers[4].status_code == 401


def test_access_log_is_json_without_keys_or_query_strings(client, edge, gw):
    secret = gw.key("default")
    client.get("/v1/models?api_key=query-secret-123", headers=gw.headers())
    client.post(CHAT, json=chat_body(), headers=gw.headers())
    text = edge.access_log.read_text()
    assert secret not in text
    assert "query-secret-123" not in text
    assert "Bearer" not in text
    entries = edge.log_entries()
    mine = [e for e in entries if e["path"] == "/v1/models" and e["status"] == 200]
    assert mine and mine[-1]["method"] == "GET" and mine[-1]["tls"].startswith("TLSv1.")
    assert any(e["path"] == CHAT and e["upstream_status"] == "200" for e in entries)


def test_gzip_is_never_applied(client, gw):
    body = chat_body(stream=True, max_tokens=40)
    with client.stream(
        "POST", CHAT, json=body, headers={**gw.headers(), "Accept-Encoding": "gzip"}
    ) as r:
        r.read()
    assert "content-encoding" not in r.headers
    listing = client.get("/v1/models", headers={**gw.headers(), "Accept-Encoding": "gzip"})
    assert "content-encoding" not in listing.headers


# --- NGINX's own failures, against upstreams that misbehave on purpose -----------------------


@pytest.fixture
def stalled_upstream():
    """A listener whose backlog completes TCP handshakes but which never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_stalled_short_route_gets_504_json(stalled_upstream, tmp_path):
    site = render(tmp_path, stalled_upstream, short_timeout_s=1, long_timeout_s=30)
    with serving(site), httpx.Client(base_url=site.https, verify=site.trust(), timeout=20) as c:
        for path in ("/v1/models", "/health", "/ready"):
            started = time.monotonic()
            response = c.get(path)
            error = assert_openai_error(response, 504)
            assert error["code"] == "gateway_timeout"
            assert_security_headers(response)
            assert 0.9 <= time.monotonic() - started < 10


def test_gateway_down_gets_502_json(tmp_path):
    site = render(tmp_path, f"127.0.0.1:{free_port()}")
    with serving(site), httpx.Client(base_url=site.https, verify=site.trust()) as c:
        response = c.post(CHAT, json=chat_body())
    assert assert_openai_error(response, 502)["code"] == "bad_gateway"
    assert_security_headers(response)


def test_per_address_request_limit_gets_429_json(gw, tmp_path):
    site = render(tmp_path, hostport(gw.url), rate_per_s=1, burst=2)
    with serving(site), httpx.Client(base_url=site.https, verify=site.trust()) as c:
        statuses = [c.get("/health") for _ in range(6)]
    codes = [r.status_code for r in statuses]
    assert codes[:3] == [200, 200, 200]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, codes
    assert assert_openai_error(limited[0], 429)["type"] == "rate_limit_error"
    assert_security_headers(limited[0])


def test_per_address_connection_limit_gets_429_json(gw, tmp_path):
    site = render(tmp_path, hostport(gw.url), conn_per_ip=1)
    body = chat_body(stream=True, max_tokens=3, fake={"first_delay": 1.5})
    with serving(site), httpx.Client(base_url=site.https, verify=site.trust(), timeout=30) as c:
        holder = threading.Thread(target=lambda: c.post(CHAT, json=body, headers=gw.headers()))
        holder.start()
        time.sleep(0.5)
        with httpx.Client(base_url=site.https, verify=site.trust()) as second:
            response = second.get("/health")
        holder.join()
    assert assert_openai_error(response, 429)["code"] == "rate_limit_exceeded"


def test_client_address_reaches_the_upstream_and_cannot_be_spoofed(fake, tmp_path):
    """Straight to the engine (it records headers) so the proxy's own handling is out of view."""
    site = render(tmp_path, hostport(fake.url))
    transport = httpx.HTTPTransport(local_address="127.0.0.2", verify=site.trust())
    with serving(site), httpx.Client(transport=transport, base_url=site.https) as c:
        response = c.get(
            "/v1/models",
            headers={
                "Authorization": "Bearer internal-engine-key",
                "X-Forwarded-For": "6.6.6.6",
                "X-Real-IP": "6.6.6.6",
            },
        )
    assert response.status_code == 200
    seen = fake.stats()["last_headers"]
    assert seen["x-forwarded-for"] == "127.0.0.2"
    assert seen["x-real-ip"] == "127.0.0.2"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["authorization"] == "Bearer internal-engine-key"


def nginx_connections_to(port: int) -> int:
    """Open connections NGINX holds to ``port`` (other clients of that port are not counted)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum('"nginx"' in line for line in out.splitlines())


def test_upstream_connections_are_pooled(fake, tmp_path):
    """Sequential requests reuse one kept-alive connection to the upstream (one worker);
    without the pool NGINX would close each one and hold none between requests."""
    site = render(tmp_path, hostport(fake.url))
    port = int(fake.url.rsplit(":", 1)[1])
    with serving(site), httpx.Client(base_url=site.https, verify=site.trust()) as c:
        for _ in range(10):
            response = c.get("/v1/models", headers={"Authorization": "Bearer internal-engine-key"})
            assert response.status_code == 200
        assert nginx_connections_to(port) == 1
    assert "connection" not in fake.stats()["last_headers"]


# Browsers (CORS)

APP_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def cors_client(gw, tmp_path_factory):
    site = render(tmp_path_factory.mktemp("cors"), hostport(gw.url),
                  cors_origins=f"{APP_ORIGIN}, http://localhost:3000")
    with serving(site), httpx.Client(base_url=site.https, verify=site.trust()) as c:
        c.site = site
        yield c


def preflight(client, path: str, origin: str, method: str = "POST") -> httpx.Response:
    """What a browser sends before a cross-origin POST with a key and a JSON body."""
    return client.options(path, headers={
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    })


@pytest.mark.parametrize(("path", "method"), [(CHAT, "POST"), ("/v1/models", "GET"),
                                              ("/v1/responses", "POST"), ("/tokenize", "POST")])
def test_preflight_from_an_allowed_origin_is_answered_at_the_edge(cors_client, path, method):
    response = preflight(cors_client, path, APP_ORIGIN, method)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    assert method in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == (
        "authorization, content-type, x-stainless-os")
    assert int(response.headers["access-control-max-age"]) > 0
    assert response.headers["vary"] == "Origin"
    assert_security_headers(response)
    entries = [e for e in cors_client.site.log_entries() if e["method"] == "OPTIONS"]
    assert entries and all(e["upstream_status"] == "" for e in entries)


def test_preflight_from_another_origin_is_refused(cors_client):
    response = preflight(cors_client, CHAT, "https://evil.example.net")
    assert_openai_error(response, 405)
    assert "access-control-allow-origin" not in response.headers
    assert response.headers["vary"] == "Origin"


def test_cross_origin_request_gets_the_origin_and_exposed_headers(cors_client, gw):
    response = cors_client.post(CHAT, json=chat_body(),
                                headers={**gw.headers(), "Origin": "http://localhost:3000"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-methods" not in response.headers
    refused = cors_client.get("/v1/models", headers={"Origin": APP_ORIGIN})
    assert refused.status_code == 401  # CORS opens the door to browsers, not to the API
    assert refused.headers["access-control-allow-origin"] == APP_ORIGIN


def test_without_cors_origins_a_preflight_gets_405(client):
    response = preflight(client, CHAT, APP_ORIGIN)
    assert_openai_error(response, 405)
    assert "access-control-allow-origin" not in response.headers


def nginx_upstream_ports(port: int) -> set[str]:
    """NGINX's local ports on its connections to ``port``: the same port is the same connection."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
        capture_output=True, text=True, check=True,
    ).stdout
    return {line.split()[2].rsplit(":", 1)[1] for line in out.splitlines() if '"nginx"' in line}


def test_post_after_an_idle_pause_reuses_the_upstream_connection(fake, tmp_path):
    """uvicorn's default keep-alive (5 s) closed NGINX's idle connections while NGINX kept them
    for 60 s, so a POST sent as the gateway closed one got a 502. The gateway now keeps them
    longer than NGINX does: after a pause past the old 5 s the same connection carries on."""
    with gateway(fake.url, tmp_path) as gw:  # of its own: no other NGINX holds connections to it
        site = render(tmp_path, hostport(gw.url))
        port = int(gw.url.rsplit(":", 1)[1])
        with serving(site), httpx.Client(base_url=site.https, verify=site.trust()) as c:
            assert c.post(CHAT, json=chat_body(), headers=gw.headers()).status_code == 200
            before = nginx_upstream_ports(port)
            time.sleep(5.5)
            assert c.post(CHAT, json=chat_body(), headers=gw.headers()).status_code == 200
            assert len(before) == 1 and nginx_upstream_ports(port) == before


@settings(max_examples=80, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(content=fuzz.raw, route=st.sampled_from(fuzz.POST_ROUTES))
def test_random_bodies_through_nginx_never_break_the_gateway(client, gw, content, route):
    """The fuzz of every POST route of the route table, through the public face: no 500, no
    crash, every error in its API's shape, every stream ending with its final event."""
    try:
        stream_asked = json.loads(content).get("stream") is True
    except (ValueError, AttributeError, UnicodeDecodeError):
        stream_asked = False
    response = client.post(route, content=content, timeout=20,
                           headers={**gw.headers("fuzz-edge"), "content-type": "application/json"})
    fuzz.check(response, stream_asked, route)
