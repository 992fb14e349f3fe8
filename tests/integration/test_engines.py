"""Several engines behind one gateway (fake engines, fast): routing by model, one engine away
while the others serve, replicas with prefix affinity, and no client before the canary."""

import time

import httpx
import pytest

from proxy.relay.engines import CANARY_PROMPT, RELIST_S
from tests.integration.proxy_stack import engine, gateway


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """Two engines of two models, and two replicas of a third, behind one gateway."""
    with engine("--model", "chat-a") as a, engine("--model", "embed-b") as b, \
            engine("--model", "rep") as r1, engine("--model", "rep") as r2:
        urls = ",".join(e.url for e in (a, b, r1, r2))
        with gateway(a.url, tmp_path_factory.mktemp("engines"), engine_urls=urls) as gw:
            yield gw, {"chat-a": a, "embed-b": b, "r1": r1, "r2": r2}


def chat(gw, model: str, text: str = "hello there", name: str = "router") -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", headers=gw.headers(name), timeout=10,
                      json={"model": model, "max_tokens": 2,
                            "messages": [{"role": "user", "content": text}]})


def test_every_engine_generated_before_any_client_reached_it(box):
    _, engines = box
    for fake in engines.values():
        stats = fake.stats()
        assert stats["completed"] >= 1 and stats["last_body"]["prompt"] == CANARY_PROMPT


def test_requests_go_to_the_engine_of_their_model_and_the_list_has_every_model(box):
    gw, engines = box
    before = {name: fake.stats()["completed"] for name, fake in engines.items()}
    assert chat(gw, "chat-a").status_code == 200
    assert chat(gw, "embed-b").status_code == 200
    after = {name: fake.stats()["completed"] for name, fake in engines.items()}
    assert after["chat-a"] == before["chat-a"] + 1 and after["embed-b"] == before["embed-b"] + 1
    listed = httpx.get(gw.url + "/v1/models", headers=gw.headers("router")).json()
    assert sorted(m["id"] for m in listed["data"]) == ["chat-a", "embed-b", "rep"]
    limited = gw.key("only-b", "--models", "embed-b")
    seen = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {limited}"})
    assert [m["id"] for m in seen.json()["data"]] == ["embed-b"]
    missing = chat(gw, "no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_a_repeated_prompt_stays_on_one_replica_and_load_still_spreads(box):
    gw, engines = box
    counts = lambda: (engines["r1"].stats()["completed"], engines["r2"].stats()["completed"])  # noqa: E731
    start = counts()
    for _ in range(6):
        assert chat(gw, "rep", "the same long system prompt and question").status_code == 200
    moved = [b - a for a, b in zip(start, counts(), strict=True)]
    assert sorted(moved) == [0, 6], moved
    start = counts()
    for i in range(24):
        assert chat(gw, "rep", f"question number {i} about something else",
                    name=f"spread-{i % 4}").status_code == 200
    moved = [b - a for a, b in zip(start, counts(), strict=True)]
    assert min(moved) > 0, moved


def test_one_engine_away_is_503_for_its_model_while_the_others_serve(box):
    gw, engines = box
    engines["embed-b"].proc.terminate()
    engines["embed-b"].proc.wait(10)
    away = chat(gw, "embed-b")
    assert away.status_code == 503 and away.headers["retry-after"]
    assert away.json()["error"]["code"] == "engine_unavailable"
    assert chat(gw, "chat-a").status_code == 200
    ready = httpx.get(gw.url + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "partial"
    states = {tuple(e["models"]): e["ready"] for e in ready.json()["engines"]}
    assert states[("embed-b",)] is False and states[("chat-a",)] is True


def test_an_adapter_loaded_at_runtime_is_routed_and_one_removed_is_gone(box):
    """appliance-models loads an adapter into a running engine: the gateway reads the engines'
    lists again (at most every second) when a request names a model none listed, and for a
    client's model list, so no restart is needed either way."""
    gw, engines = box
    fake = engines["chat-a"]
    httpx.post(fake.url + "/fake/adapters", json=["chat-a-support"])
    assert chat(gw, "chat-a-support").status_code == 200
    listed = httpx.get(gw.url + "/v1/models", headers=gw.headers("router")).json()
    assert "chat-a-support" in [m["id"] for m in listed["data"]]
    httpx.post(fake.url + "/fake/adapters", json=[])
    time.sleep(RELIST_S)
    listed = httpx.get(gw.url + "/v1/models", headers=gw.headers("router")).json()
    assert "chat-a-support" not in [m["id"] for m in listed["data"]]
