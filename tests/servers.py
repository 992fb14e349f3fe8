"""Start real servers on loopback for tests and benchmarks, and stop them afterwards."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    for _ in range(100):
        first = free_port()
        if first + count > 65536:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no consecutive free ports")


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None,
              ok: tuple[int, ...] = (200,), verify: bool | str = True) -> None:
    """Poll ``url`` until it answers one of ``ok``; fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            last = httpx.get(url, timeout=1.0, verify=verify).status_code
            if last in ok:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer in {timeout}s (last: {last!r})")


@contextlib.contextmanager
def running(argv: list[str], ready_url: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 30.0, log: Path | None = None, cwd: Path = ROOT,
            ready_ok: tuple[int, ...] = (200,)) -> Iterator[subprocess.Popen]:
    """Run ``argv`` in its own process group until the block ends; SIGTERM, then SIGKILL."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=cwd,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if ready_url:
            wait_http(ready_url, timeout=timeout, proc=proc, ok=ready_ok)
        yield proc
    finally:
        stop(proc)
        if log:
            out.close()


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def fake_engine(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.fake_engine", "--port", str(port), *extra]


def proxy(port: int) -> list[str]:
    return [str(VENV_BIN / "appliance-proxy"), "--host", "127.0.0.1", "--port", str(port)]
