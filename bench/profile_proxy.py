#!/usr/bin/env python3
"""Where one gateway worker's CPU goes: py-spy samples it under the benchmark's two loads.

One worker (auth, limits, usage, metrics on; log level warning) in front of the fast fake
engine; py-spy (``pip install py-spy``; the ``bench`` extra has it) records it while wrk sends
small chats at 64 connections, then while 64 streams at a time run. Writes the functions that
hold the most samples, by their own time and with what they call, to
``results/profile_gateway.txt``. Time spent in a C call (a socket write, the event loop's
poll) is charged to the Python function that made it.

    .venv/bin/python bench/profile_proxy.py [--seconds 10] [--out results/profile_gateway.txt]
"""

import argparse
import asyncio
import collections
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_proxy import STREAM, one_stream, wrk  # noqa: E402
from tests.servers import VENV_BIN, fake_engine, free_port, running  # noqa: E402

FRAME = re.compile(r"(.*) \((.*?):\d+\)$")
TOP = 25


def frame_name(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    function, path = match.groups()
    path = re.sub(r".*/site-packages/", "", path)
    path = re.sub(r".*/(proxy|bench|tests)/", r"\1/", path)
    return f"{function} ({path})"


def summarize(raw: Path, title: str) -> str:
    """py-spy's raw (collapsed) stacks as two top lists: own samples, and with callees."""
    own: collections.Counter = collections.Counter()
    within: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        names = [frame_name(f) for f in stack.split(";")]
        total += int(count)
        own[names[-1]] += int(count)
        for name in set(names):
            within[name] += int(count)
    lines = [f"== {title}: {total} samples", "-- own time"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in own.most_common(TOP)]
    lines += ["-- with what it calls"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in within.most_common(TOP)]
    return "\n".join(lines)


async def stream_load(port: int, key: str, seconds: float) -> None:
    body = json.dumps(STREAM).encode()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        await asyncio.gather(*(one_stream(port, key, body) for _ in range(64)))


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("py-spy") or str(VENV_BIN / "py-spy"), "record",
                             "--pid", str(pid), "--rate", "250", "--duration", str(seconds),
                             "--format", "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "profile_gateway.txt")
    args = parser.parse_args()
    if not (shutil.which("py-spy") or (VENV_BIN / "py-spy").exists()):
        sys.exit("py-spy is needed: pip install py-spy")
    with tempfile.TemporaryDirectory(prefix="profile-proxy-") as tmp, \
            contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        engine_port, port = free_port(), free_port()
        engine_url = f"http://127.0.0.1:{engine_port}"
        db = workdir / "keys.db"
        key = subprocess.run([str(VENV_BIN / "appliance-keys"), "--db", str(db), "create",
                              "--name", "profile", "--rpm", "1000000000", "--tpm",
                              "1000000000"], capture_output=True, text=True,
                             check=True).stdout.strip()
        env = {"APPLIANCE_ENGINE_URL": engine_url, "APPLIANCE_KEYS_DB": str(db),
               "APPLIANCE_LOG_LEVEL": "info", "APPLIANCE_PROXY_WORKERS": "1",
               "APPLIANCE_MAX_INFLIGHT": "1024"}
        stack.enter_context(running(fake_engine(engine_port), ready_url=engine_url + "/health"))
        proxy = stack.enter_context(running([str(VENV_BIN / "appliance-proxy"), "--port",
                                             str(port)], env=env,
                                            ready_url=f"http://127.0.0.1:{port}/ready"))
        url = f"http://127.0.0.1:{port}"
        wrk(url, key, 8, 2, workdir)  # warm-up
        spy = record(proxy.pid, args.seconds, workdir / "plain.txt")
        plain = wrk(url, key, 64, args.seconds + 1, workdir)
        spy.wait()
        spy = record(proxy.pid, args.seconds, workdir / "streams.txt")
        asyncio.run(stream_load(port, key, args.seconds + 1))
        spy.wait()
        report = [
            f"# appliance-proxy, one worker, py-spy at 250 Hz; {time.strftime('%Y-%m-%d')}",
            f"# small chats: wrk, 64 connections, {plain['rps']:.0f} req/s",
            summarize(workdir / "plain.txt", "small non-streaming chats"),
            "",
            "# streams: 64 at a time, 256 tokens each",
            summarize(workdir / "streams.txt", "streams"),
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")
    print("\n".join(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
