#!/usr/bin/env python3
"""Noisy neighbour: a quiet key's time to first token while another key floods the engine, on
real vLLM (CPU build, tiny model) straight and through the gateway, in one run.

A noisy key keeps ``--flood`` streams of ``--flood-tokens`` tokens in flight; a quiet key sends
short streamed requests (``--quiet-tokens``) one after another for ``--duration`` seconds, and
each one's time to first token is measured. The same load goes straight at vLLM (both clients
with the engine's internal key) and through ``appliance-proxy`` (two keys made with
``appliance-keys``); ``APPLIANCE_MAX_NUM_SEQS=--batch`` reaches the engine and the gateway, as
``make run`` gives it to both. The flood's throughput is vLLM's own count of the tokens it
streamed inside the measured window. Prints quiet TTFT p50/p90/max and answers, and flood
tokens/s, side by side with the ratios issue 9 targets (quiet TTFT p50 gateway/direct < 0.25,
flood tokens/s gateway/direct >= 0.8, every quiet request 200); writes
results/bench_fairness.csv.

    .venv/bin/python bench/bench_fairness.py [--duration 30] [--flood 48] [--batch 8]
    .venv/bin/python bench/bench_fairness.py --quick
    .venv/bin/python bench/bench_fairness.py --engine-concurrency 1000   # no fair admission
"""

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.bench_compare import machine  # noqa: E402
from bench.bench_engine import core_split  # noqa: E402
from bench.bench_proxy import percentile, write_csv  # noqa: E402
from tests.e2e.engine_stack import engine, make_tiny_model  # noqa: E402
from tests.e2e.noisy_neighbour import (  # noqa: E402
    Stream,
    client_for,
    completion,
    flood,
    timed_stream,
)
from tests.integration.proxy_stack import gateway  # noqa: E402

TARGET_TTFT_RATIO, TARGET_THROUGHPUT_RATIO = 0.25, 0.8
# A quiet request that failed waits this long before the next, so a refusal is not spun on.
QUIET_PAUSE_S = 0.1


def queue_waits(gateway_url: str) -> dict[str, tuple[float, float]]:
    """Per key, the gateway's own count and total of seconds waited for an engine slot."""
    totals: dict[str, list[float]] = {}
    for line in httpx.get(gateway_url + "/metrics", timeout=10).text.splitlines():
        for suffix, index in (("_count{", 0), ("_sum{", 1)):
            prefix = "appliance_queue_wait_seconds" + suffix
            if line.startswith(prefix) and 'key="' in line:
                key = line.split('key="', 1)[1].split('"', 1)[0]
                totals.setdefault(key, [0.0, 0.0])[index] = float(line.rsplit(" ", 1)[1])
    return {key: (count, total) for key, (count, total) in totals.items()}


def answer(stream: Stream) -> str:
    """How a request was answered: its status, or how it failed without one."""
    if stream.status is None:
        return "no answer"
    if stream.status == 200 and not stream.ok:
        return "200, broken stream"
    return str(stream.status)


def tokens_between(streams: list[Stream], start: float, end: float) -> int:
    """Tokens the streams received inside ``[start, end]``, by vLLM's running count."""
    total = 0
    for s in streams:
        previous = 0
        for stamp, count in zip(s.stamps, s.tokens, strict=True):
            if start <= stamp <= end:
                total += count - previous
            previous = count
    return total


