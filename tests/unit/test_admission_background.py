"""Batch lines at background priority: below every key's live traffic, within their cap, and
fair among the keys whose batches run."""

import asyncio
import math
import time

from proxy.tenancy.admission import FairQueue, Tenant


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Holder:
    """Requests that hold their slot until released one at a time, in the order they got it."""

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self.order: list[str] = []
        self.gates: list[asyncio.Event] = []
        self.tasks: list[asyncio.Task] = []

    def start(self, tenant: Tenant, label: str | None = None) -> None:
        self.tasks.append(asyncio.create_task(self._hold(tenant, label or tenant.name)))

    async def _hold(self, tenant: Tenant, label: str) -> None:
        async with self.queue.slot(tenant):
            gate = asyncio.Event()
            self.gates.append(gate)
            self.order.append(label)
            await gate.wait()

    async def release_first(self) -> None:
        self.gates.pop(0).set()
        await settle()

    async def finish(self) -> None:
        while self.gates or not all(t.done() for t in self.tasks):
            if self.gates:
                self.gates.pop(0).set()
            await settle()
        await asyncio.gather(*self.tasks)


def test_live_request_arriving_while_batch_runs_gets_the_next_free_slot():
    async def main():
        queue = FairQueue(2, 100, background_cap=2)
        h = Holder(queue)
        for _ in range(4):
            h.start(Tenant("batch", background=True), "bg")
        await settle()
        assert h.order == ["bg", "bg"] and queue.queued("batch", background=True) == 2
        h.start(Tenant("live"))
        await settle()
        assert queue.queued("live") == 1  # every slot is busy with batch lines
        await h.release_first()
        assert h.order == ["bg", "bg", "live"]  # not the next batch line
        await h.finish()
        assert queue.running == 0 and queue.background_running == 0
    asyncio.run(main())


def test_background_never_takes_a_free_slot_while_live_requests_wait():
    async def main():
        queue = FairQueue(2, 100)
        h = Holder(queue)
        h.start(Tenant("live"))
        h.start(Tenant("live"))
        h.start(Tenant("live"))
        await settle()
        h.start(Tenant("batch", background=True), "bg")
        await settle()
        await h.release_first()
        assert h.order == ["live", "live", "live"]
        await h.release_first()
        assert h.order == ["live", "live", "live", "bg"]
        await h.finish()
    asyncio.run(main())


def test_background_never_exceeds_its_cap():
    async def main():
        queue = FairQueue(4, 100, background_cap=2)
        peak = 0
        h = Holder(queue)
        for name in ("a", "b"):
            for _ in range(5):
                h.start(Tenant(name, background=True))
        await settle()
        assert queue.background_running == 2 and queue.running == 2
        h.start(Tenant("live"))
        h.start(Tenant("live"))
        await settle()
        assert queue.running == 4  # live traffic still gets the slots left
        while h.gates:
            peak = max(peak, queue.background_running)
            await h.release_first()
        await h.finish()
        assert peak <= 2 and h.order.count("live") == 2
    asyncio.run(main())


def test_background_keys_share_fairly_by_weight():
    async def main():
        queue = FairQueue(1, 100, background_cap=1)
        h = Holder(queue)
        h.start(Tenant("live"))  # holds the one slot while both backlogs form
        await settle()
        for _ in range(6):
            h.start(Tenant("big", background=True))
        for _ in range(3):
            h.start(Tenant("small", background=True))
        await settle()
        await h.finish()
        served = h.order[1:]
        assert served[:6].count("small") == 3 and served[:6].count("big") == 3
    asyncio.run(main())


def test_batch_lane_is_apart_from_the_same_keys_live_lane():
    async def main():
        queue = FairQueue(1, 100)
        h = Holder(queue)
        h.start(Tenant("k", background=True), "bg")
        await settle()
        h.start(Tenant("k"), "live")
        h.start(Tenant("k", background=True), "bg")
        await settle()
        assert queue.queued("k") == 1 and queue.queued("k", background=True) == 1
        await h.finish()
        assert h.order == ["bg", "live", "bg"]
    asyncio.run(main())


def test_a_request_larger_than_the_background_cap_does_not_fit():
    queue = FairQueue(8, 10, background_cap=2)
    assert queue.fits(Tenant("a"), 4)
    assert not queue.fits(Tenant("a", background=True), 4)


def test_a_batch_gives_way_to_live_traffic_and_fills_the_engine_again_once_it_is_gone():
    async def main():
        queue = FairQueue(8, 100, background_cap=6, background_beside_live=1,
                          live_linger_s=0.2)
        h = Holder(queue)
        for _ in range(10):
            h.start(Tenant("batch", background=True), "bg")
        await settle()
        assert queue.background_running == 6  # an idle engine: the batch takes its whole cap
        h.start(Tenant("live"))
        await settle()
        assert h.order[-1] == "live"  # a free slot at once
        for _ in range(5):  # the batch's lines end one by one and are not replaced ...
            await h.release_first()
        assert queue.background_running == 1
        await h.release_first()  # ... but for the one it may keep beside live traffic
        assert queue.background_running == 1 and queue.running == 2
        assert h.order[-2:] == ["live", "bg"]
        await h.release_first()  # the live request ends
        await settle()
        assert queue.background_running == 1  # live traffic lingers a moment ...
        await asyncio.sleep(0.3)
        await settle()
        assert queue.background_running == 4  # ... then the batch fills the engine again
        await h.finish()
        assert queue.running == 0 and queue.recheck is None
    asyncio.run(main())


