#!/usr/bin/env python3
"""Side-by-side benchmark: vLLM's API served direct, through this gateway, behind NGINX+TLS,
through the LiteLLM proxy and through vLLM's Rust router, all in front of the same fast fake
engine, one contender at a time.

  direct       tests/fake_engine.py itself (what any proxy adds is measured against it)
  proxy        appliance-proxy with auth, rate limits, usage and metrics on, as shipped
  nginx+tls    the rendered NGINX site (TLS 1.3) in front of a fresh appliance-proxy
  litellm      LiteLLM's proxy (bench/litellm-bench.yaml: a plain OpenAI pass-through with a
               master key, no database, one worker, logging off), from its own virtualenv
               (.venv-litellm, made here on first use)
  vllm-router  the vLLM project's router (Rust; PyPI ``vllm-router``) as a pass-through to one
               engine: round robin, retries and circuit breaker off, from .venv-vllm-router.
               It checks no keys and keeps no usage: the floor a compiled relay sets

Non-streaming small chat comes from wrk at 1, 16, 64 and 256 connections; streams (64 at once,
256 fast tokens each) from a raw asyncio client that only counts events. Per contender: requests/s,
latency p50/p90/p99 and what it adds over direct, SSE events/s, time to first byte, CPU seconds
per 1,000 requests (the contender's processes, not the engine's), peak RSS, errors. Writes
results/bench_compare.csv (one row per contender and concurrency), results/bench_streams.csv and
results/bench_compare.png, and prints the table with the ratios the project targets.

    .venv/bin/python bench/bench_compare.py [--duration 10] [--out results] [--skip litellm]
    .venv/bin/python bench/bench_compare.py --engine [--clients 32 --tokens 64 --rounds 5]

``--engine`` runs the real-engine comparison instead: vLLM (CPU build, tiny model) direct, through
the gateway, and through NGINX+TLS and the gateway, with bench/bench_engine.py's load and
figures (tokens/s, TTFT, inter-token latency); results/bench_engine.csv.
"""

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_proxy import STREAM, one_stream, percentile, write_csv, wrk  # noqa: E402
from bench.procstats import cpu_seconds, peak_rss_mb  # noqa: E402
from tests.integration.nginx_stack import render, serving  # noqa: E402
from tests.servers import VENV_BIN, fake_engine, free_port, running  # noqa: E402

LITELLM_VENV = ROOT / ".venv-litellm"
# Pinned, so reruns compare like with like. Releases from 1.104 on (tried up to 1.109) ask for
# a certifi newer than the package registry had when this was written.
LITELLM_REQUIREMENT = "litellm[proxy]==1.100.5"
LITELLM_CONFIG = ROOT / "bench" / "litellm-bench.yaml"
VLLM_ROUTER_VENV = ROOT / ".venv-vllm-router"
VLLM_ROUTER_REQUIREMENT = "vllm-router==0.1.17"
CONTENDERS = ("direct", "proxy", "nginx+tls", "litellm", "vllm-router")
CONCURRENCIES = (1, 16, 64, 256)
STREAMS = 64
# The targets, against LiteLLM on the same machine and load.
TARGET_RPS_RATIO, TARGET_EVENTS_RATIO, TARGET_ADDED_P50_FRACTION = 10.0, 15.0, 0.1
# Issue 13's, against the engine itself: the gateway's CPU per small request, its SSE relay.
TARGET_CPU_MS, TARGET_DIRECT_EVENTS = 0.10, 0.9
# wrk's own 2 s would drop LiteLLM's slow answers at c=256 from the latencies.
WRK_TIMEOUT_S = 60
STREAM_EVENTS = STREAM["max_tokens"] + 1  # the tokens and [DONE]


@dataclass
class Contender:
    name: str
    base_url: str
    key: str
    pids: list[int]
    """The contender's own processes (their children are counted too), never the engine's."""
    tls: ssl.SSLContext | None = None
    rows: list[dict] = field(default_factory=list)