async def noisy_neighbour(url: str, noisy_key: str, quiet_key: str, args) -> dict:
    """The flood, then (once it has filled the engine) the quiet key's requests, one by one."""
    floods: list[Stream] = []
    quiets: list[Stream] = []

    def flood_body(worker: int, n: int) -> dict:
        return completion(f"Noisy story {worker}-{n}:", args.flood_tokens)

    async with client_for(args.flood) as noisy, client_for(1) as quiet:
        flooding = asyncio.create_task(
            flood(noisy, url, noisy_key, args.flood, flood_body, floods)
        )
        try:
            await asyncio.sleep(args.warmup)
            start = time.perf_counter()
            end = start + args.duration
            while time.perf_counter() < end:
                record = Stream(sent=time.perf_counter())
                quiets.append(record)
                body = completion(f"Quiet question {len(quiets)}:", args.quiet_tokens)
                await timed_stream(quiet, url, quiet_key, body, record)
                if not record.ok:
                    await asyncio.sleep(QUIET_PAUSE_S)
            if flooding.done():
                flooding.result()
            ended = [f for f in floods if f.done or f.error or f.status not in (None, 200)]
            cut = len(floods) - len(ended)
        finally:
            flooding.cancel()
            await asyncio.gather(flooding, return_exceptions=True)
    errors = [s.error for s in [*quiets, *ended] if s.error]
    return {
        "ttft": [q.first - q.sent for q in quiets if q.ok],
        "errors": errors,
        "quiet_answers": Counter(answer(q) for q in quiets),
        "flood_tokens": tokens_between(floods, start, end),
        "seconds": end - start,
        "flood_answers": Counter(answer(f) for f in ended) + Counter({"cut at the end": cut}),
    }


def summarize(rounds: list[dict]) -> dict:
    ttft = [t for r in rounds for t in r["ttft"]]
    quiet_answers = sum((r["quiet_answers"] for r in rounds), Counter())
    return {
        "quiet_ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "quiet_ttft_p90_ms": percentile(ttft, 90) * 1e3,
        "quiet_ttft_max_ms": max(ttft, default=float("nan")) * 1e3,
        "quiet_requests": sum(quiet_answers.values()),
        "quiet_not_200": sum(n for a, n in quiet_answers.items() if a != "200"),
        "flood_tokens_per_s": sum(r["flood_tokens"] for r in rounds)
        / sum(r["seconds"] for r in rounds),
        "quiet_answers": quiet_answers,
        "flood_answers": sum((r["flood_answers"] for r in rounds), Counter()),
        "errors": Counter(e for r in rounds for e in r["errors"]),
        "queue_waits": rounds[-1].get("queue_waits", {}),
    }


def gateway_admission(args) -> dict[str, int]:
    """The gateway's admission settings: its defaults, unless ``--engine-concurrency`` is given
    (a number above the flood sends every request straight on: first come, first served, as
    before fair admission), with the memory guard raised above what one key may then hold."""
    if args.engine_concurrency is None:
        return {}
    return {"engine_concurrency": args.engine_concurrency,
            "max_inflight": 2 * (args.engine_concurrency + 1024)}


def run(args) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model")
        engine_cpus, other_cpus = core_split(args.split_cores)
        os.sched_setaffinity(0, engine_cpus)  # vLLM inherits it and binds its threads there
        with engine(model, work / "engine", max_num_seqs=args.batch) as vllm:
            os.sched_setaffinity(0, other_cpus)  # the gateway and this load generator
            with gateway(vllm.url, work, engine_api_key=vllm.key, max_num_seqs=args.batch,
                         **gateway_admission(args)) as gw:
                return measure(args, vllm, gw)


def measure(args, vllm, gw) -> dict[str, dict]:
    targets = {
        "direct": (vllm.url, vllm.key, vllm.key),
        "gateway": (gw.url, gw.key("noisy"), gw.key("quiet")),
    }
    rounds: dict[str, list[dict]] = {name: [] for name in targets}
    for i in range(args.rounds):  # alternating, so drift hits both alike
        for name in targets if i % 2 == 0 else reversed(targets):
            print(f"round {i + 1}: {name}", flush=True)
            rounds[name].append(asyncio.run(noisy_neighbour(*targets[name], args)))
            if name == "gateway":
                rounds[name][-1]["queue_waits"] = queue_waits(gw.url)
            vllm.wait_idle()
    return {name: summarize(r) for name, r in rounds.items()}


