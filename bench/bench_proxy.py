#!/usr/bin/env python3
"""Benchmark the gateway against the fake engine directly and against a minimal pass-through.

One run, same machine, same load, five contenders:
  direct   the fast fake engine itself (tests/fake_engine.py)
  asgi     uvicorn answering every request with a fixed small answer, no engine behind it
           (``asgi_app``; no streams): the floor of any gateway on uvicorn, before it relays
  floor    a ~30-line FastAPI + httpx pass-through defined below: the usual Python proxy
  bare     uvicorn and the gateway's own engine transport, nothing else (``bare_app``): what any
           Python gateway on uvicorn pays before it checks a key; the gap to ``proxy`` is what
           the gateway's features cost, the gap to ``direct`` what relaying costs in Python
  proxy    appliance-proxy with auth, rate limits, usage and metrics on

Non-streaming load comes from wrk (C, not the bottleneck); streams from a raw asyncio client
that only counts events. Prints a table; ``--csv FILE`` also writes the figures.

    .venv/bin/python bench/bench_proxy.py [--duration 10] [--csv results/proxy.csv]
        [--baseline REF]   # also the gateway as of git REF, in the same run ("proxy@REF")
        [--turns N]        # then N turns of each in alternation (c=64, then the stream rounds),
                           # so that the machine's drift falls on both: medians per turn
"""

import argparse
import asyncio
import contextlib
import csv
import json
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.procstats import cpu_seconds, peak_rss_mb  # noqa: E402
from tests.servers import VENV_BIN, fake_engine, free_port, running  # noqa: E402

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
STREAM = {**CHAT, "max_tokens": 256, "stream": True}


def floor_app(upstream: str):
    """The floor: one shared httpx client, StreamingResponse over aiter_raw(), nothing else."""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from starlette.background import BackgroundTask

    app = FastAPI()
    client = httpx.AsyncClient(base_url=upstream, timeout=None,
                               limits=httpx.Limits(max_connections=512))

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request):
        req = client.build_request(request.method, "/" + path, content=await request.body(),
                                   headers={"content-type": "application/json"})
        resp = await client.send(req, stream=True)
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code,
                                 media_type=resp.headers.get("content-type"),
                                 background=BackgroundTask(resp.aclose))

    return app


def bare_app(upstream: str):
    """Pure ASGI: read the body, send it on one of the transport's pooled connections, relay
    the answer chunk by chunk. No routing, no key, no limit, no usage, no metric."""
    import httpx

    from proxy.relay.forward import client_headers
    from proxy.relay.transport import EngineTransport

    url = httpx.URL(upstream)
    transport = EngineTransport(url.host, url.port)
    headers = [(b"content-type", b"application/json")]

    async def app(scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        answer = await transport.send(scope["method"].encode(), scope["path"].encode(), headers,
                                      body, 5.0, None)
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": client_headers(answer.headers)})
        async for chunk in answer.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def asgi_app():
    """Pure ASGI: read the body, answer a fixed chat completion of the fake engine's size."""
    answer = json.dumps({"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                         "model": "fake-model", "choices": [{"index": 0, "message": {
                             "role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 tok5"},
                             "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 8,
                                   "total_tokens": 11}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]

    async def app(scope, receive, send) -> None:
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def serve_floor(port: int, upstream: str, kind: str) -> None:
    import uvicorn

    app = {"floor": floor_app, "bare": bare_app, "asgi": lambda _: asgi_app()}[kind](upstream)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop",
                http="httptools", access_log=False, lifespan="off")


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d %%f %%f %%f %%f\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    summary.requests / (summary.duration / 1e6)))
end
"""


def wrk(url: str, key: str, connections: int, seconds: int, workdir: Path,
        timeout_s: int = 2) -> dict:
    """``timeout_s``: wrk counts slower answers as errors and leaves them out of the latencies."""
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT % (json.dumps(CHAT), key))
    threads = min(connections, 2)
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                          "--timeout", f"{timeout_s}s", "-s", str(script),
                          url + "/v1/chat/completions"],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)", out)
    requests, errors, _, p50, p90, p99, rps = match.groups()
    return {"requests": int(requests), "errors": int(errors), "p50_ms": float(p50) / 1000,
            "p90_ms": float(p90) / 1000, "p99_ms": float(p99) / 1000, "rps": float(rps)}


async def one_stream(port: int, key: str, body: bytes,
                     tls: ssl.SSLContext | None = None) -> tuple[int, float, bool]:
    """Events received and time to first byte, from a raw HTTP/1.1 exchange (over TLS if given)."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode()
                 + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = await reader.readuntil(b"\r\n\r\n")
    ttfb = time.perf_counter() - start
    events = 0
    tail = b""
    async for chunk in body_pieces(reader, b"transfer-encoding: chunked" in head.lower()):
        data = tail + chunk
        events += data.count(b"data: ")
        tail = data[-5:]
        events -= tail.count(b"data: ")
    writer.close()
    ok = tail.endswith(b"\n\n") or b"[DONE]" in tail
    return events, ttfb, ok


