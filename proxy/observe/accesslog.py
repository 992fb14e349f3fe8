"""One JSON line per request on stdout (journald keeps it): who, what, how it went, how long.

Written without the logging module: a log record per request (the caller's frame looked up,
process and thread names, a lock, a flush) was a quarter of a small request's CPU. Lines wait
for the end of the event loop's turn and go out together: a busy gateway makes one write for
many requests, a quiet one still writes each line at once.
"""

import asyncio
import atexit
import logging
import sys
from dataclasses import dataclass
from json import dumps


@dataclass(slots=True)
class RequestRecord:
    """What one request did; filled in as it passes through, written once at the end."""

    request_id: str
    method: str
    route: str
    started: float
    status: int = 0
    key: str = "-"
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Of the prompt tokens, those the engine's prefix cache held (0: none, or not reported)."""
    model: str = ""
    engine: str = ""
    """Which model it asked for and which engine (its loopback address) served it."""
    error: str = ""
    arrived: float = 0.0
    """When it came, on the wall clock (``started`` is monotonic, for its duration) ..."""
    queued: float | None = None
    """... when it asked for its turn at the engine, its body read and its key's limits passed
    (None: it never did) ..."""
    admitted: float | None = None
    """... and when the engine got it (None: never), on the same clock, so that instants order
    across requests: who waited, and who went first."""


class Lines:
    """Lines for stdout, written together at the end of the event loop's turn."""

    def __init__(self) -> None:
        self.enabled = True
        self.stream = sys.stdout
        self.pending: list[str] = []

    def add(self, line: str) -> None:
        self.pending.append(line)
        if len(self.pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a tool, a test): nobody to wait for
                self.flush()

    def flush(self) -> None:
        if self.pending:
            text = "\n".join(self.pending) + "\n"
            self.pending.clear()
            self.stream.write(text)
            self.stream.flush()


LINES = Lines()
atexit.register(LINES.flush)
QUOTED: dict[str, str] = {}
"""Strings that recur from line to line (key names, methods, routes, models, engines, error
codes), JSON-quoted once: ``json.dumps`` of each was a tenth of a small request's line."""
QUOTED_MOST = 4096
"""Routes come from clients (every 404's path): the memo starts over past this many."""


def quoted(text: str) -> str:
    found = QUOTED.get(text)
    if found is None:
        if len(QUOTED) >= QUOTED_MOST:
            QUOTED.clear()
        found = QUOTED[text] = dumps(text)
    return found
WORKER_FIELD = ""
"""``, "worker": i`` in a worker of several (which process served a key), else nothing."""


def configure(level: str, worker: int | None = None) -> None:
    """Lines at ``info`` and below (APPLIANCE_LOG_LEVEL), on this process's stdout."""
    global WORKER_FIELD
    WORKER_FIELD = "" if worker is None else f', "worker": {worker:d}'
    LINES.enabled = logging.getLevelName(level.upper()) <= logging.INFO
    LINES.stream = sys.stdout


def write(record: RequestRecord, duration_s: float) -> None:
    """``ts`` is the arrival (Unix time); ``queued_ms`` and ``admitted_ms`` say how long after
    it the request joined its key's queue for the engine (body read, limits passed) and got its
    turn: who waited, for how long, and in what order.

    Formatted by hand, every string through ``json.dumps`` (``quoted`` for those that recur): a
    dict made and encoded for each line took four times as long.
    """
    if not LINES.enabled:
        return
    line = (f'{{"request_id": {dumps(record.request_id)}, "key": {quoted(record.key)}, '
            f'"method": {quoted(record.method)}, "route": {quoted(record.route)}, '
            f'"status": {record.status:d}, "duration_ms": {duration_s * 1000:.2f}, '
            f'"stream": {"true" if record.stream else "false"}, '
            f'"prompt_tokens": {record.prompt_tokens:d}, '
            f'"completion_tokens": {record.completion_tokens:d}, "ts": {record.arrived:.6f}')
    if record.queued is not None:
        line += f', "queued_ms": {(record.queued - record.arrived) * 1000:.3f}'
    if record.admitted is not None:
        line += f', "admitted_ms": {(record.admitted - record.arrived) * 1000:.3f}'
    if record.engine:
        line += f', "model": {quoted(record.model)}, "engine": {quoted(record.engine)}'
    if record.cached_tokens:
        line += f', "cached_tokens": {record.cached_tokens:d}'
    if record.error:
        line += f', "error": {quoted(record.error)}'
    LINES.add(line + WORKER_FIELD + "}")
