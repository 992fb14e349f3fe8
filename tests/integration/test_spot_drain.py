"""A spot interruption, end to end on loopback: the real appliance-spot-watch polls a fake
IMDSv2 that starts answering with an action while a stream is open through the real gateway
(fake engine behind it). The open stream completes, /ready turns 503 at once, new generation
requests are refused with 503 engine_unavailable and Retry-After, the logs say why, and usage
loses nothing."""

import json
import os
import sys
import threading
import time

import httpx
import pytest

from tests.integration.proxy_stack import gateway, keys_cli
from tests.servers import VENV_BIN, free_port, running

POLL_S = 0.2
NOTICE = {"action": "terminate", "time": "2026-11-25T00:02:00Z"}


@pytest.fixture
def imds(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running([sys.executable, "-m", "tests.fake_imds", "--port", str(port)],
                 ready_url=url + "/fake/stats", log=tmp_path / "imds.log"):
        yield url


@pytest.fixture
def gw(fake, tmp_path):
    with gateway(fake.url, tmp_path) as p:
        yield p


@pytest.fixture
def watch(gw, imds, tmp_path):
    log = tmp_path / "spot-watch.log"
    env = {**os.environ, "APPLIANCE_ENV_FILE": "/nonexistent", "APPLIANCE_IMDS_URL": imds,
           "APPLIANCE_SPOT_POLL_INTERVAL_S": str(POLL_S), "APPLIANCE_PROXY_HOST": "127.0.0.1",
           "APPLIANCE_PROXY_PORT": gw.url.rsplit(":", 1)[1]}
    with running([str(VENV_BIN / "appliance-spot-watch")], env=env, log=log):
        yield log


def chat(gw, **extra) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers(),
                      timeout=60)


def usage(gw) -> tuple[int, int]:
    rows = [line.split() for line in keys_cli(gw.db, "usage", "default").stdout.splitlines()
            if line.split()[:1] == ["default"]]
    return int(rows[0][1]), int(rows[0][3])


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not seen in {timeout}s")


def test_notice_mid_stream_drains_without_losing_the_stream_or_its_usage(gw, imds, watch):
    assert chat(gw).status_code == 200
    assert httpx.get(gw.url + "/ready").status_code == 200
    wait_for(lambda: httpx.get(imds + "/fake/stats").json()["polls"] >= 2, 10, "polling")

    events: list[str] = []
    first_chunk = threading.Event()

    def stream() -> None:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 30, "stream": True, "stream_options": {"include_usage": True},
                "fake": {"interval": 0.1}}
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body,
                          headers=gw.headers(), timeout=60) as answer:
            assert answer.status_code == 200
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_chunk.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_chunk.wait(10)
    httpx.post(imds + "/fake/notice", json=NOTICE)
    noticed = time.monotonic()
    wait_for(lambda: httpx.get(gw.url + "/ready").status_code == 503, 5, "/ready 503")
    took = time.monotonic() - noticed
    assert thread.is_alive(), "the stream should still be running when draining starts"

    ready = httpx.get(gw.url + "/ready")
    assert ready.json()["error"]["code"] == "draining"
    refused = chat(gw)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "30"
    error = refused.json()["error"]
    assert error["code"] == "engine_unavailable" and "terminate" in error["message"]
    assert httpx.get(gw.url + "/v1/models", headers=gw.headers()).status_code == 200

    thread.join(30)
    assert events[-1] == "[DONE]"
    tokens = [json.loads(e) for e in events[:-1]]
    assert sum(1 for t in tokens if t["choices"]) == 30
    completion = tokens[-1]["usage"]["completion_tokens"]
    # The plain chat, the stream and /v1/models were forwarded; the refused request was not.
    wait_for(lambda: usage(gw) == (3, 4 + completion), 10, f"usage saved ({usage(gw)})")

    gateway_log = gw.log.read_text()
    assert "draining (spot interruption notice: terminate at 2026-11-25T00:02:00Z)" in \
        gateway_log
    assert "spot interruption notice: terminate" in watch.read_text()
    metrics = httpx.get(gw.url + "/metrics").text
    assert "appliance_draining 1.0" in metrics
    print(f"/ready turned 503 {took * 1000:.0f} ms after the notice (polling every {POLL_S}s)")


def test_drain_is_for_loopback_callers_only(gw):
    answer = httpx.post(gw.url + "/drain", json={"reason": "x"},
                        headers={"X-Real-IP": "203.0.113.9"})
    assert answer.status_code == 403
    assert httpx.get(gw.url + "/ready").status_code == 200


def test_no_notice_no_drain(gw, imds, watch):
    wait_for(lambda: httpx.get(imds + "/fake/stats").json()["polls"] >= 5, 10, "polling")
    stats = httpx.get(imds + "/fake/stats").json()
    assert stats["tokens"] == 1 and stats["refused"] == 0
    assert httpx.get(gw.url + "/ready").status_code == 200
    assert chat(gw).status_code == 200
