#!/usr/bin/env python3
"""The CPU of the gateway's own code per small request and per streamed event, alone.

The gateway's ASGI app (auth, limits, fair admission, usage, metrics, the access log) is
driven in this process: the engine's answer is canned (a chat completion, or a stream of 256
chunks and a usage chunk as vLLM sends them to the gateway) and the client's ``send`` keeps what it
is given. No sockets, no uvicorn, no other process: what is left is the Python the gateway runs
on top of uvicorn and its engine transport, so a change to it can be compared on a noisy
machine (the multi-process benchmarks move by 10-20% from one run to the next; this by a few).
``bench_proxy.py``'s ``asgi`` and ``bare`` rows give the two other parts of a request's CPU.

    .venv/bin/python bench/bench_gateway_code.py [--requests 40000] [--rounds 5]
        [--baseline REF]   # the same in a checkout of git REF, in alternation
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ANSWER = (b'{"id":"chatcmpl-fake","object":"chat.completion","created":0,"model":"fake-model",'
          b'"choices":[{"index":0,"message":{"role":"assistant","content":"tok0 tok1 tok2"},'
          b'"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":8,'
          b'"total_tokens":11}}')
# Every chunk with its running usage: the gateway asks for it (continuous_usage_stats), so
# that a stream the client leaves is billed for what the engine generated.
EVENTS = [b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":0,'
          b'"model":"fake-model","choices":[{"index":0,"delta":{"content":" tok%d"},'
          b'"finish_reason":null}],"usage":{"prompt_tokens":3,"total_tokens":%d,'
          b'"completion_tokens":%d}}\n\n' % (i, 4 + i, i + 1) for i in range(256)]
EVENTS.append(b'data: {"id":"fake","object":"chat.completion.chunk","created":0,'
              b'"model":"fake-model","choices":[],"usage":{"prompt_tokens":3,'
              b'"completion_tokens":256,"total_tokens":259}}\n\ndata: [DONE]\n\n')
CHAT = b'{"model":"fake-model","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
STREAM = (b'{"model":"fake-model","messages":[{"role":"user","content":"hi"}],'
          b'"max_tokens":256,"stream":true}')


class CannedStream:
    """An engine answer's body, chunk by chunk, as the transport's stream hands it over."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = iter(chunks)

    async def next_chunk(self) -> bytes:
        return next(self.chunks, b"")

    async def __aiter__(self):  # how gateways before 2026-11-25 read it
        while chunk := await self.next_chunk():
            yield chunk

    async def aclose(self) -> None:
        pass


def measure(requests: int) -> tuple[float, float]:
    """(µs CPU per small request, µs CPU per streamed event) in this process."""
    from proxy.app import create_app
    from proxy.observe import accesslog
    from proxy.relay.transport import EngineAnswer
    from proxy.settings import load_settings

    settings = load_settings()
    accesslog.configure(settings.log_level)
    app = create_app(settings)
    forwarder = app.gateway.forwarder
    engines = getattr(forwarder, "engines", None)
    if engines is None:  # gateways before 2026-12-06: one engine, its readiness a flag
        forwarder.engine_ready = True
    else:
        for engine in engines.all:
            engine.ready, engine.cards = True, {"fake-model": {"id": "fake-model"}}
    json_headers = [(b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(ANSWER))]
    sse_headers = [(b"content-type", b"text/event-stream; charset=utf-8")]

    async def canned(ex) -> EngineAnswer:
        if ex.record.stream:
            return EngineAnswer(200, sse_headers, CannedStream(EVENTS))
        return EngineAnswer(200, json_headers, CannedStream([ANSWER]))

    forwarder._send = canned
    key = os.environ["BENCH_KEY"].encode()

    async def one(body: bytes) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
                 "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"authorization", b"Bearer " + key),
                             (b"content-type", b"application/json"),
                             (b"content-length", b"%d" % len(body))],
                 "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client stays
            return {"type": "http.disconnect"}

        sent = []

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        if sent[0]["status"] != 200:
            raise SystemExit(f"the gateway answered {sent[0]['status']}: {sent[1]['body']!r}")

    async def run() -> tuple[float, float]:
        for _ in range(2000):
            await one(CHAT)
        start = time.process_time()
        for _ in range(requests):
            await one(CHAT)
        per_request = (time.process_time() - start) / requests
        streams = max(1, requests // 100)
        start = time.process_time()
        for _ in range(streams):
            await one(STREAM)
        per_event = (time.process_time() - start) / (streams * len(EVENTS))
        return 1e6 * per_request, 1e6 * per_event

    import uvloop

    return uvloop.run(run())


def key_and_env(workdir: Path) -> dict[str, str]:
    db = workdir / "keys.db"
    key = subprocess.run([str(ROOT / ".venv" / "bin" / "appliance-keys"), "--db", str(db),
                          "create", "--name", "bench", "--rpm", "1000000000", "--tpm",
                          "1000000000000"], capture_output=True, text=True,
                         check=True).stdout.strip()
    return {"BENCH_KEY": key, "APPLIANCE_KEYS_DB": str(db), "APPLIANCE_LOG_LEVEL": "info",
            "APPLIANCE_ENGINE_URL": "http://127.0.0.1:9", "APPLIANCE_PROXY_WORKERS": "1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", metavar="REF")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # in the tree under test: its own ``proxy`` package
        sys.path.insert(0, os.getcwd())
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the access log's lines)
        request_us, event_us = measure(args.requests)
        sys.stderr.write(f"{request_us} {event_us}\n")
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-code-"))
    env = {**os.environ, **key_and_env(workdir)}
    trees = {"proxy": ROOT}
    if args.baseline:
        sys.path.insert(0, str(ROOT))
        from bench.bench_proxy import checkout

        trees[f"proxy@{args.baseline}"] = checkout(args.baseline, workdir)
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for turn in range(args.rounds):
        for name in trees if turn % 2 == 0 else reversed(trees):
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure",
                                   "--requests", str(args.requests)], cwd=trees[name], env=env,
                                  capture_output=True, text=True, check=True)
            figures[name].append(tuple(map(float, done.stderr.split()[-2:])))
    print(f"gateway code alone, median of {args.rounds} runs (each run):")
    for name, runs in figures.items():
        requests, events = zip(*runs, strict=True)
        print(f"{name:>22}  {statistics.median(requests):6.1f} us a small request"
              f" ({' '.join(f'{v:.1f}' for v in requests)})"
              f"   {statistics.median(events):5.2f} us a streamed event"
              f" ({' '.join(f'{v:.2f}' for v in events)})")


if __name__ == "__main__":
    main()
