#!/usr/bin/env python3
"""Batches on idle capacity: what a running batch costs interactive traffic, and what
interactive traffic costs a batch, on real vLLM (CPU build, tiny model) through the gateway.
Figures only, never pass/fail.

Seven phases, one gateway, one engine, run in this order:

    quiet alone       a quiet key's streamed requests one after another: time to first token
    vLLM: quiet(+1)   the same straight at vLLM, alone and with one request of a batch line's
                      size beside it all the while: what one more sequence in vLLM's steps
                      costs a live request, no gateway involved
    engine direct     the batch's lines straight at vLLM, ``--batch`` at once: the engine's
                      throughput with nobody else on it (what a batch may hope to take)
    batch alone       a batch of ``--lines`` completions of ``--line-tokens`` tokens: lines/s
    batch + quiet     the same batch again; once it fills the engine, the quiet key streams
                      for ``--quiet-seconds``: its TTFT during the batch, and the batch's
                      lines/s beside it (the batch's whole run, and that window alone)
    quiet again       the quiet key alone once more: its TTFT during the batch is compared with
                      the mean of its two runs alone, so the machine's drift over the run
                      counts on neither side

Targets (the Batch API issue): the quiet key's TTFT p50 during the batch within 1.25x of its
TTFT alone; the batch alone at least 0.8x the engine's direct throughput. Batch lines take
only slots no live request waits for, at most ``--batch-slots`` of the engine's ``--batch``
(``APPLIANCE_BATCH_MAX_SLOTS``), and fewer while live traffic runs
(``APPLIANCE_BATCH_SLOTS_BESIDE_LIVE``). ``--split-cores`` puts vLLM on half the CPUs and the
gateway and the load on the rest, as on a GPU host, where vLLM's CPU work does not starve the
gateway. Writes results/bench_batch.csv.

    .venv/bin/python bench/bench_batch.py [--lines 500] [--line-tokens 32] [--batch 8]
        [--split-cores]
    .venv/bin/python bench/bench_batch.py --quick
"""

import argparse
import asyncio
import datetime
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_compare import machine  # noqa: E402
from bench.bench_engine import core_split  # noqa: E402
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


def counts(client, batch_id: str) -> tuple[str, int, float]:
    batch = client.batches.retrieve(batch_id)
    return batch.status, batch.request_counts.completed, time.perf_counter()


DONE = ("completed", "failed", "expired", "cancelled")


async def batch_with_quiet(gw, client, data: bytes, quiet: bool, args) -> dict:
    """A batch from upload to its last line: its lines/s over the whole run; with ``quiet``,
    the quiet key streams for ``--quiet-seconds`` once the batch has filled the engine (so
    the quiet key arrives while lines run), and the batch's lines/s over that window."""
    started = time.perf_counter()
    batch_id = run_batch(client, data)
    streams: list[Stream] = []
    during = float("nan")
    if quiet:
        status, done, _ = await asyncio.to_thread(counts, client, batch_id)
        while status not in DONE and done < 2 * args.batch:
            await asyncio.sleep(0.05)
            status, done, _ = await asyncio.to_thread(counts, client, batch_id)
        _, before, window_start = await asyncio.to_thread(counts, client, batch_id)
        end = time.perf_counter() + args.quiet_seconds
        streams = await quiet_loop(gw.url, gw.key("quiet"), args.quiet_tokens,
                                   lambda: time.perf_counter() > end)
        _, after, window_end = await asyncio.to_thread(counts, client, batch_id)
        during = (after - before) / (window_end - window_start)
    status, done, at = await asyncio.to_thread(counts, client, batch_id)
    while status not in DONE:
        await asyncio.sleep(0.1)
        status, done, at = await asyncio.to_thread(counts, client, batch_id)
    batch = client.batches.retrieve(batch_id)
    return {"seconds": at - started, "lines_per_s": done / (at - started),
            "during_quiet": during, "failed": batch.request_counts.failed, "streams": streams}


async def direct(url: str, key: str, data: bytes, concurrency: int) -> dict:
    """The batch's lines straight at vLLM, ``concurrency`` at once: lines/s."""
    lines = [json.loads(line) for line in data.splitlines()]
    pending = iter(lines)
    failed = 0

    async def worker(client) -> None:
        nonlocal failed
        for line in pending:
            answer = await client.post(url + line["url"], json=line["body"],
                                       headers={"Authorization": f"Bearer {key}"})
            failed += answer.status_code != 200

    started = time.perf_counter()
    async with client_for(concurrency) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "lines_per_s": (len(lines) - failed) / seconds,
            "failed": failed, "streams": []}


