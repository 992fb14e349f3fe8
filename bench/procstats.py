"""CPU and memory of a process and its descendants, read from /proc, for the benchmarks."""

import contextlib
import os
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def cpu_seconds(roots: list[int]) -> float:
    """User+system CPU of the processes and their live descendants (and reaped children)."""
    ticks = 0
    for root in roots:
        for pid in descendants(root):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
                if pid == root:
                    ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, field: str) -> int:
    """A memory line of /proc/PID/status (``VmRSS``, ``VmHWM``); 0 once the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS")


def peak_rss_mb(roots: list[int]) -> float:
    """The summed high-water marks (VmHWM) of the processes: each one's peak, added up."""
    return sum(status_kib(pid, "VmHWM") for root in roots for pid in descendants(root)) / 1024
