#!/usr/bin/env python3
"""Batches on idle capacity: what a running batch costs interactive traffic, and what
interactive traffic costs a batch, on real vLLM (CPU build, tiny model) through the gateway.
Figures only, never pass/fail.

Four phases, one gateway, one engine, run in this order:

    quiet alone       a quiet key's streamed requests one after another: time to first token
    batch alone       a batch of ``--lines`` completions of ``--line-tokens`` tokens: lines/s
    batch + quiet     the same batch again, with the quiet key streaming while it runs
    (the quiet key's TTFT during the batch, and the batch's lines/s with it)

Batch lines take only slots no live request waits for, at most ``--batch-slots`` of the
engine's ``--batch`` (``APPLIANCE_BATCH_MAX_SLOTS``); the quiet key's TTFT during a batch is
the price of the slots batch lines already hold when it arrives (vLLM does not pre-empt).
Writes results/bench_batch.csv.

    .venv/bin/python bench/bench_batch.py [--lines 64] [--line-tokens 64] [--batch 8]
    .venv/bin/python bench/bench_batch.py --quick
"""

import argparse
import asyncio
import datetime
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_compare import machine  # noqa: E402
from bench.bench_proxy import percentile, write_csv  # noqa: E402
from tests.e2e.engine_stack import SERVED_NAME, engine, make_tiny_model  # noqa: E402
from tests.e2e.noisy_neighbour import Stream, client_for, completion, timed_stream  # noqa: E402
from tests.integration.proxy_stack import gateway  # noqa: E402


def batch_input(lines: int, tokens: int) -> bytes:
    return b"".join(json.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
        "body": {"model": SERVED_NAME, "prompt": f"Line {i} of a long batch", "max_tokens": tokens,
                 "ignore_eos": True, "temperature": 0}}).encode() + b"\n" for i in range(lines))


async def quiet_loop(url: str, key: str, tokens: int, until) -> list[Stream]:
    """Quiet requests one after another while ``until()`` is false."""
    done: list[Stream] = []
    async with client_for(1) as client:
        while not until():
            stream = Stream(sent=time.perf_counter())
            await timed_stream(client, url, key, completion("A quiet question", tokens), stream)
            done.append(stream)
    return done


def ttft_ms(streams: list[Stream]) -> tuple[float, float, int]:
    firsts = [(s.first - s.sent) * 1000 for s in streams if s.ok and s.first is not None]
    if not firsts:
        return float("nan"), float("nan"), len(streams)
    return percentile(firsts, 50), percentile(firsts, 90), len(streams)


def run_batch(client, data: bytes) -> str:
    uploaded = client.files.create(file=("bench.jsonl", io.BytesIO(data)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                 completion_window="24h").id


def finished(client, batch_id: str) -> tuple[bool, float]:
    batch = client.batches.retrieve(batch_id)
    return batch.status in ("completed", "failed", "expired", "cancelled"), time.perf_counter()


async def batch_with_quiet(gw, client, data: bytes, quiet: bool, args) -> dict:
    started = time.perf_counter()
    batch_id = run_batch(client, data)
    state = {"done": False, "at": started}

    async def watch() -> None:
        while not state["done"]:
            state["done"], state["at"] = await asyncio.to_thread(finished, client, batch_id)
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    streams = await quiet_loop(gw.url, gw.key("quiet"), args.quiet_tokens,
                               lambda: state["done"]) if quiet else []
    await watcher
    batch = client.batches.retrieve(batch_id)
    seconds = state["at"] - started
    return {"seconds": seconds, "lines_per_s": batch.request_counts.completed / seconds,
            "failed": batch.request_counts.failed, "streams": streams}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=64)
    p.add_argument("--line-tokens", type=int, default=64)
    p.add_argument("--quiet-tokens", type=int, default=16)
    p.add_argument("--quiet-seconds", type=float, default=15.0)
    p.add_argument("--batch", type=int, default=8, help="the engine's max_num_seqs")
    p.add_argument("--batch-slots", type=int, default=None,
                   help="APPLIANCE_BATCH_MAX_SLOTS (default: half of --batch)")
    p.add_argument("--quick", action="store_true", help="16 lines of 16 tokens, 5 s quiet")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args()
    if args.quick:
        args.lines, args.line_tokens, args.quiet_seconds = 16, 16, 5.0
    slots = args.batch_slots or max(1, args.batch // 2)
    data = batch_input(args.lines, args.line_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model")
        with engine(model, work / "engine", max_num_seqs=args.batch) as vllm, \
                gateway(vllm.url, work, engine_api_key=vllm.key, max_num_seqs=args.batch,
                        batch_dir=work / "batches", batch_max_slots=slots,
                        batch_poll_interval_s=0.2) as gw:
            client = gw.client("bulk")
            end = time.perf_counter() + args.quiet_seconds
            alone = asyncio.run(quiet_loop(gw.url, gw.key("quiet"), args.quiet_tokens,
                                           lambda: time.perf_counter() > end))
            vllm.wait_idle()
            batch_alone = asyncio.run(batch_with_quiet(gw, client, data, False, args))
            vllm.wait_idle()
            together = asyncio.run(batch_with_quiet(gw, client, data, True, args))
    rows = []
    for phase, streams, batch in (("quiet alone", alone, None),
                                  ("batch alone", [], batch_alone),
                                  ("batch + quiet", together["streams"], together)):
        p50, p90, count = ttft_ms(streams) if streams else (float("nan"),) * 2 + (0,)
        rows.append({"phase": phase, "quiet_ttft_p50_ms": p50, "quiet_ttft_p90_ms": p90,
                     "quiet_requests": count,
                     "batch_lines_per_s": batch["lines_per_s"] if batch else float("nan"),
                     "batch_failed": batch["failed"] if batch else 0})
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nbatches on idle capacity, vLLM CPU, tiny model, max_num_seqs {args.batch}, "
          f"batch slots {slots}: {args.lines} lines x {args.line_tokens} tokens, quiet "
          f"requests of {args.quiet_tokens} tokens; {machine()}; {stamp}")
    print(f"{'phase':16}{'quiet TTFT p50':>16}{'p90':>10}{'quiet n':>9}{'lines/s':>10}")
    for row in rows:
        print(f"{row['phase']:16}{row['quiet_ttft_p50_ms']:>14.1f}ms"
              f"{row['quiet_ttft_p90_ms']:>8.1f}ms{row['quiet_requests']:>9}"
              f"{row['batch_lines_per_s']:>10.2f}")
    write_csv(args.out / "bench_batch.csv", rows)


if __name__ == "__main__":
    main()