async def body_pieces(reader: asyncio.StreamReader, chunked: bool):
    """The body as it arrives, chunked framing taken off: a relay such as NGINX cuts chunks
    wherever its reads end, sometimes inside ``data: ``."""
    if not chunked:
        while piece := await reader.read(65536):
            yield piece
        return
    while size := int((await reader.readline()).split(b";")[0], 16):
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def streams(port: int, key: str, concurrency: int, rounds: int) -> dict:
    body = json.dumps(STREAM).encode()
    start = time.perf_counter()
    results = []
    for _ in range(rounds):
        results += await asyncio.gather(*(one_stream(port, key, body)
                                          for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    events = sum(r[0] for r in results)
    ttfbs = sorted(r[1] for r in results)
    expected = (STREAM["max_tokens"] + 1) * len(results)
    return {"events_per_s": events / elapsed, "ttfb_p50_ms": ttfbs[len(ttfbs) // 2] * 1000,
            "stream_errors": expected - events, "events": events}


def measure(name: str, port: int, pid: int | None, key: str, args, workdir: Path,
            streams_too: bool = True) -> dict:
    url = f"http://127.0.0.1:{port}"
    wrk(url, key, 8, 2, workdir)  # warm-up
    cpu0 = cpu_seconds([pid]) if pid else 0.0
    c1 = wrk(url, key, 1, args.duration, workdir)
    c64 = wrk(url, key, 64, args.duration, workdir)
    cpu = (cpu_seconds([pid]) - cpu0) if pid else 0.0
    cpu1 = cpu_seconds([pid]) if pid else 0.0
    if not streams_too:
        sse = {"events_per_s": 0.0, "ttfb_p50_ms": 0.0, "stream_errors": 0, "events": 0}
    else:
        sse = asyncio.run(streams(port, key, 64, args.stream_rounds))
    # CPU per relayed event: unlike events/s, it does not move with what else the machine runs.
    events = sse.pop("events")
    sse["sse_cpu_us_per_event"] = 1e6 * (cpu_seconds([pid]) - cpu1) / events \
        if pid and events else 0.0
    row = {"contender": name, "c1_p50_ms": c1["p50_ms"], "c1_p99_ms": c1["p99_ms"],
           "c64_rps": c64["rps"], "c64_p50_ms": c64["p50_ms"], "c64_p99_ms": c64["p99_ms"],
           "errors": c1["errors"] + c64["errors"] + sse["stream_errors"],
           "cpu_s_per_1k": 1000 * cpu / max(1, c1["requests"] + c64["requests"]) if pid else 0,
           **sse, "rss_mb": peak_rss_mb([pid]) if pid else 0.0}
    return row


def bench_key(workdir: Path, engine_url: str) -> tuple[str, dict[str, str]]:
    """A key whose limits never bind, and the gateway's environment for a benchmark run: the
    shipped log level, so the access log's line per request is in the figures (its stdout goes
    to /dev/null: the gateway's CPU for a line counts, a disk's speed does not)."""
    db = workdir / "keys.db"
    key = subprocess.run([str(VENV_BIN / "appliance-keys"), "--db", str(db), "create", "--name",
                          "bench", "--rpm", "100000000", "--tpm", "1000000000"],
                         capture_output=True, text=True, check=True).stdout.strip()
    env = {"APPLIANCE_ENGINE_URL": engine_url, "APPLIANCE_KEYS_DB": str(db),
           "APPLIANCE_LOG_LEVEL": "info", "APPLIANCE_MAX_INFLIGHT": "1024"}
    return key, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--stream-rounds", type=int, default=3)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--baseline", metavar="REF",
                        help="also measure the gateway as committed at this git ref")
    parser.add_argument("--turns", type=int, default=0,
                        help="with --baseline: alternating turns of proxy and proxy@REF")
    parser.add_argument("--serve-floor", nargs=2, metavar=("PORT", "UPSTREAM"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="floor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(int(args.serve_floor[0]), args.serve_floor[1], args.kind)
        return
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    engine_port, asgi_port, floor_port, bare_port, proxy_port = (free_port() for _ in range(5))
    engine_url = f"http://127.0.0.1:{engine_port}"
    key, env = bench_key(workdir, engine_url)
    rows = []
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(running(fake_engine(engine_port),
                                             ready_url=engine_url + "/health"))
        asgi, floor, bare = (stack.enter_context(running(
            [sys.executable, __file__, "--serve-floor", str(port), engine_url, "--kind", kind],
            ready_url=f"http://127.0.0.1:{port}/health")) for kind, port in
            (("asgi", asgi_port), ("floor", floor_port), ("bare", bare_port)))
        proxy = stack.enter_context(running(
            [str(VENV_BIN / "appliance-proxy"), "--port", str(proxy_port)], env=env,
            ready_url=f"http://127.0.0.1:{proxy_port}/ready"))
        rows.append(measure("direct", engine_port, engine.pid, key, args, workdir))
        rows.append(measure("asgi", asgi_port, asgi.pid, key, args, workdir, streams_too=False))
        rows.append(measure("floor", floor_port, floor.pid, key, args, workdir))
        rows.append(measure("bare", bare_port, bare.pid, key, args, workdir))
        rows.append(measure("proxy", proxy_port, proxy.pid, key, args, workdir))
        if args.baseline:
            source = checkout(args.baseline, workdir)
            base_port = free_port()
            base = stack.enter_context(running(
                [sys.executable, "-m", "proxy.main", "--port", str(base_port)], env=env,
                cwd=source, ready_url=f"http://127.0.0.1:{base_port}/ready"))
            rows.append(measure(f"proxy@{args.baseline}", base_port, base.pid, key, args,
                                workdir))
            contenders = {"proxy": (proxy_port, proxy.pid),
                          f"proxy@{args.baseline}": (base_port, base.pid)}
            turns = alternate(contenders, key, args, workdir)
    direct = rows[0]
    for row in rows:
        row["added_c1_p50_ms"] = row["c1_p50_ms"] - direct["c1_p50_ms"]
        row["added_c1_p99_ms"] = row["c1_p99_ms"] - direct["c1_p99_ms"]
    print_table(rows)
    floor_row, proxy_row = rows[2], rows[4]
    print(f"\nproxy/floor requests/s at c=64: {proxy_row['c64_rps'] / floor_row['c64_rps']:.2f}x"
          f"   proxy SSE events/s: {proxy_row['events_per_s']:.0f}")
    if args.csv:
        write_csv(args.csv, rows)
    if args.baseline and args.turns:
        print_turns(turns)


def alternate(contenders: dict[str, tuple[int, int]], key: str, args,
              workdir: Path) -> dict[str, list[tuple[float, float, float]]]:
    """``args.turns`` turns of each contender in alternation, the order flipped every turn:
    (CPU µs per request at c=64, CPU µs per SSE event, SSE events/s) per turn."""
    turns: dict[str, list[tuple[float, float, float]]] = {name: [] for name in contenders}
    names = list(contenders)
    for turn in range(args.turns):
        for name in names if turn % 2 == 0 else names[::-1]:
            port, pid = contenders[name]
            before = cpu_seconds([pid])
            load = wrk(f"http://127.0.0.1:{port}", key, 64, args.duration, workdir)
            middle = cpu_seconds([pid])
            sse = asyncio.run(streams(port, key, 64, args.stream_rounds))
            after = cpu_seconds([pid])
            turns[name].append((1e6 * (middle - before) / max(1, load["requests"]),
                                1e6 * (after - middle) / max(1, sse["events"]),
                                sse["events_per_s"]))
    return turns


def print_turns(turns: dict[str, list[tuple[float, float, float]]]) -> None:
    print(f"\n{len(next(iter(turns.values())))} alternating turns, median (each turn):")
    for name, values in turns.items():
        columns = list(zip(*values, strict=True))
        print(f"{name:>22}  CPU/request at c=64 {statistics.median(columns[0]):6.1f} us"
              f" ({' '.join(f'{v:.0f}' for v in columns[0])})"
              f"   CPU/SSE event {statistics.median(columns[1]):5.2f} us"
              f"   SSE events/s {statistics.median(columns[2]):7.0f}"
              f" ({' '.join(f'{v:.0f}' for v in columns[2])})")


def checkout(ref: str, workdir: Path) -> Path:
    """The repository's tree at ``ref``, unpacked beside the run: its own ``proxy`` package."""
    target = workdir / "baseline"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-100) of ``values``; NaN when there are none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def write_csv(path: Path, rows: list[dict]) -> None:
    """Figures as CSV, floats to three decimals; shared by every benchmark script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 3) if isinstance(v, float) else v
                             for k, v in row.items()})


def print_table(rows: list[dict]) -> None:
    columns = ["contender", "added_c1_p50_ms", "added_c1_p99_ms", "c64_rps", "c64_p50_ms",
               "c64_p99_ms", "events_per_s", "ttfb_p50_ms", "cpu_s_per_1k",
               "sse_cpu_us_per_event", "rss_mb", "errors"]
    print(" ".join(f"{c:>15}" for c in columns))
    for row in rows:
        cells = [f"{row[c]:>15.2f}" if isinstance(row[c], float) else f"{row[c]:>15}"
                 for c in columns]
        print(" ".join(cells))


if __name__ == "__main__":
    main()
