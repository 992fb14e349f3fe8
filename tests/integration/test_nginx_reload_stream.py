"""NGINX reloads (a renewed certificate, a changed setting) while streams are open.

A reload starts new workers and lets the old ones finish what they hold: a long stream must
run to its [DONE] on the old worker while new requests are already served by the new ones.
"""

import json
import subprocess
import time
from pathlib import Path

import httpx

from tests.integration.nginx_stack import NGINX, render, serving

CHAT = "/v1/chat/completions"
TOKENS = 30


def workers(master: int) -> set[int]:
    return {int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()}


def wait_for_new_workers(master: int, old: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = workers(master) - old
        if new:
            return new
        time.sleep(0.05)
    raise TimeoutError(f"no new NGINX worker {timeout}s after the reload")


def test_reload_during_a_long_stream_does_not_cut_it(gw, tmp_path):
    site = render(tmp_path / "edge", gw.url.removeprefix("http://"))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": TOKENS, "stream": True, "fake": {"interval": 0.1}}
    text, done, served_meanwhile = [], False, None
    with serving(site) as nginx, httpx.Client(base_url=site.https, verify=site.trust(),
                                              timeout=30) as client:
        old = workers(nginx.pid)
        with client.stream("POST", CHAT, json=body, headers=gw.headers()) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                text.append(json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
                            ["content"])
                if len(text) == 5:
                    subprocess.run([NGINX, *site.nginx_args, "-s", "reload"], check=True,
                                   capture_output=True)
                    wait_for_new_workers(nginx.pid, old)
                    # A fresh connection, while the stream is still open, reaches a new worker.
                    with httpx.Client(base_url=site.https, verify=site.trust()) as fresh:
                        served_meanwhile = fresh.post(CHAT, json={**body, "stream": False},
                                                      headers=gw.headers()).status_code
        assert served_meanwhile == 200
        assert done, f"the stream was cut after {len(text)} of {TOKENS} tokens"
        assert "".join(text) == " ".join(f"tok{i}" for i in range(TOKENS))
        # The old worker leaves once its stream is over.
        deadline = time.monotonic() + 10
        while workers(nginx.pid) & old and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not workers(nginx.pid) & old
