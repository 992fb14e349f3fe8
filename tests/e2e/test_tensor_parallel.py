"""Tensor parallelism for real: vLLM's CPU build split over two ranks (one per core), and the
SIGTERM drain that systemd relies on (``KillMode=mixed``: the signal reaches vLLM's main process).
"""

import json
import signal
import threading

import httpx
import pytest

from tests.e2e.engine_stack import SERVED_NAME, engine

PROMPTS = ["Once upon a time", "The appliance answers", "def add(a, b):"]
GRACE_S = 10


@pytest.fixture(scope="module")
def vllm_tp2(tiny_model, tmp_path_factory):
    with engine(
        tiny_model,
        tmp_path_factory.mktemp("engine-tp2"),
        tensor_parallel_size=2,
        shutdown_grace_s=GRACE_S,
    ) as e:
        yield e


def greedy_texts(client) -> list[str]:
    return [
        client.completions.create(
            model=SERVED_NAME,
            prompt=prompt,
            max_tokens=32,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
        for prompt in PROMPTS
    ]


def test_launcher_planned_two_ranks(vllm_tp2):
    log = vllm_tp2.log.read_text()
    assert "tensor parallel size 2, as configured" in log
    assert "--tensor-parallel-size 2" in log


def test_tensor_parallel_two_gives_the_same_greedy_output_as_one(vllm, vllm_tp2):
    single = greedy_texts(vllm.client())
    assert all(single)
    assert greedy_texts(vllm_tp2.client()) == single


def test_sigterm_lets_an_inflight_stream_finish_then_stops(vllm_tp2):
    tokens = 600
    lines: list[str] = []
    first_chunk = threading.Event()

    def stream() -> None:
        body = {
            "model": SERVED_NAME,
            "prompt": "Hello",
            "max_tokens": tokens,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream(
            "POST",
            vllm_tp2.url + "/v1/completions",
            json=body,
            timeout=120,
            headers={"Authorization": f"Bearer {vllm_tp2.key}"},
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60)
    vllm_tp2.proc.send_signal(signal.SIGTERM)
    reader.join(120)
    vllm_tp2.proc.wait(GRACE_S + 30)  # drained or not, vLLM stops once the grace is over

    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
    assert usage["completion_tokens"] == tokens
