#!/usr/bin/env python3
"""How the gateway scales with APPLIANCE_PROXY_WORKERS, behind the real NGINX, on the fake engine.

For each worker count: appliance-proxy with that many workers, the production NGINX site
rendered with ``--gateway-workers`` to match (TLS 1.3, workers = CPUs; only the per-address
limits raised, as one load generator stands for many clients), and load spread over many keys,
as NGINX routes each key to one worker: wrk's small non-streaming chat at 64 connections, each
request under the next of ``--keys`` keys, then rounds of 64 concurrent streams of 256 fast
tokens. Reports requests/s, SSE events/s and the gateway's CPU per request (all its processes);
``direct`` is the fake engine itself, for scale. A machine with fewer cores than workers (plus
NGINX, the engine and the load generator) shows contention, not scaling: say so with the figures.

    .venv/bin/python bench/bench_workers.py [--workers 1 2 4] [--duration 10] [--out results]
"""

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_proxy import CHAT, STREAM, one_stream, write_csv  # noqa: E402
from bench.procstats import cpu_seconds  # noqa: E402
from tests.integration.nginx_stack import render, serving  # noqa: E402
from tests.servers import VENV_BIN, fake_engine, free_port, free_ports, running, wait_http  # noqa: E402

STREAMS = 64
CONNECTIONS = 64
WRK_SCRIPT = """
keys = {%s}
body = '%s'
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. keys[counter %% #keys + 1]}, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%f %%f\\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.timeout,
    latency:percentile(50), summary.requests / (summary.duration / 1e6)))
end
"""


def wrk(url: str, keys: list[str], seconds: int, workdir: Path) -> dict:
    script = workdir / "keys.lua"
    script.write_text(WRK_SCRIPT % (", ".join(f'"{k}"' for k in keys), json.dumps(CHAT)))
    out = subprocess.run(["wrk", "-t", "2", "-c", str(CONNECTIONS), "-d", f"{seconds}s",
                          "--timeout", "10s", "-s", str(script), url + "/v1/chat/completions"],
                         capture_output=True, text=True, check=True).stdout
    requests, errors, p50, rps = re.search(r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+)", out).groups()
    return {"requests": int(requests), "errors": int(errors), "p50_ms": float(p50) / 1000,
            "rps": float(rps)}


async def streams(port: int, keys: list[str], tls: ssl.SSLContext | None,
                  seconds: float) -> dict:
    body = json.dumps(STREAM).encode()
    results: list = []
    start = time.perf_counter()
    while not results or time.perf_counter() - start < seconds:
        results += await asyncio.gather(*(one_stream(port, keys[i % len(keys)], body, tls)
                                          for i in range(STREAMS)), return_exceptions=True)
    elapsed = time.perf_counter() - start
    ok = [r for r in results if isinstance(r, tuple) and r[2]]
    return {"events_per_s": sum(r[0] for r in ok) / elapsed,
            "stream_errors": len(results) - len(ok)}


def make_keys(db: Path, count: int) -> list[str]:
    return [subprocess.run([str(VENV_BIN / "appliance-keys"), "--db", str(db), "create",
                            "--name", f"bench{i}"], capture_output=True, text=True,
                           check=True).stdout.strip() for i in range(count)]


@contextlib.contextmanager
def gateway(engine_url: str, db: Path, workers: int, workdir: Path) -> Iterator[tuple]:
    """``workers`` gateway workers behind a freshly rendered NGINX: (site, gateway pid)."""
    first = free_ports(workers)
    env = {"APPLIANCE_ENGINE_URL": engine_url, "APPLIANCE_KEYS_DB": str(db),
           "APPLIANCE_LOG_LEVEL": "warning", "APPLIANCE_PROXY_WORKERS": str(workers),
           "APPLIANCE_MAX_INFLIGHT": "4096"}
    site = render(workdir / f"edge-{workers}", f"127.0.0.1:{first}", gateway_workers=workers,
                  workers="auto", rate_per_s=1000000, burst=1000000, conn_per_ip=10000)
    with running([str(VENV_BIN / "appliance-proxy"), "--port", str(first)], env=env,
                 log=workdir / f"proxy-{workers}.log") as proxy:
        for port in range(first, first + workers):
            wait_http(f"http://127.0.0.1:{port}/ready", proc=proxy)
        with serving(site):
            yield site, proxy.pid


def measure(name: str, url: str, port: int, keys: list[str], tls, pids: list[int],
            seconds: int, workdir: Path) -> dict:
    wrk(url, keys, 2, workdir)  # warm-up: TLS sessions, keep-alive pools
    cpu0 = cpu_seconds(pids)
    plain = wrk(url, keys, seconds, workdir)
    cpu_ms = 1000 * (cpu_seconds(pids) - cpu0) / max(1, plain["requests"])
    sse = asyncio.run(streams(port, keys, tls, seconds))
    row = {"contender": name, "rps": plain["rps"], "p50_ms": plain["p50_ms"],
           "gateway_cpu_ms_per_request": cpu_ms, **sse,
           "errors": plain["errors"] + sse["stream_errors"]}
    print(f"  {name:12} {row['rps']:>8.0f} req/s  {row['events_per_s']:>8.0f} events/s  "
          f"{cpu_ms:.3f} ms CPU/request  errors {row['errors']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--keys", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        workdir = Path(tmp)
        db = workdir / "keys.db"
        keys = make_keys(db, args.keys)
        port = free_port()
        engine_url = f"http://127.0.0.1:{port}"
        with running(fake_engine(port), ready_url=engine_url + "/health") as engine:
            rows.append(measure("direct", engine_url, port, keys, None, [engine.pid],
                                args.duration, workdir))
            for workers in args.workers:
                with gateway(engine_url, db, workers, workdir) as (site, pid):
                    rows.append(measure(f"{workers} worker{'s' if workers > 1 else ''}",
                                        site.https, site.https_port, keys, site.trust(), [pid],
                                        args.duration, workdir))
    print(f"\n{os.cpu_count()} CPUs; NGINX+TLS in front of every gateway row, not of direct")
    print(f"{'':12} {'req/s':>8} {'p50 ms':>8} {'events/s':>9} {'CPU ms/req':>10} {'errors':>6}")
    for r in rows:
        print(f"{r['contender']:12} {r['rps']:>8.0f} {r['p50_ms']:>8.2f} "
              f"{r['events_per_s']:>9.0f} {r['gateway_cpu_ms_per_request']:>10.3f} "
              f"{r['errors']:>6}")
    write_csv(args.out / "bench_workers.csv", rows)
    print(f"wrote {args.out}/bench_workers.csv")


if __name__ == "__main__":
    main()
