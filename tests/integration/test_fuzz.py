"""Fuzzing the gateway (seeded, fast): no 500, no crash, no hang, every error in its API's shape,
on every route of the route table, streaming or not."""

import json
import subprocess

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol.routes import ROUTES, api_of
from tests.servers import VENV_BIN

# The proxy checks only the fields it acts on and leaves the rest to vLLM, so schemathesis'
# negative_data_rejection/positive_data_acceptance would grade the fake engine, not the proxy.
EXCLUDED_CHECKS = "negative_data_rejection,positive_data_acceptance"


def test_schemathesis_finds_nothing(gw):
    run = subprocess.run(
        [str(VENV_BIN / "st"), "run", gw.url + "/openapi.json", "--checks", "all",
         "--exclude-checks", EXCLUDED_CHECKS, "--max-examples", "30", "--seed", "1",
         "--workers", "1", "--header", f"Authorization: Bearer {gw.key('fuzz')}"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-5000:]


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40),
                      st.floats(allow_nan=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                           "content": st.text(max_size=40)}), json_value)
fields = {
    "model": st.one_of(st.just("fake-model"), json_value),
    "messages": st.one_of(st.lists(message, max_size=3), json_value),
    "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(0, 1000), max_size=5),
                        json_value),
    "max_tokens": st.one_of(st.integers(-5, 64), st.integers(4000, 10**12), json_value),
    "stream": st.one_of(st.booleans(), json_value),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}),
                                json_value),
    "temperature": json_value,
    "top_k": json_value,
    "n": st.one_of(st.integers(-2, 12), json_value),
    "best_of": st.one_of(st.integers(-2, 12), json_value),
    "cache_salt": st.one_of(st.text(max_size=20), json_value),
    "max_completion_tokens": st.one_of(st.integers(-5, 64), json_value),
    "input": st.one_of(st.text(max_size=40), json_value),
}
body = st.dictionaries(st.sampled_from(sorted(fields)), st.none(), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}))
raw = st.one_of(body.map(lambda b: json.dumps(b).encode()), st.binary(max_size=64))


POST_ROUTES = sorted(path for path, route in ROUTES.items() if "POST" in route.methods)


def check(response: httpx.Response, stream_asked: bool, route: str = "") -> None:
    assert response.status_code != 500, response.text
    assert response.status_code < 500 or response.status_code in (502, 503, 504)
    anthropic = api_of(route) == "anthropic"
    if response.status_code >= 400:
        if anthropic:
            answer = response.json()
            assert answer["type"] == "error" and set(answer["error"]) == {"type", "message"}
        else:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
    elif stream_asked and response.headers["content-type"].startswith("text/event-stream"):
        if anthropic:  # its last event ends the message, or says why it could not
            last = response.text.rstrip("\n").rsplit("\n\n", 1)[-1]
            assert last.startswith(("event: message_stop", "event: error")), last
        else:
            assert response.text.endswith("data: [DONE]\n\n")


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(content=raw, route=st.sampled_from(POST_ROUTES))
def test_random_bodies_never_break_the_gateway(gw, content, route):
    try:
        stream_asked = json.loads(content).get("stream") is True
    except (ValueError, AttributeError, UnicodeDecodeError):
        stream_asked = False
    response = httpx.post(gw.url + route, content=content, timeout=20,
                          headers={**gw.headers("fuzz-body"), "content-type": "application/json"})
    check(response, stream_asked, route)
