"""The operator's client, run on the host inside the container's network namespace (the
container's loopback is the instance's public address here). It reads one JSON command per
line on stdin and answers one JSON line each, so a test can act inside the machine between
requests and time how soon the front door sees the change.

    nsenter -t PID -n python -m tests.image.client --url https://127.0.0.1 --cacert CERT
"""

import argparse
import json
import sys
import threading
import time

import httpx
import openai

MODEL = "tiny"


class Client:
    def __init__(self, url: str, cacert: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, verify=cacert, timeout=30)
        self.stream_outcome: dict = {}
        self.stream_thread: threading.Thread | None = None

    def chat(self, key: str) -> dict:
        """A chat completion with the openai package, as any OpenAI client would send it."""
        client = openai.OpenAI(
            base_url=self.url + "/v1", api_key=key, http_client=self.http, max_retries=0
        )
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        return {"content": answer.choices[0].message.content, "usage": answer.usage.model_dump()}

    def watch(self, key: str, status: int, timeout: float) -> dict:
        """Poll /v1/models with ``key`` until it answers ``status``; how long that took."""
        started = time.monotonic()
        seen = None
        while time.monotonic() - started < timeout:
            seen = self.http.get("/v1/models", headers={"authorization": f"Bearer {key}"})
            if seen.status_code == status:
                return {"elapsed": time.monotonic() - started, "status": status}
            time.sleep(0.02)
        return {"elapsed": None, "status": seen.status_code if seen else None}

    def stream(self, key: str, max_tokens: int) -> dict:
        """Open a long stream in the background; answer once its first event has arrived."""
        first = threading.Event()

        def read() -> None:
            events, outcome = 0, "open"
            body = {
                "model": MODEL, "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Count"}],
            }  # fmt: skip
            try:
                with self.http.stream(
                    "POST", "/v1/chat/completions", json=body,
                    headers={"authorization": f"Bearer {key}"}, timeout=300,
                ) as response:  # fmt: skip
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            events += 1
                            first.set()
                            if line == "data: [DONE]":
                                outcome = "done"
                            elif '"error"' in line:
                                outcome = "error: " + line[6:200]
                    self.stream_outcome = {"status": response.status_code}
            except httpx.HTTPError as exc:
                outcome = f"{type(exc).__name__}"
            finally:
                self.stream_outcome |= {"events": events, "outcome": outcome}
                first.set()

        self.stream_thread = threading.Thread(target=read, daemon=True)
        self.stream_thread.start()
        first.wait(120)
        return {"started": True}

    def stream_result(self) -> dict:
        assert self.stream_thread is not None
        self.stream_thread.join(300)
        return self.stream_outcome

    def until_ok(self, key: str, timeout: float) -> dict:
        """Chat requests until one succeeds, recording every refusal on the way."""
        body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
        refusals: list[dict] = []
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            response = self.http.post(
                "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
            )
            if response.status_code == 200:
                return {"recovered_after": time.monotonic() - started, "refusals": refusals}
            error = response.json().get("error", {}) if response.content else {}
            refusals.append({
                "status": response.status_code, "code": error.get("code"),
                "type": error.get("type"), "retry_after": response.headers.get("retry-after"),
            })  # fmt: skip
            time.sleep(0.25)
        return {"recovered_after": None, "refusals": refusals[-20:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--cacert", required=True)
    args = parser.parse_args()
    client = Client(args.url, args.cacert)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        name = command.pop("command")
        try:
            answer = getattr(client, name)(**command)
        except Exception as exc:  # reported to the test, which fails with it
            answer = {"exception": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
