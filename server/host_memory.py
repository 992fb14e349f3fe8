"""How much memory this host can still give the engine: ``MemAvailable``, bounded by the
memory limits of the cgroups the process runs in (a systemd ``MemoryMax``, a container).

vLLM's CPU build keeps its KV cache in RAM, so the planner sizes that cache from this.
"""

import contextlib
from pathlib import Path

MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def mem_available(meminfo: str) -> int | None:
    """``MemAvailable`` from ``/proc/meminfo``'s text, in bytes."""
    for line in meminfo.splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024
    return None


def cgroup_headroom(limits: list[tuple[str, str]]) -> int | None:
    """The least room left under any limited cgroup, given ``(memory.max, memory.current)``."""
    room = [
        max(0, int(limit) - int(current))
        for limit, current in limits
        if limit.strip() != "max" and current.strip()
    ]
    return min(room) if room else None


def _cgroup_limits() -> list[tuple[str, str]]:
    """``memory.max`` and ``memory.current`` of this process's cgroup and its ancestors (v2)."""
    path = next(
        (
            line.split("::", 1)[1]
            for line in SELF_CGROUP.read_text().splitlines()
            if line.startswith("0::")
        ),
        None,
    )
    if path is None:
        return []
    limits = []
    directory = CGROUP_ROOT / path.strip().lstrip("/")
    while True:
        with contextlib.suppress(OSError):
            limit = (directory / "memory.max").read_text()
            limits.append((limit, (directory / "memory.current").read_text()))
        if directory == CGROUP_ROOT or CGROUP_ROOT not in directory.parents:
            return limits
        directory = directory.parent


def available_memory_bytes() -> int | None:
    """Memory the engine may still take; None when the host does not say."""
    try:
        available = mem_available(MEMINFO.read_text())
    except OSError:
        available = None
    try:
        headroom = cgroup_headroom(_cgroup_limits())
    except OSError:
        headroom = None
    known = [value for value in (available, headroom) if value is not None]
    return min(known) if known else None