def test_without_a_separate_cap_beside_live_traffic_the_batch_keeps_its_cap():
    async def main():
        queue = FairQueue(4, 100, background_cap=2)
        h = Holder(queue)
        h.start(Tenant("live"))
        for _ in range(3):
            h.start(Tenant("batch", background=True), "bg")
        await settle()
        assert queue.background_running == 2
        await h.finish()
    asyncio.run(main())


def test_with_no_slots_beside_live_traffic_the_batch_waits_until_it_is_gone():
    async def main():
        queue = FairQueue(4, 100, background_cap=3, background_beside_live=0,
                          live_linger_s=0.1)
        h = Holder(queue)
        h.start(Tenant("live"))
        await settle()
        for _ in range(2):
            h.start(Tenant("batch", background=True), "bg")
        await settle()
        assert queue.background_running == 0 and queue.running == 1
        await h.release_first()  # the live request ends; the linger holds the batch back ...
        assert queue.background_running == 0
        await asyncio.sleep(0.2)
        await settle()
        assert queue.background_running == 2  # ... and then it runs
        await h.finish()
    asyncio.run(main())


class FakeBoard:
    """The other workers' cells, set by the test; what this queue posts, kept in order."""

    def __init__(self) -> None:
        self.others = 0.0
        self.posts: list[float] = []

    def post(self, live_until: float) -> None:
        self.posts.append(live_until)

    def others_until(self) -> float:
        return self.others


def test_a_batch_waits_while_another_workers_live_traffic_runs_and_lingers():
    async def main():
        board = FakeBoard()
        queue = FairQueue(4, 100, background_cap=3, background_beside_live=0, board=board)
        board.others = math.inf  # another worker has live traffic on this engine
        h = Holder(queue)
        for _ in range(2):
            h.start(Tenant("batch", background=True), "bg")
        await asyncio.sleep(0.3)  # no release here will wake it: it looks again by itself
        assert queue.background_running == 0 and queue.queued("batch", background=True) == 2
        board.others = time.monotonic() + 0.5  # its last live request ended; the linger runs
        await asyncio.sleep(0.25)
        assert queue.background_running == 0
        await asyncio.sleep(0.4)
        await settle()
        assert queue.background_running == 2
        await h.finish()
        assert board.posts == []  # background work is not live traffic
    asyncio.run(main())


def test_beside_another_workers_live_traffic_a_batch_keeps_its_slots_beside_live():
    async def main():
        board = FakeBoard()
        board.others = math.inf
        queue = FairQueue(4, 100, background_cap=3, background_beside_live=1, board=board)
        h = Holder(queue)
        for _ in range(3):
            h.start(Tenant("batch", background=True), "bg")
        await settle()
        assert queue.background_running == 1
        board.others = 0.0
        await asyncio.sleep(0.3)
        await settle()
        assert queue.background_running == 3
        await h.finish()
    asyncio.run(main())


def test_the_board_hears_only_when_live_traffic_starts_and_when_its_last_request_ends():
    async def main():
        board = FakeBoard()
        queue = FairQueue(2, 100, background_cap=2, background_beside_live=0,
                          live_linger_s=5.0, board=board)
        h = Holder(queue)
        h.start(Tenant("batch", background=True), "bg")
        await settle()
        for _ in range(4):  # two run, two wait: live traffic all along
            h.start(Tenant("live"))
        await settle()
        assert board.posts == [math.inf]
        await h.finish()
        assert len(board.posts) == 2 and time.monotonic() < board.posts[1] < math.inf
        h.start(Tenant("live"))  # within the linger, but it may outlast it
        await settle()
        assert board.posts[2:] == [math.inf]
        await h.finish()
        assert len(board.posts) == 4
    asyncio.run(main())


def test_a_live_request_that_leaves_while_it_waits_takes_its_live_traffic_off_the_board():
    async def main():
        board = FakeBoard()
        queue = FairQueue(1, 100, background_cap=1, background_beside_live=0, board=board)
        h = Holder(queue)
        board.others = 0.0
        h.start(Tenant("batch", background=True), "bg")
        await settle()
        waiter = asyncio.create_task(h._hold(Tenant("live"), "live"))
        await settle()
        assert board.posts == [math.inf]  # it waits behind the batch line: live traffic
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert board.posts[1:] == [queue.live_until]
        await h.finish()
    asyncio.run(main())


def test_when_live_traffic_never_limits_a_batch_the_board_is_left_alone():
    board = FakeBoard()
    queue = FairQueue(4, 100, background_cap=2, background_beside_live=2, board=board)
    assert queue.board is None and not queue.board_idle


def test_a_workers_batch_slots_are_sized_from_its_own_share_of_the_engine():
    from proxy.settings import ProxySettings, batch_slots
    from proxy.workers import worker_settings

    whole = ProxySettings(max_num_seqs=256, proxy_workers=4)
    assert batch_slots(whole) == (224, 0)
    assert batch_slots(worker_settings(whole, 0)) == (56, 0)  # of its 64: room left for live
    assert batch_slots(ProxySettings(max_num_seqs=8, proxy_workers=1)) == (7, 0)
    assert batch_slots(ProxySettings(max_num_seqs=1, proxy_workers=1)) == (1, 0)
    assert batch_slots(ProxySettings(max_num_seqs=8, proxy_workers=1, batch_max_slots=20,
                                     batch_slots_beside_live=30)) == (8, 8)
