"""The live board: workers of one gateway see each other's live traffic through one small file,
one cell per (worker, engine), each written by its own worker only."""

import asyncio
import math
import time

import pytest

from proxy.main import live_board
from proxy.settings import ProxySettings
from proxy.tenancy import liveboard
from proxy.tenancy.admission import FairQueue, Tenant
from proxy.tenancy.liveboard import LiveBoard


@pytest.fixture
def path(tmp_path):
    board = tmp_path / liveboard.BOARD_FILE
    liveboard.prepare(board, workers=3, engines=2)
    return board


def test_two_boards_on_one_file_see_each_others_cells_engine_by_engine(path):
    a, b = LiveBoard(path, 3, 2, worker=0), LiveBoard(path, 3, 2, worker=1)
    a.seat(0).post(math.inf)
    assert b.seat(0).others_until() == math.inf
    assert b.seat(1).others_until() == 0.0  # another engine's live traffic is not this one's
    assert a.seat(0).others_until() == 0.0  # its own cell is not among the others
    b.seat(1).post(12.5)
    assert a.seat(1).others_until() == 12.5
    a.close()
    b.close()


def test_a_worker_that_starts_again_starts_with_nothing_live(path):
    old = LiveBoard(path, 3, 2, worker=2)
    old.seat(0).post(math.inf)
    new, other = LiveBoard(path, 3, 2, worker=2), LiveBoard(path, 3, 2, worker=0)
    assert other.seat(0).others_until() == 0.0
    for board in (old, new, other):
        board.close()


def test_the_supervisor_clears_a_dead_workers_cells_and_no_other(path):
    dead, alive, reader = (LiveBoard(path, 3, 2, worker=w) for w in (1, 2, 0))
    dead.seat(1).post(math.inf)
    alive.seat(1).post(7.0)
    liveboard.clear(path, 1, engines=2)
    assert reader.seat(1).others_until() == 7.0
    for board in (dead, alive, reader):
        board.close()


def test_a_worker_makes_the_file_if_nobody_did(tmp_path):
    board = LiveBoard(tmp_path / "board", 2, 1, worker=1)
    assert (tmp_path / "board").stat().st_size == 2 * liveboard.CELL
    assert board.seat(0).others_until() == 0.0
    board.close()


def test_only_a_gateway_of_several_workers_has_a_board(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    lone = ProxySettings(proxy_workers=1, engine_concurrency=8)
    assert live_board(lone, None) is None and live_board(lone, 0) is None
    assert not (tmp_path / liveboard.BOARD_FILE).exists()
    board = live_board(ProxySettings(proxy_workers=2, engine_concurrency=8), 1)
    assert board is not None and board.workers == 2 and board.worker == 1
    board.close()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_two_workers_queues_batch_gives_way_to_the_others_live_traffic(path):
    """Worker 0 serves a live key, worker 1 runs a batch on the same engine: the batch waits
    while the live request runs and for the linger after it, then runs."""
    async def main():
        seats = [LiveBoard(path, 3, 2, worker=w).seat(0) for w in (0, 1)]
        live_worker, batch_worker = (FairQueue(4, 10, background_cap=3, background_beside_live=0,
                                               live_linger_s=0.2, board=s) for s in seats)
        ended = asyncio.Event()

        async def live() -> None:
            async with live_worker.slot(Tenant("user")):
                await ended.wait()

        async def line() -> None:
            async with batch_worker.slot(Tenant("batch", background=True)):
                pass

        user = asyncio.create_task(live())
        await settle()
        batch = asyncio.create_task(line())
        await asyncio.sleep(0.4)  # a release in the live worker is not one here: it polls
        assert not batch.done() and batch_worker.queued("batch", background=True) == 1
        ended.set()
        await user
        gone = time.monotonic()
        await asyncio.wait_for(batch, 2.0)
        assert time.monotonic() - gone >= 0.15  # the other worker's linger holds it too
    asyncio.run(main())
