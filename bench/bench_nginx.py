#!/usr/bin/env python3
"""Benchmark what NGINX with TLS adds in front of the gateway, on the fast fake engine.

One run, same machine, same load, two contenders side by side:
  proxy        appliance-proxy over plain HTTP (the baseline)
  nginx+tls    the rendered appliance site (TLS 1.3, HTTP/1.1 keep-alive) in front of the
               same proxy process

Load comes from wrk over kept-alive connections (as real clients use): one connection for the
added latency, 64 for requests per second. NGINX runs as in production: workers = CPUs, the
production site, only the per-address limits raised so one load generator is not throttled.

    .venv/bin/python bench/bench_nginx.py [--duration 10] [--csv results/nginx.csv]
"""

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_proxy import write_csv, wrk  # noqa: E402
from tests.integration.nginx_stack import render, serving  # noqa: E402
from tests.servers import VENV_BIN, fake_engine, free_port, running  # noqa: E402

TARGET_ADDED_P50_MS = 0.5


def measure(name: str, url: str, key: str, seconds: int, workdir: Path) -> dict:
    wrk(url, key, 8, 2, workdir)  # warm-up: TLS sessions, keepalive pool, caches
    one = wrk(url, key, 1, seconds, workdir)
    many = wrk(url, key, 64, seconds, workdir)
    return {
        "contender": name,
        "c1_rps": one["rps"],
        "c1_p50_ms": one["p50_ms"],
        "c1_p90_ms": one["p90_ms"],
        "c1_p99_ms": one["p99_ms"],
        "c64_rps": many["rps"],
        "c64_p50_ms": many["p50_ms"],
        "c64_p99_ms": many["p99_ms"],
        "errors": one["errors"] + many["errors"],
    }


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    print("  ".join(f"{c:>11}" for c in columns))
    for row in rows:
        print(
            "  ".join(f"{v:>11.3f}" if isinstance(v, float) else f"{v!s:>11}" for v in row.values())
        )
    base, edge = rows
    added = edge["c1_p50_ms"] - base["c1_p50_ms"]
    verdict = "meets" if added < TARGET_ADDED_P50_MS else "MISSES"
    print(
        f"\nNGINX+TLS adds {added:.3f} ms at p50 on one kept-alive connection "
        f"({verdict} the {TARGET_ADDED_P50_MS} ms target); "
        f"{edge['c64_rps'] / base['c64_rps']:.0%} of the proxy's requests/s at 64 connections."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as temp:
        rows = run(Path(temp), args.duration)
    print_table(rows)
    if args.csv:
        write_csv(args.csv, rows)


def run(workdir: Path, seconds: int) -> list[dict]:
    engine_port, proxy_port = free_port(), free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    db = workdir / "keys.db"
    key = subprocess.run(
        [
            str(VENV_BIN / "appliance-keys"),
            "--db",
            str(db),
            "create",
            "--name",
            "bench",
            "--rpm",
            "100000000",
            "--tpm",
            "1000000000",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = {
        "APPLIANCE_ENGINE_URL": engine_url,
        "APPLIANCE_KEYS_DB": str(db),
        "APPLIANCE_LOG_LEVEL": "warning",
        "APPLIANCE_MAX_INFLIGHT": "1024",
        "APPLIANCE_PROXY_WORKERS": "1",
    }
    site = render(
        workdir / "edge",
        f"127.0.0.1:{proxy_port}",
        workers="auto",
        rate_per_s=1000000,
        burst=1000000,
        conn_per_ip=10000,
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(fake_engine(engine_port), ready_url=engine_url + "/health"))
        stack.enter_context(
            running(
                [str(VENV_BIN / "appliance-proxy"), "--port", str(proxy_port)],
                env=env,
                ready_url=f"http://127.0.0.1:{proxy_port}/ready",
            )
        )
        stack.enter_context(serving(site))
        return [
            measure("proxy", f"http://127.0.0.1:{proxy_port}", key, seconds, workdir),
            measure("nginx+tls", site.https, key, seconds, workdir),
        ]


if __name__ == "__main__":
    main()
