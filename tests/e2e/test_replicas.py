"""Two replicas of one model on real vLLM (CPU build, the tiny model, small KV caches: the two
cores share them) behind one gateway: a repeated long prompt keeps hitting the prefix cache of
the replica that has it, while different prompts still spread over both."""

import httpx
import pytest

from tests.e2e.engine_stack import MAX_NUM_SEQS, SERVED_NAME, engine
from tests.integration.proxy_stack import gateway

LONG_PROMPT = "The lighthouse keeper counted the ships that passed at night. " * 20


@pytest.fixture(scope="module")
def replicas(tiny_model, tmp_path_factory):
    second_dir = tmp_path_factory.mktemp("replica-1")
    with engine(tiny_model, tmp_path_factory.mktemp("replica-0"), max_num_seqs=MAX_NUM_SEQS,
                kv_cache_memory_bytes=128 * 2**20) as first:
        # One internal key for both, as on the appliance (the gateway sends one to every engine).
        (second_dir / "appliance.env").write_text(f"APPLIANCE_ENGINE_API_KEY={first.key}\n")
        with engine(tiny_model, second_dir, max_num_seqs=MAX_NUM_SEQS,
                    kv_cache_memory_bytes=128 * 2**20, engine_api_key=first.key) as second:
            assert second.key == first.key
            with gateway(first.url, tmp_path_factory.mktemp("replicas-gw"),
                         engine_api_key=first.key, engine_urls=f"{first.url},{second.url}",
                         max_num_seqs=MAX_NUM_SEQS) as gw:
                yield gw, (first, second)


def complete(gw, key: str, prompt: str) -> None:
    answer = httpx.post(gw.url + "/v1/completions", timeout=120,
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": SERVED_NAME, "prompt": prompt, "max_tokens": 1})
    assert answer.status_code == 200, answer.text


def test_a_repeated_prompt_hits_one_replicas_cache_and_others_spread(replicas):
    gw, engines = replicas
    key = gw.key("replicas")

    def hits() -> list[float]:
        return [e.metric("vllm:prefix_cache_hits_total") for e in engines]

    def served() -> list[float]:
        return [e.metric("vllm:request_success_total") for e in engines]

    complete(gw, key, LONG_PROMPT)
    before_hits, before_served = hits(), served()
    for _ in range(4):
        complete(gw, key, LONG_PROMPT)
    gained = [after - before for after, before in zip(hits(), before_hits, strict=True)]
    moved = [after - before for after, before in zip(served(), before_served, strict=True)]
    assert sorted(moved) == [0, 4], moved  # every repeat on one replica ...
    assert gained[moved.index(4)] > 0 and gained[moved.index(0)] == 0  # ... whose cache hit

    before_served = served()
    for i in range(12):
        complete(gw, gw.key(f"spread-{i % 4}"), f"Question {i}: what is the tide at noon?")
    moved = [after - before for after, before in zip(served(), before_served, strict=True)]
    assert min(moved) > 0, f"one replica took every request: {moved}"