def report(args, results: dict[str, dict]) -> list[dict]:
    direct, gw = results["direct"], results["gateway"]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\nnoisy neighbour on vLLM CPU, tiny model, batch (max_num_seqs) {args.batch}: "
        f"{args.flood} flood streams x {args.flood_tokens} tokens, quiet requests of "
        f"{args.quiet_tokens} tokens one after another, {args.duration:g}s x {args.rounds} "
        f"round(s) per target"
        + (f"; gateway engine concurrency {args.engine_concurrency}"
           if args.engine_concurrency is not None else "")
        + ("; vLLM and gateway+load on separate cores" if args.split_cores else "")
        + f"; {machine()}; {stamp}"
    )
    print(f"{'':20}{'direct':>12}{'gateway':>12}{'gateway/direct':>16}{'target':>10}")
    rows = []
    for label, key, target in (
        ("quiet TTFT p50 ms", "quiet_ttft_p50_ms", f"< {TARGET_TTFT_RATIO}"),
        ("quiet TTFT p90 ms", "quiet_ttft_p90_ms", ""),
        ("quiet TTFT max ms", "quiet_ttft_max_ms", ""),
        ("quiet requests", "quiet_requests", None),
        ("quiet not 200", "quiet_not_200", None),
        ("flood tokens/s", "flood_tokens_per_s", f">= {TARGET_THROUGHPUT_RATIO}"),
    ):
        ratio = gw[key] / direct[key] if direct[key] and target is not None else float("nan")
        shown = f"{ratio:>16.3f}" if target is not None else " " * 16
        print(f"{label:20}{direct[key]:>12.1f}{gw[key]:>12.1f}{shown}{target or '':>10}")
        rows.append({"figure": key, "direct": direct[key], "gateway": gw[key],
                     "gateway/direct": ratio, "target": target or ""})
    for name, result in results.items():
        print(f"{name}: quiet answers {dict(result['quiet_answers'])}, "
              f"flood answers {dict(result['flood_answers'])}")
    for name, result in results.items():
        for error, n in result["errors"].most_common(3):
            print(f"{name}: {n} x {error}")
    for key, (count, total) in sorted(gw["queue_waits"].items()):
        print(f"gateway queue, key {key!r}: {count:.0f} requests waited, "
              f"{(total / count if count else 0) * 1e3:.0f} ms on average (all rounds)")
    ttft_ratio = gw["quiet_ttft_p50_ms"] / direct["quiet_ttft_p50_ms"]
    throughput_ratio = gw["flood_tokens_per_s"] / direct["flood_tokens_per_s"]
    print(
        f"quiet TTFT p50 gateway/direct {ttft_ratio:.3f} (target < {TARGET_TTFT_RATIO}): "
        + ("met" if ttft_ratio < TARGET_TTFT_RATIO else "MISSED")
        + f"; flood tokens/s gateway/direct {throughput_ratio:.3f} "
        f"(target >= {TARGET_THROUGHPUT_RATIO}): "
        + ("met" if throughput_ratio >= TARGET_THROUGHPUT_RATIO else "MISSED")
        + "; every quiet request through the gateway 200: "
        + ("yes" if gw["quiet_not_200"] == 0 else "NO")
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds of quiet requests measured per target and round")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds the flood runs before the measurement starts")
    parser.add_argument("--flood", type=int, default=48, help="noisy streams kept in flight")
    parser.add_argument("--flood-tokens", type=int, default=100, help="tokens per noisy stream")
    parser.add_argument("--quiet-tokens", type=int, default=8, help="tokens per quiet request")
    parser.add_argument("--batch", type=int, default=8,
                        help="APPLIANCE_MAX_NUM_SEQS, for the engine and the gateway")
    parser.add_argument("--engine-concurrency", type=int,
                        help="the gateway's APPLIANCE_ENGINE_CONCURRENCY (default: the batch); "
                        "1000 lets every request through, first come, first served")
    parser.add_argument("--split-cores", action="store_true",
                        help="vLLM on the first half of the CPUs, the gateway and the load on "
                        "the rest, as on a GPU host where vLLM's CPU work does not starve them")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measurements per target, in alternating order")
    parser.add_argument("--quick", action="store_true",
                        help="a short look: 8 s measured per target after 2 s of warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.rounds = 8.0, 2.0, 1
    rows = report(args, run(args))
    write_csv(args.out / "bench_fairness.csv", rows)
    print(f"wrote {args.out}/bench_fairness.csv")


if __name__ == "__main__":
    main()
