"""Tenancy on the fake engine: fair engine slots, per-key queue bounds, the memory guard.

The fake engine holds a stream open as long as asked, so "the engine's batch is full" is a
state the tests set up exactly, and its /fake/stats says what reached it.
"""

import json
import threading

import httpx
import openai
import pytest

from tests.integration.proxy_stack import gateway, keys_cli
from tests.integration.test_gateway import CHAT, error_of, usage_row, wait_for

SLOW = {**CHAT, "stream": True, "max_tokens": 2, "fake": {"first_delay": 3}}


def post_in_background(p, name: str, body: dict, results: list) -> threading.Thread:
    headers = p.headers(name)

    def go() -> None:
        r = httpx.post(p.url + "/v1/chat/completions", headers=headers, json=body, timeout=30)
        results.append((name, r.status_code, r.text))

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def metric(p, name: str) -> float:
    text = httpx.get(p.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


@pytest.fixture
def two_slots(fake, tmp_path):
    with gateway(fake.url, tmp_path, engine_concurrency=2, max_queued_per_key=4) as p:
        p.key("noisy"), p.key("quiet")
        yield p


def test_the_engine_never_gets_more_than_its_slots(two_slots, fake):
    results: list = []
    threads = [post_in_background(two_slots, "noisy", SLOW, results) for _ in range(4)]
    wait_for(lambda: metric(two_slots, 'appliance_queue_depth{key="noisy"}') == 2)
    assert fake.stats()["in_progress"] == 2
    assert metric(two_slots, "appliance_engine_slots_in_use") == 2
    for t in threads:
        t.join()
    assert [status for _, status, _ in results] == [200] * 4


def test_a_quiet_key_gets_the_next_slot_ahead_of_a_queued_flood(two_slots, fake):
    results: list = []
    flood = [post_in_background(two_slots, "noisy", SLOW, results) for _ in range(6)]
    wait_for(lambda: metric(two_slots, 'appliance_queue_depth{key="noisy"}') == 4)
    quiet = post_in_background(two_slots, "quiet", {**CHAT, "fake": {"delay": 0}}, results)
    quiet.join()
    # Served when the first of the two running streams ended, ahead of the four queued ones
    # (first come, first served would finish at least four of the flood before it).
    assert [name for name, _, _ in results].index("quiet") <= 2
    for t in flood:
        t.join()
    assert all(status == 200 for _, status, _ in results)


def test_a_key_over_its_queue_bound_gets_429_and_others_still_queue(two_slots):
    results: list = []
    flood = [post_in_background(two_slots, "noisy", SLOW, results) for _ in range(6)]
    wait_for(lambda: metric(two_slots, 'appliance_queue_depth{key="noisy"}') == 4)
    refused = httpx.post(two_slots.url + "/v1/chat/completions", headers=two_slots.headers(
        "noisy"), json=SLOW)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert error_of(refused)["code"] == "too_many_requests"
    quiet = httpx.post(two_slots.url + "/v1/chat/completions", headers=two_slots.headers(
        "quiet"), json={**CHAT, "fake": {"delay": 0}}, timeout=30)
    assert quiet.status_code == 200
    assert metric(two_slots, 'appliance_requests_refused_total{key="noisy",reason="queue_full"}'
                  ) == 1
    for t in flood:
        t.join()


def test_routes_that_generate_nothing_never_wait(two_slots):
    results: list = []
    flood = [post_in_background(two_slots, "noisy", SLOW, results) for _ in range(4)]
    wait_for(lambda: metric(two_slots, 'appliance_queue_depth{key="noisy"}') == 2)
    models = httpx.get(two_slots.url + "/v1/models", headers=two_slots.headers("quiet"))
    tokens = httpx.post(two_slots.url + "/tokenize", headers=two_slots.headers("quiet"),
                        json={"prompt": "hi"})
    assert models.status_code == 200 and tokens.status_code != 503
    assert len(results) == 0  # the flood is still running or queued
    for t in flood:
        t.join()


def test_time_in_the_queue_counts_against_the_first_token_deadline(fake, tmp_path):
    with gateway(fake.url, tmp_path, engine_concurrency=1, stream_first_token_timeout_s=1
                 ) as p:
        p.key("noisy"), p.key("quiet")  # made first: the CLI is slow on a loaded machine
        results: list = []
        started = fake.stats()["started"]
        holder = post_in_background(p, "noisy", {**SLOW, "max_tokens": 6, "fake": {
            "first_delay": 0.5, "interval": 0.5}}, results)
        wait_for(lambda: fake.stats()["in_progress"] == 1)
        late = httpx.post(p.url + "/v1/chat/completions", headers=p.headers("quiet"),
                          json={**SLOW, "fake": {}}, timeout=30)
        holder.join()
        assert late.status_code == 504 and error_of(late)["code"] == "timeout"
        assert fake.stats()["started"] == started + 1  # the late request never reached the engine


def test_the_memory_guard_refuses_only_when_keys_together_fill_it(fake, tmp_path):
    with gateway(fake.url, tmp_path, engine_concurrency=1, max_queued_per_key=1,
                 max_inflight=3) as p:
        p.key("a"), p.key("b"), p.key("c")
        results: list = []
        threads = [post_in_background(p, "a", SLOW, results) for _ in range(2)]
        wait_for(lambda: metric(p, 'appliance_queue_depth{key="a"}') == 1)
        threads.append(post_in_background(p, "b", SLOW, results))
        wait_for(lambda: metric(p, 'appliance_queue_depth{key="b"}') == 1)
        refused = httpx.post(p.url + "/v1/chat/completions", headers=p.headers("c"), json=CHAT)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert error_of(refused)["type"] == "server_error"
        for t in threads:
            t.join()
        assert sorted(status for _, status, _ in results) == [200, 200, 200]


def test_a_memory_guard_one_key_could_fill_is_refused_at_start(fake, tmp_path):
    with pytest.raises(RuntimeError), gateway(fake.url, tmp_path, engine_concurrency=4,
                                              max_queued_per_key=4, max_inflight=8):
        pass


# Per-key controls, set with the real appliance-keys CLI


def test_max_concurrent_holds_a_key_to_its_slots_while_others_use_the_rest(fake, tmp_path):
    with gateway(fake.url, tmp_path, engine_concurrency=4) as p:
        p.key("capped", "--max-concurrent", "1")
        p.key("other")
        results: list = []
        threads = [post_in_background(p, "capped", SLOW, results) for _ in range(3)]
        wait_for(lambda: metric(p, 'appliance_queue_depth{key="capped"}') == 2)
        assert metric(p, "appliance_engine_slots_in_use") == 1
        other = httpx.post(p.url + "/v1/chat/completions", headers=p.headers("other"),
                           json={**CHAT, "fake": {"delay": 0}}, timeout=30)
        assert other.status_code == 200 and not results  # served while "capped" still waits
        for t in threads:
            t.join()
        assert [status for _, status, _ in results] == [200] * 3


def test_a_key_limited_to_some_models_sees_the_rest_as_missing(gw):
    gw.key("narrow", "--models", "other-model")
    client = gw.client("narrow")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**CHAT)
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert "does not exist or you do not have access to it" in error["message"]
    gw.key("wide", "--models", "fake-model,other")
    assert gw.client("wide").chat.completions.create(**CHAT)