def ensure_venv(venv: Path, requirement: str, command: str) -> Path:
    """``requirement`` in a virtualenv of its own, kept out of .venv; installed once, reused."""
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text().strip() == requirement:
        return venv / "bin" / command
    print(f"installing {requirement} into {venv.name} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, requirement], check=True)
    stamp.write_text(requirement + "\n")
    return venv / "bin" / command


def ensure_litellm() -> Path:
    return ensure_venv(LITELLM_VENV, LITELLM_REQUIREMENT, "litellm")


def ensure_vllm_router() -> Path:
    return ensure_venv(VLLM_ROUTER_VENV, VLLM_ROUTER_REQUIREMENT, "vllm-router")


def make_key(db: Path) -> str:
    """A gateway key whose limits the load never reaches: the benchmark measures the path."""
    return subprocess.run([str(VENV_BIN / "appliance-keys"), "--db", str(db), "create", "--name",
                           "bench", "--rpm", "1000000000", "--tpm", "1000000000"],
                          capture_output=True, text=True, check=True).stdout.strip()


def proxy_env(engine_url: str, db: Path) -> dict[str, str]:
    # Production settings but the log level: one access-log line per request would be measured
    # as disk writes of the benchmark's own making.
    return {"APPLIANCE_ENGINE_URL": engine_url, "APPLIANCE_KEYS_DB": str(db),
            "APPLIANCE_LOG_LEVEL": "warning", "APPLIANCE_PROXY_WORKERS": "1"}


@contextlib.contextmanager
def gateway_proc(engine_url: str, workdir: Path) -> Iterator[tuple[str, str, int]]:
    port = free_port()
    db = workdir / f"keys-{port}.db"
    key = make_key(db)
    url = f"http://127.0.0.1:{port}"
    with running([str(VENV_BIN / "appliance-proxy"), "--port", str(port)],
                 env=proxy_env(engine_url, db), ready_url=url + "/ready") as proc:
        yield url, key, proc.pid


@contextlib.contextmanager
def contender(name: str, engine_url: str, engine_pid: int,
              workdir: Path) -> Iterator[Contender]:
    if name == "direct":
        yield Contender(name, engine_url, "unused", [engine_pid])
    elif name == "proxy":
        with gateway_proc(engine_url, workdir) as (url, key, pid):
            yield Contender(name, url, key, [pid])
    elif name == "nginx+tls":
        with gateway_proc(engine_url, workdir) as (url, key, pid):
            # Production site; only the per-address limits are raised, as one load generator
            # on one address stands for many clients.
            site = render(workdir / "edge", url.removeprefix("http://"), workers="auto",
                          rate_per_s=1000000, burst=1000000, conn_per_ip=10000)
            with serving(site) as nginx:
                yield Contender(name, site.https, key, [nginx.pid, pid], tls=site.trust())
    elif name == "litellm":
        litellm = ensure_litellm()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        master = "sk-bench-" + os.urandom(12).hex()
        env = {"BENCH_ENGINE_BASE": engine_url + "/v1", "BENCH_ENGINE_KEY": "unused",
               "LITELLM_MASTER_KEY": master, "LITELLM_LOG": "ERROR",
               "LITELLM_MODE": "PRODUCTION", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        argv = [str(litellm), "--config", str(LITELLM_CONFIG), "--host", "127.0.0.1",
                "--port", str(port), "--num_workers", "1", "--telemetry", "False"]
        with running(argv, env=env, ready_url=url + "/health/liveliness", timeout=180,
                     log=workdir / "litellm.log") as proc:
            yield Contender(name, url, master, [proc.pid])
    elif name == "vllm-router":
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [str(ensure_vllm_router()), "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", engine_url, "--policy", "round_robin", "--disable-retries",
                "--disable-circuit-breaker", "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(free_port()), "--log-level", "warning"]
        with running(argv, ready_url=url + "/health", timeout=60,
                     log=workdir / "vllm-router.log") as proc:
            yield Contender(name, url, "unused", [proc.pid])
    else:
        raise ValueError(name)


async def stream_load(c: Contender, seconds: float) -> dict:
    """Rounds of STREAMS concurrent streams until ``seconds`` have passed (at least one)."""
    port = int(c.base_url.rsplit(":", 1)[1])
    body = json.dumps(STREAM).encode()
    results: list[tuple[int, float, bool]] = []
    start = time.perf_counter()
    while not results or time.perf_counter() - start < seconds:
        outcomes = await asyncio.gather(*(one_stream(port, c.key, body, c.tls)
                                          for _ in range(STREAMS)), return_exceptions=True)
        results += [o if isinstance(o, tuple) else (0, 0.0, False) for o in outcomes]
    elapsed = time.perf_counter() - start
    # Complete: every token and [DONE] at the end (LiteLLM adds a finish_reason event).
    complete = [r for r in results if r[2] and r[0] >= STREAM_EVENTS]
    ttfbs = sorted(r[1] for r in complete)
    return {
        "streams": len(results),
        "events_per_s": sum(r[0] for r in results) / elapsed,
        "ttfb_p50_ms": percentile(ttfbs, 50) * 1000,
        "ttfb_p99_ms": percentile(ttfbs, 99) * 1000,
        "stream_errors": len(results) - len(complete),
    }


def measure(c: Contender, seconds: int, concurrencies: list[int], workdir: Path) -> dict:
    wrk(c.base_url, c.key, 8, min(2, seconds), workdir, WRK_TIMEOUT_S)  # warm-up: pools, TLS
    cpu0, total = cpu_seconds(c.pids), 0
    for connections in concurrencies:
        result = wrk(c.base_url, c.key, connections, seconds, workdir, WRK_TIMEOUT_S)
        total += result["requests"]
        c.rows.append({"contender": c.name, "concurrency": connections, **result})
        print(f"  {c.name:10} c={connections:<4} {result['rps']:>9.0f} req/s  "
              f"p50 {result['p50_ms']:.2f} ms  errors {result['errors']}", flush=True)
    cpu_per_1k = 1000 * (cpu_seconds(c.pids) - cpu0) / max(1, total)
    streams = asyncio.run(stream_load(c, seconds))
    print(f"  {c.name:10} streams {streams['events_per_s']:>9.0f} events/s  "
          f"TTFB p50 {streams['ttfb_p50_ms']:.1f} ms  errors {streams['stream_errors']}",
          flush=True)
    return {"contender": c.name, "cpu_s_per_1k": cpu_per_1k, **streams,
            "peak_rss_mb": peak_rss_mb(c.pids),
            "errors": sum(r["errors"] for r in c.rows) + streams["stream_errors"]}


def add_overheads(rows: list[dict]) -> None:
    """Latency each contender adds over direct, at the same concurrency."""
    direct = {r["concurrency"]: r for r in rows if r["contender"] == "direct"}
    for row in rows:
        base = direct.get(row["concurrency"])
        for q in ("p50", "p90", "p99"):
            row[f"added_{q}_ms"] = row[f"{q}_ms"] - base[f"{q}_ms"] if base else float("nan")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}"




def plot(path: Path, rows: list[dict], summary: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["contender"] for s in summary]
    points = sorted({r["concurrency"] for r in rows})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for i, name in enumerate(names):
        mine = [r for r in rows if r["contender"] == name]
        conc, color = [r["concurrency"] for r in mine], f"C{i}"
        axes[0][0].plot(conc, [r["rps"] for r in mine], marker="o", color=color, label=name)
        axes[0][1].plot(conc, [r["p50_ms"] for r in mine], marker="o", color=color,
                        label=f"{name} p50")
        axes[0][1].plot(conc, [r["p99_ms"] for r in mine], marker="x", linestyle=":",
                        color=color, label=f"{name} p99")
    for ax, label in ((axes[0][0], "requests/s"), (axes[0][1], "latency ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(points, [str(c) for c in points])
        ax.set_xlabel("concurrent connections (non-streaming chat)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[1][0].bar(names, [s["events_per_s"] for s in summary], color="tab:green")
    axes[1][0].set_ylabel(f"SSE events/s ({STREAMS} streams x {STREAM['max_tokens']} tokens)")
    axes[1][1].bar(names, [s["cpu_s_per_1k"] for s in summary], color="tab:red")
    axes[1][1].set_ylabel("CPU s per 1,000 requests (contender only)")
    for ax in (axes[1][0], axes[1][1]):
        ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        for i, s in enumerate(summary):
            value = s["events_per_s"] if ax is axes[1][0] else s["cpu_s_per_1k"]
            text = f"{value:,.0f}" if ax is axes[1][0] else f"{value:.3g}"
            ax.annotate(text, (i, value), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def cost_verdicts(by: dict, named: dict) -> list[str]:
    """The gateway's own cost against issue 13's targets, and beside vLLM's router."""
    if "proxy" not in named:
        return []
    proxy, direct = named["proxy"], named["direct"]
    ms = proxy["cpu_s_per_1k"]  # CPU seconds per 1,000 requests is CPU ms per request
    ratio = proxy["events_per_s"] / direct["events_per_s"]
    lines = [
        f"proxy CPU per request: {ms:.3f} ms (target <= {TARGET_CPU_MS:g}): "
        + ("met" if ms <= TARGET_CPU_MS else "MISSED"),
        f"proxy/direct SSE events/s: {ratio:.2f}x (target >= {TARGET_DIRECT_EVENTS:g}x): "
        + ("met" if ratio >= TARGET_DIRECT_EVENTS else "MISSED"),
    ]
    for name in ("proxy", "vllm-router"):
        if name in named and {(name, 64), ("direct", 64)} <= by.keys():
            rps = by[(name, 64)]["rps"] / by[("direct", 64)]["rps"]
            events = named[name]["events_per_s"] / direct["events_per_s"]
            lines.append(f"{name}: {named[name]['cpu_s_per_1k']:.3f} ms CPU per request,"
                         f" {rps:.2f}x direct's requests/s at c=64, {events:.2f}x its SSE"
                         " events/s")
    return lines


def report(rows: list[dict], summary: list[dict]) -> list[str]:
    """The printed table, and the ratio lines against LiteLLM; returns the verdicts."""
    by = {(r["contender"], r["concurrency"]): r for r in rows}
    head = (f"{'contender':10} {'c':>4} {'req/s':>9} {'p50':>8} {'p90':>8} {'p99':>8} "
            f"{'+p50':>8} {'+p90':>8} {'+p99':>8} {'errors':>6}   (ms)")
    print("\n" + head)
    for r in rows:
        print(f"{r['contender']:10} {r['concurrency']:>4} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} "
              f"{r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['added_p50_ms']:>8.2f} "
              f"{r['added_p90_ms']:>8.2f} {r['added_p99_ms']:>8.2f} {r['errors']:>6}")
    print(f"\n{'contender':10} {'events/s':>9} {'TTFB p50':>9} {'TTFB p99':>9} "
          f"{'CPU s/1k':>9} {'peak RSS MB':>11} {'errors':>6}")
    for s in summary:
        print(f"{s['contender']:10} {s['events_per_s']:>9.0f} {s['ttfb_p50_ms']:>9.1f} "
              f"{s['ttfb_p99_ms']:>9.1f} {s['cpu_s_per_1k']:>9.3f} {s['peak_rss_mb']:>11.0f} "
              f"{s['errors']:>6}")
    named = {s["contender"]: s for s in summary}
    verdicts = cost_verdicts(by, named)
    if "proxy" not in named or "litellm" not in named:
        print("\n" + "\n".join(verdicts))
        return verdicts
    if not {("proxy", 1), ("proxy", 64)} <= by.keys():
        return verdicts
    rps = by[("proxy", 64)]["rps"] / by[("litellm", 64)]["rps"]
    events = named["proxy"]["events_per_s"] / named["litellm"]["events_per_s"]
    added = by[("proxy", 1)]["added_p50_ms"] / by[("litellm", 1)]["added_p50_ms"]
    verdicts += [
        f"proxy/litellm requests/s at c=64: {rps:.1f}x (target >= {TARGET_RPS_RATIO:g}x): "
        + ("met" if rps >= TARGET_RPS_RATIO else "MISSED"),
        f"proxy/litellm SSE events/s: {events:.1f}x (target >= {TARGET_EVENTS_RATIO:g}x): "
        + ("met" if events >= TARGET_EVENTS_RATIO else "MISSED"),
        f"proxy/litellm added p50 at c=1: {added:.3f} ({by[('proxy', 1)]['added_p50_ms']:.2f} "
        f"vs {by[('litellm', 1)]['added_p50_ms']:.2f} ms; target <= "
        f"{TARGET_ADDED_P50_FRACTION:g}): "
        + ("met" if added <= TARGET_ADDED_P50_FRACTION else "MISSED"),
    ]
    print("\n" + "\n".join(verdicts))
    return verdicts


def run_fake(args) -> None:
    names = [n for n in CONTENDERS if n not in args.skip]
    # Installs come before any timing, so that none overlaps a measurement.
    if "litellm" in names:
        ensure_litellm()
    if "vllm-router" in names:
        ensure_vllm_router()
    rows, summary = [], []
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        engine_url = f"http://127.0.0.1:{port}"
        with running(fake_engine(port), ready_url=engine_url + "/health") as engine:
            for name in names:
                print(f"{name}:", flush=True)
                with contender(name, engine_url, engine.pid, workdir) as c:
                    summary.append(measure(c, args.duration, args.concurrency, workdir))
                    rows += c.rows
    add_overheads(rows)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = (f"fast fake engine, {args.duration}s per point; {machine()}; {stamp}")
    print(f"\n{title}")
    report(rows, summary)
    write_csv(args.out / "bench_compare.csv", rows)
    write_csv(args.out / "bench_streams.csv", summary)
    if not args.no_plot:
        plot(args.out / "bench_compare.png", rows, summary, title)
    print(f"\nwrote {args.out}/bench_compare.csv, bench_streams.csv"
          + ("" if args.no_plot else ", bench_compare.png"))


def run_engine(args) -> None:
    """vLLM direct, through the gateway, and through NGINX+TLS and the gateway."""
    from bench.bench_engine import load, summarize
    from tests.e2e.engine_stack import engine, make_tiny_model
    from tests.integration.proxy_stack import gateway

    with tempfile.TemporaryDirectory(prefix="bench-compare-engine-") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model")
        with engine(model, work / "engine", max_num_seqs=max(args.clients, 32)) as vllm, \
                gateway(vllm.url, work, engine_api_key=vllm.key) as gw:
            site = render(work / "edge", gw.url.removeprefix("http://"), workers="auto",
                          rate_per_s=1000000, burst=1000000, conn_per_ip=10000)
            # bench_engine's httpx client trusts what SSL_CERT_FILE names: the site's own cert.
            os.environ["SSL_CERT_FILE"] = str(site.cert)
            with serving(site):
                targets = {"direct": (vllm.url, vllm.key), "proxy": (gw.url, gw.key("bench")),
                           "nginx+proxy": (site.https, gw.key("bench"))}
                for url, key in targets.values():  # warm-up, not measured
                    asyncio.run(load(url, key, args.clients, args.tokens, -1))
                rounds: dict[str, list[dict]] = {name: [] for name in targets}
                for i in range(args.rounds):  # rotating, so drift hits all alike
                    order = list(targets)[i % 3:] + list(targets)[:i % 3]
                    for name in order:
                        url, key = targets[name]
                        rounds[name].append(asyncio.run(load(url, key, args.clients,
                                                             args.tokens, i)))
    results = {name: summarize(r) for name, r in rounds.items()}
    direct, proxy, edge = results["direct"], results["proxy"], results["nginx+proxy"]
    print(f"\nvLLM CPU, tiny model: {args.clients} concurrent streams x {args.tokens} tokens, "
          f"{args.rounds} rounds per target; {machine()}")
    print(f"{'':14}{'direct':>10}{'proxy':>10}{'nginx+proxy':>13}{'proxy/direct':>14}"
          f"{'nginx+proxy/direct':>20}")
    rows = []
    for label, key in (("tokens/s", "tokens_per_s"), ("TTFT p50 ms", "ttft_p50_ms"),
                       ("TTFT p99 ms", "ttft_p99_ms"), ("ITL p50 ms", "itl_p50_ms"),
                       ("ITL p99 ms", "itl_p99_ms")):
        ratios = [x[key] / direct[key] if direct[key] else float("nan") for x in (proxy, edge)]
        print(f"{label:14}{direct[key]:>10.1f}{proxy[key]:>10.1f}{edge[key]:>13.1f}"
              f"{ratios[0]:>14.3f}{ratios[1]:>20.3f}")
        rows.append({"figure": key, "direct": direct[key], "proxy": proxy[key],
                     "nginx+proxy": edge[key], "proxy/direct": ratios[0],
                     "nginx+proxy/direct": ratios[1]})
    for name, result in results.items():
        print(f"{name} tokens/s per round: "
              + ", ".join(f"{v:.0f}" for v in result["round_tokens_per_s"]))
    write_csv(args.out / "bench_engine.csv", rows)
    print(f"wrote {args.out}/bench_engine.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per load point")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES),
                        help="wrk connection counts (the ratios need 1 and 64)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=list(CONTENDERS))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--engine", action="store_true", help="real vLLM instead of the fake")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.engine:
        run_engine(args)
    else:
        if "direct" in args.skip:
            parser.error("direct is the baseline every other figure is measured against")
        run_fake(args)


if __name__ == "__main__":
    main()
