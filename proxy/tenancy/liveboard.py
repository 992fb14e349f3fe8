"""The live board: whether live traffic runs in the other workers of this gateway.

Each worker admits to an engine through a fair queue of its own, over its share of the
engine's slots (``proxy/workers.py``), and batch lines give way to live traffic
(``admission.py``); but a batch runs in one worker, and the live traffic of the others, on the
same engine, is invisible to its queue. The board makes it visible: a small file in the
directory the supervisor gives its workers (``PROMETHEUS_MULTIPROC_DIR``), memory-mapped by
each, one float64 per (worker, engine), worker-major (worker ``w``'s cell for engine ``e`` is
``w * engines + e``). A cell holds that worker's ``live_until`` for that engine on the
monotonic clock (CLOCK_MONOTONIC: one clock for every process of the host): ``inf`` while it
has live traffic running or waiting there, the end of its linger once the last live request
ended, 0 before any. One cell per engine, not per worker, because live traffic on one engine
(another model, another replica) does not slow a batch on another.

A worker writes only its own cells, and only when its live traffic starts or ends, never per
request; it reads the others' only when a batch line asks for a slot. An aligned 8-byte store
or load is whole on the machines the gateway runs on (x86-64, arm64): no lock.
"""

import mmap
import os
from pathlib import Path

BOARD_FILE = "live-board.f64"
"""Its name in the shared directory (not ``*.db``: those are prometheus-client's)."""
CELL = 8


def prepare(path: Path, workers: int, engines: int) -> None:
    """A board with nobody live, made afresh by the supervisor before its workers start."""
    path.write_bytes(bytes(CELL * workers * engines))


def clear(path: Path, worker: int, engines: int) -> None:
    """Forget a dead worker's live traffic (it may have died with ``inf`` in its cells)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(CELL * engines), CELL * worker * engines)
    finally:
        os.close(fd)


class Seat:
    """One worker's place in one engine's row: its own cell to write, the others' to read;
    what a ``FairQueue`` takes as its ``board``."""

    __slots__ = ("cells", "others", "own")

    def __init__(self, cells: memoryview, own: int, others: tuple[int, ...]) -> None:
        self.cells, self.own, self.others = cells, own, others

    def post(self, live_until: float) -> None:
        self.cells[self.own] = live_until

    def others_until(self) -> float:
        """The latest ``live_until`` of the other workers on this engine."""
        cells = self.cells
        return max([cells[i] for i in self.others], default=0.0)


class LiveBoard:
    """Worker ``worker``'s handle on the board at ``path`` (made, or grown, if need be)."""

    def __init__(self, path: Path, workers: int, engines: int, worker: int) -> None:
        if not 0 <= worker < workers or engines < 1:
            raise ValueError(f"worker {worker} of {workers}, {engines} engines: no such cell")
        size = CELL * workers * engines
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.cells = memoryview(self.map).cast("d")
        self.workers, self.engines, self.worker = workers, engines, worker
        for engine in range(engines):  # a restarted worker starts with nothing live
            self.cells[worker * engines + engine] = 0.0

    def seat(self, engine: int) -> Seat:
        return Seat(self.cells, self.worker * self.engines + engine,
                    tuple(w * self.engines + engine for w in range(self.workers)
                          if w != self.worker))

    def close(self) -> None:
        self.cells.release()
        self.map.close()