def test_a_quota_is_never_overshot_by_concurrent_requests(fake, tmp_path):
    """Each request reserves its bound (body bytes + max_tokens): of 8 at once, those that
    fit run, the rest get 429 insufficient_quota, and the settled use stays under the quota."""
    with gateway(fake.url, tmp_path) as p:
        p.key("metered", "--quota-tokens", "1200", "--quota-period", "day")
        body = {**CHAT, "max_tokens": 200, "fake": {"delay": 0.5}}
        results: list = []
        threads = [post_in_background(p, "metered", body, results) for _ in range(8)]
        for t in threads:
            t.join()
        statuses = sorted(status for _, status, _ in results)
        assert 200 in statuses and 429 in statuses
        refused = next(json.loads(text) for _, status, text in results if status == 429)
        assert refused["error"]["code"] == "insufficient_quota"
        wait_for(lambda: usage_row(p, "metered")[0] == statuses.count(200))
        used = keys_cli(p.db, "show", "metered").stdout
        spent = sum(usage_row(p, "metered")[1:3])
        assert spent <= 1200, used
        late = httpx.post(p.url + "/v1/chat/completions", headers=p.headers("metered"),
                          json={**body, "max_tokens": 1200})
        assert late.status_code == 429 and int(late.headers["retry-after"]) >= 1


def test_update_takes_effect_without_a_restart_and_keeps_usage(gw):
    client = gw.client("changing")
    client.chat.completions.create(**CHAT)
    wait_for(lambda: usage_row(gw, "changing")[0] == 1)
    out = keys_cli(gw.db, "update", "changing", "--models", "elsewhere")
    assert out.returncode == 0, out.stderr

    def refused() -> bool:
        try:
            client.chat.completions.create(**CHAT)
        except openai.NotFoundError:
            return True
        return False
    wait_for(refused)
    assert usage_row(gw, "changing")[0] >= 1
    assert keys_cli(gw.db, "update", "changing", "--all-models").returncode == 0
    wait_for(lambda: not refused())


def quota_gauges(p) -> dict[tuple[str, str], float]:
    """(family, key) -> value for the two quota gauges in one scrape."""
    found = {}
    for line in httpx.get(p.url + "/metrics").text.splitlines():
        for family in ("appliance_key_quota_tokens", "appliance_key_quota_remaining_tokens"):
            if line.startswith(family + "{"):
                key = line.split('key="', 1)[1].split('"', 1)[0]
                found[family, key] = float(line.rsplit(" ", 1)[1])
    return found


def test_metrics_show_each_quota_and_what_is_left_of_it(fake, tmp_path):
    """The near-quota alert reads these: a key's quota, and its quota less what it used this
    period, for keys with a quota that can still be used; none for the others."""
    with gateway(fake.url, tmp_path) as p:
        p.key("metered", "--quota-tokens", "5000", "--quota-period", "month")
        p.key("unmetered")
        p.key("gone", "--quota-tokens", "10")
        keys_cli(p.db, "revoke", "gone")
        assert quota_gauges(p) == {("appliance_key_quota_tokens", "metered"): 5000,
                                   ("appliance_key_quota_remaining_tokens", "metered"): 5000}
        answer = httpx.post(p.url + "/v1/chat/completions", headers=p.headers("metered"),
                            json=CHAT).json()
        spent = answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
        wait_for(lambda: quota_gauges(p)[
            "appliance_key_quota_remaining_tokens", "metered"] == 5000 - spent)
        assert 'period="month"' in httpx.get(p.url + "/metrics").text
