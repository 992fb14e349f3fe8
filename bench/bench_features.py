#!/usr/bin/env python3
"""What each of the gateway's features costs per small request, by taking it out.

One gateway process per variant, each in front of the same fast fake engine, under the same
wrk load (small chats, 64 connections); the figure is the gateway process's CPU time divided by
the requests it answered (from /proc, so it does not move with what else the machine runs as
much as requests/s do). Variants, run in turns so that drift spreads over all of them:

  full          appliance-proxy as shipped (auth, rate limits, fair admission, usage, metrics,
                the access log at the shipped level)
  no-metrics    every Prometheus collector a no-op
  no-watch      no per-request watch for the client hanging up
  no-admission  no fair queue: requests go straight to the engine
  no-usage      the engine's answer not parsed for its token counts
  no-limits     rate limits always allow, with no headers
  no-log        no access-log line
  none          all six out
  bare          uvicorn and the gateway's transport, nothing else (``bench_proxy.bare_app``)

A feature is taken out by patching the running gateway, so the figures are for reading, never
for shipping: they say where the time goes when the 0.10 ms target is missed.

    .venv/bin/python bench/bench_features.py [--seconds 6] [--rounds 2] [--csv FILE]
"""

import argparse
import contextlib
import csv
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_proxy import bench_key, wrk  # noqa: E402
from bench.procstats import cpu_seconds  # noqa: E402
from tests.servers import fake_engine, free_port, running  # noqa: E402

FEATURES = ("metrics", "watch", "admission", "usage", "limits", "log")
VARIANTS = {"full": (), **{f"no-{f}": (f,) for f in FEATURES}, "none": FEATURES, "bare": None}


def take_out(features: tuple[str, ...]) -> None:
    """Patch the gateway's modules before it starts: each named feature becomes a no-op."""
    from proxy import gateway
    from proxy.observe import accesslog
    from proxy.observe import metrics as metrics_module
    from proxy.tenancy import limits

    class Nothing:
        def __getattr__(self, name: str) -> "Nothing":
            return self

        def __call__(self, *args: object, **kwargs: object) -> "Nothing":
            return self

    if "metrics" in features:
        real_init = metrics_module.Metrics.__init__

        def init(self) -> None:
            real_init(self)
            for name in list(vars(self)):
                if name != "registry":
                    setattr(self, name, Nothing())

        metrics_module.Metrics.__init__ = init
    if "watch" in features:
        gateway.CancelledOnDisconnect = lambda receive, after_s=0.0, total_s=None: \
            contextlib.nullcontext()
    if "admission" in features:
        gateway.Gateway.engine_slot = lambda self, ex: gateway.Unqueued(ex.record)
    if "usage" in features:
        gateway.from_json_body = lambda content: None
    if "limits" in features:
        async def admit(self, name, rpm, tpm, now):
            return limits.Decision(True, [])

        limits.RateLimiter.admit = admit
    if "log" in features:
        accesslog.write = lambda record, duration_s: None


def serve(variant: str, port: int) -> None:
    take_out(VARIANTS[variant])
    from proxy.main import main

    main(["--port", str(port)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--serve", nargs=2, metavar=("VARIANT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-features-"))
    engine_port = free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    key, env = bench_key(workdir, engine_url)
    env["APPLIANCE_PROXY_WORKERS"] = "1"
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with running(fake_engine(engine_port), ready_url=engine_url + "/health"):
        for _ in range(args.rounds):
            for name in VARIANTS:
                port = free_port()
                if name == "bare":
                    argv = [sys.executable, str(ROOT / "bench" / "bench_proxy.py"),
                            "--serve-floor", str(port), engine_url, "--kind", "bare"]
                    ready = f"http://127.0.0.1:{port}/health"
                else:
                    argv = [sys.executable, __file__, "--serve", name, str(port)]
                    ready = f"http://127.0.0.1:{port}/ready"
                with running(argv, env=env, ready_url=ready) as proc:
                    url = f"http://127.0.0.1:{port}"
                    wrk(url, key, 8, 2, workdir)  # warm-up
                    before = cpu_seconds([proc.pid])
                    load = wrk(url, key, 64, args.seconds, workdir)
                    used = cpu_seconds([proc.pid]) - before
                    if load["errors"]:
                        sys.exit(f"{name}: {load['errors']} errors under load")
                    samples[name].append(1e6 * used / max(1, load["requests"]))
    full = statistics.median(samples["full"])
    rows = [{"variant": name, "cpu_us_per_request": round(statistics.median(values), 1),
             "saved_us": round(full - statistics.median(values), 1)}
            for name, values in samples.items()]
    print(f"{'variant':14s} {'CPU/request':>12s} {'saved':>8s}   (median of {args.rounds})")
    for row in rows:
        print(f"{row['variant']:14s} {row['cpu_us_per_request']:9.1f} us "
              f"{row['saved_us']:6.1f} us")
    if args.csv:
        with args.csv.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
