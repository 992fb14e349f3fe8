#!/usr/bin/env python3
"""Benchmark real vLLM (CPU build, tiny model) straight and through the gateway, in one run.

The same concurrent streaming load (``--clients`` streams of ``--tokens`` tokens each, with
``ignore_eos``) goes straight at vLLM and through ``appliance-proxy``, in alternating rounds so
that drift on a shared machine hits both alike. Prints output tokens/s, time to first token
and inter-token latency (p50/p99) side by side with their ratio, and vLLM's start-up time and
peak resident memory. Target: the proxy costs under 2% of throughput and under 2 ms TTFT p50.

    .venv/bin/python bench/bench_engine.py [--clients 32] [--tokens 64] [--rounds 5]
"""

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.bench_proxy import percentile  # noqa: E402
from bench.procstats import descendants, rss_kib  # noqa: E402
from tests.e2e.engine_stack import SERVED_NAME, engine, make_tiny_model  # noqa: E402
from tests.integration.proxy_stack import gateway  # noqa: E402


async def one_stream(
    client: httpx.AsyncClient, url: str, key: str, tokens: int, prompt: str
) -> tuple[int, float, list[float]]:
    """(tokens received, TTFT seconds, inter-token gaps) for one streamed completion."""
    body = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    started = time.perf_counter()
    stamps: list[float] = []
    async with client.stream(
        "POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("choices"):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("stream carried no tokens")
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return len(stamps), stamps[0] - started, gaps


async def load(url: str, key: str, clients: int, tokens: int, round_no: int) -> dict:
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                one_stream(client, url, key, tokens, f"Story {round_no}-{i}:")
                for i in range(clients)
            )
        )
        elapsed = time.perf_counter() - started
    return {
        "tokens": sum(r[0] for r in results),
        "seconds": elapsed,
        "ttft": [r[1] for r in results],
        "itl": [gap for r in results for gap in r[2]],
    }


def summarize(rounds: list[dict]) -> dict:
    ttft = [t for r in rounds for t in r["ttft"]]
    itl = [t for r in rounds for t in r["itl"]]
    return {
        "tokens_per_s": sum(r["tokens"] for r in rounds) / sum(r["seconds"] for r in rounds),
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "itl_p50_ms": percentile(itl, 50) * 1e3,
        "itl_p99_ms": percentile(itl, 99) * 1e3,
        "round_tokens_per_s": [r["tokens"] / r["seconds"] for r in rounds],
    }


def core_split(split: bool, ranks: int = 1) -> tuple[list[int], list[int]]:
    """(vLLM's CPUs, the gateway's and the load's): the first half and the rest when ``split``,
    as on a GPU host where vLLM's CPU work does not starve the gateway; else all CPUs for both."""
    all_cpus = sorted(os.sched_getaffinity(0))
    if not split or len(all_cpus) < 2:
        return all_cpus, all_cpus
    half = max(ranks, len(all_cpus) // 2)
    return all_cpus[:half], all_cpus[half:]


class RssSampler:
    """Peak of the summed resident memory of a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kib = max(self.peak_kib, sum(rss_kib(p) for p in descendants(self.pid)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per target")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--split-cores", action="store_true",
                        help="vLLM on the first half of the CPUs, the proxy and the load on the "
                        "rest, as on a GPU host where vLLM's CPU work does not starve the proxy")
    args = parser.parse_args()
    engine_cpus, other_cpus = core_split(args.split_cores, args.tensor_parallel_size)

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model")
        started = time.perf_counter()
        os.sched_setaffinity(0, engine_cpus)  # vLLM inherits it and binds its threads there
        with engine(
            model,
            work / "engine",
            tensor_parallel_size=args.tensor_parallel_size,
            max_num_seqs=max(args.clients, 32),
        ) as vllm:
            startup_s = time.perf_counter() - started
            os.sched_setaffinity(0, other_cpus)  # the proxy and this load generator
            startup_rss = sum(rss_kib(p) for p in descendants(vllm.proc.pid))
            with (
                RssSampler(vllm.proc.pid) as rss,
                gateway(vllm.url, work, engine_api_key=vllm.key, max_inflight=1024) as gw,
            ):
                targets = {"direct": (vllm.url, vllm.key), "proxy": (gw.url, gw.key("bench"))}
                for url, key in targets.values():  # warm-up, not measured
                    asyncio.run(load(url, key, args.clients, args.tokens, -1))
                rounds: dict[str, list[dict]] = {name: [] for name in targets}
                for i in range(args.rounds):
                    order = list(targets) if i % 2 == 0 else list(reversed(targets))
                    for name in order:
                        url, key = targets[name]
                        rounds[name].append(
                            asyncio.run(load(url, key, args.clients, args.tokens, i))
                        )
        report(
            args,
            {name: summarize(r) for name, r in rounds.items()},
            startup_s,
            max(rss.peak_kib, startup_rss),
        )


def report(args, results: dict[str, dict], startup_s: float, peak_kib: int) -> None:
    direct, proxy = results["direct"], results["proxy"]
    print(
        f"\nvLLM CPU, tiny model, TP {args.tensor_parallel_size}: {args.clients} concurrent "
        f"streams x {args.tokens} tokens, {args.rounds} rounds per target (alternating)"
        + (", vLLM and proxy+load on separate cores" if args.split_cores else "")
    )
    print(f"{'':16}{'direct':>12}{'proxy':>12}{'proxy/direct':>14}")
    for label, key in (
        ("tokens/s", "tokens_per_s"),
        ("TTFT p50 ms", "ttft_p50_ms"),
        ("TTFT p99 ms", "ttft_p99_ms"),
        ("ITL p50 ms", "itl_p50_ms"),
        ("ITL p99 ms", "itl_p99_ms"),
    ):
        print(f"{label:16}{direct[key]:>12.1f}{proxy[key]:>12.1f}{proxy[key] / direct[key]:>14.3f}")
    for name, result in results.items():
        per_round = ", ".join(f"{v:.0f}" for v in result["round_tokens_per_s"])
        print(f"{name} tokens/s per round: {per_round}")
    cost = 1 - proxy["tokens_per_s"] / direct["tokens_per_s"]
    ttft = proxy["ttft_p50_ms"] - direct["ttft_p50_ms"]
    print(
        f"proxy cost: {cost:.1%} of throughput (target < 2%), {ttft:+.1f} ms TTFT p50 "
        f"(target < 2 ms)"
    )
    print(
        f"vLLM start-up (appliance-engine to /health 200): {startup_s:.1f} s; "
        f"peak RSS of vLLM's processes: {peak_kib / 2**20:.2f} GiB"
    )


if __name__ == "__main__":
    main()