async def beside(url: str, key: str, args, lines: int) -> list[Stream]:
    """The quiet key's streams straight at vLLM for ``--quiet-seconds``, with ``lines``
    requests of a batch line's size running beside them all the while (also straight at
    vLLM): what one more sequence in the engine's steps costs a live request, with no gateway
    in the way."""
    end = time.perf_counter() + args.quiet_seconds
    body = json.loads(batch_input(1, args.line_tokens))["body"]

    async def line_after_line(client) -> None:
        while time.perf_counter() < end:
            await client.post(url + "/v1/completions", json=body,
                              headers={"Authorization": f"Bearer {key}"})

    async with client_for(max(1, lines)) as client:
        others = [asyncio.create_task(line_after_line(client)) for _ in range(lines)]
        streams = await quiet_loop(url, key, args.quiet_tokens,
                                   lambda: time.perf_counter() > end)
        await asyncio.gather(*others)
    return streams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=500)
    p.add_argument("--line-tokens", type=int, default=32)
    p.add_argument("--quiet-tokens", type=int, default=16)
    p.add_argument("--quiet-seconds", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=8, help="the engine's max_num_seqs")
    p.add_argument("--batch-slots", type=int, default=None,
                   help="APPLIANCE_BATCH_MAX_SLOTS (default: the gateway's)")
    p.add_argument("--beside-live", type=int, default=None,
                   help="APPLIANCE_BATCH_SLOTS_BESIDE_LIVE (default: the gateway's)")
    p.add_argument("--split-cores", action="store_true",
                   help="vLLM on half the CPUs, the gateway and the load on the rest")
    p.add_argument("--quick", action="store_true", help="64 lines of 16 tokens, 5 s quiet")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args()
    if args.quick:
        args.lines, args.line_tokens, args.quiet_seconds = 64, 16, 5.0
    slots = {name: value for name, value in (("batch_max_slots", args.batch_slots),
                                             ("batch_slots_beside_live", args.beside_live))
             if value is not None}
    data = batch_input(args.lines, args.line_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model")
        engine_cpus, other_cpus = core_split(args.split_cores)
        os.sched_setaffinity(0, engine_cpus)  # vLLM inherits it and binds its threads there
        with engine(model, work / "engine", max_num_seqs=args.batch) as vllm:
            os.sched_setaffinity(0, other_cpus)  # the gateway and this load generator
            with gateway(vllm.url, work, engine_api_key=vllm.key, max_num_seqs=args.batch,
                         batch_dir=work / "batches", batch_poll_interval_s=0.2,
                         **slots) as gw:
                client = gw.client("bulk")
                end = time.perf_counter() + args.quiet_seconds
                alone = asyncio.run(quiet_loop(gw.url, gw.key("quiet"), args.quiet_tokens,
                                               lambda: time.perf_counter() > end))
                vllm.wait_idle()
                direct_alone = asyncio.run(beside(vllm.url, vllm.key, args, 0))
                vllm.wait_idle()
                direct_beside = asyncio.run(beside(vllm.url, vllm.key, args, 1))
                vllm.wait_idle()
                engine_alone = asyncio.run(direct(vllm.url, vllm.key, data, args.batch))
                vllm.wait_idle()
                batch_alone = asyncio.run(batch_with_quiet(gw, client, data, False, args))
                vllm.wait_idle()
                together = asyncio.run(batch_with_quiet(gw, client, data, True, args))
                vllm.wait_idle()
                end = time.perf_counter() + args.quiet_seconds
                again = asyncio.run(quiet_loop(gw.url, gw.key("quiet"), args.quiet_tokens,
                                               lambda: time.perf_counter() > end))
    rows = []
    for phase, streams, batch in (("quiet alone", alone, None),
                                  ("vLLM: quiet", direct_alone, None),
                                  ("vLLM: quiet+1", direct_beside, None),
                                  ("engine direct", [], engine_alone),
                                  ("batch alone", [], batch_alone),
                                  ("batch + quiet", together["streams"], together),
                                  ("quiet again", again, None)):
        p50, p90, count = ttft_ms(streams) if streams else (float("nan"),) * 2 + (0,)
        rows.append({"phase": phase, "quiet_ttft_p50_ms": p50, "quiet_ttft_p90_ms": p90,
                     "quiet_requests": count,
                     "lines_per_s": batch["lines_per_s"] if batch else float("nan"),
                     "lines_per_s_beside_quiet": batch.get("during_quiet", float("nan"))
                     if batch else float("nan"),
                     "failed": batch["failed"] if batch else 0})
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nbatches on idle capacity, vLLM CPU, tiny model, max_num_seqs {args.batch}, "
          f"{slot_settings(args.batch, slots)}: {args.lines} lines x {args.line_tokens} "
          f"tokens, quiet requests of {args.quiet_tokens} tokens"
          + ("; vLLM and gateway+load on separate cores" if args.split_cores else "")
          + f"; {machine()}; {stamp}")
    print(f"{'phase':16}{'quiet TTFT p50':>16}{'p90':>10}{'quiet n':>9}{'lines/s':>10}"
          f"{'beside quiet':>14}{'failed':>8}")
    for row in rows:
        print(f"{row['phase']:16}{row['quiet_ttft_p50_ms']:>14.1f}ms"
              f"{row['quiet_ttft_p90_ms']:>8.1f}ms{row['quiet_requests']:>9}"
              f"{row['lines_per_s']:>10.2f}{row['lines_per_s_beside_quiet']:>14.2f}"
              f"{row['failed']:>8}")
    ttft = rows[5]["quiet_ttft_p50_ms"] / statistics.mean(
        (rows[0]["quiet_ttft_p50_ms"], rows[6]["quiet_ttft_p50_ms"]))
    share = rows[4]["lines_per_s"] / rows[3]["lines_per_s"]
    one_more = rows[2]["quiet_ttft_p50_ms"] / rows[1]["quiet_ttft_p50_ms"]
    print(f"quiet TTFT p50 during the batch / alone (before and after): {ttft:.2f}x "
          "(target <= 1.25x)")
    print(f"batch alone / engine direct, lines/s:    {share:.2f}x (target >= 0.8x)")
    print(f"straight at vLLM, quiet TTFT p50 with one batch-sized request beside it / alone: "
          f"{one_more:.2f}x")
    write_csv(args.out / "bench_batch.csv", rows)


def slot_settings(max_num_seqs: int, slots: dict) -> str:
    """The batch slot settings the gateway ran with (its defaults where none was given)."""
    from proxy.settings import ProxySettings, batch_slots

    most, beside = batch_slots(ProxySettings(max_num_seqs=max_num_seqs, proxy_workers=1, **slots))
    return f"batch slots {most}, {beside} beside live traffic"


if __name__ == "__main__":
    main()
