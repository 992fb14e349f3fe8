"""Fair admission: which waiting request gets the next free engine slot.

vLLM runs at most ``max_num_seqs`` sequences at once and queues the rest first come, first
served; its priority scheduling does not pre-empt a running request, so once its batch is full
one key's flood decides everyone's order. The gateway therefore keeps the engine's queue empty:
it admits at most ``capacity`` sequences to the engine and holds the rest here, one queue per
key. A request takes as many slots as it asks the engine for sequences (``n``, ``best_of``, a
list of prompts): vLLM counts each against ``max_num_seqs``, and so does the queue.

The order is start-time fair queueing over requests. Each key carries a virtual finish tag; a
request admitted from it starts at ``max(key's tag, clock)`` and advances the key's tag by
``size / weight``. The next free slot goes to the waiting key with the smallest start, so keys share
slots in proportion to their weights, and a key that was idle re-enters at the clock instead of
spending credit it banked while away. The unit is a sequence, not a token: the scarce thing at
admission is a batch slot, and a request's length is unknown until it ends (tokens are bounded
by the key's TPM limit and quota instead).

Why ``max_num_seqs`` and not an adaptive signal from vLLM's ``/metrics``: when the KV cache
rather than the batch is what runs out, vLLM pre-empts and recomputes running sequences instead
of refusing them, so ``num_requests_running`` still never exceeds ``max_num_seqs`` and what
waits inside vLLM is at most what the gateway let in, in the gateway's fair order.

A key's ``max_concurrent`` caps its sequences at the engine; a request larger than that, or
than ``capacity``, could never run and is refused before it queues (the caller checks
``fits``); its queue is bounded so that one key
can never hold all of the gateway's memory guard (``QueueFull``: the caller answers 429).

Background work (batch lines, ``proxy/batch/``) runs in a priority class below every key's live
traffic: a ``Tenant`` with ``background`` set queues in a lane of its own (apart from the same
key's live lane), and a background lane is served only when no live lane is eligible, so an
interactive request that arrives while batch lines run gets the next free slot. Background
lanes never hold more than ``background_cap`` slots together (room is left for live traffic
that arrives while they run: vLLM does not pre-empt), and among themselves they share by the
same start-time fair order, so one key's large batch cannot starve another key's small one.

While live traffic runs (a live request holds a slot or waits for one, or one ended less than
``live_linger_s`` ago) background lanes may take slots only up to ``background_beside_live``
(0: none): every sequence in vLLM's batch lengthens each step, so a batch that filled the
engine while it was idle gives way, a line at a time as its running lines end, when
interactive users come, and fills it again once they have been gone ``live_linger_s`` (a key's
requests one after another leave gaps between them: the linger bridges those).

With several workers, a batch runs in one of them, while live traffic on the same engine may
run in the others, whose queues this one cannot see: a ``board`` (``liveboard.py``, one
float per worker and engine in a file they share) tells it. This queue writes its own
``live_until`` there only when its live traffic starts (``inf``) and when its last live
request ends (the end of the linger), never per request; it reads the others' only when
background work asks for a slot, and while background work waits on nothing but their live
traffic it looks again every ``BOARD_POLL_S`` (no release here will wake it).

Each slot notes on the wall clock when its request asked for its turn and when it got it, at
the moment the turn is given (the waiter resumes later): the access log's account of who waited
and who went first.
"""

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

BOARD_POLL_S = 0.25
"""How often background work held back by other workers' live traffic looks at the board."""


class QueueFull(Exception):
    """The key already has as many requests waiting as it may."""


class Stamps(Protocol):
    """Where a slot notes when its request asked for its turn and when it got it."""

    queued: float | None
    admitted: float | None


@dataclass(slots=True)
class Unstamped:
    queued: float | None = None
    admitted: float | None = None


class Tenant(NamedTuple):
    """What admission needs to know of a key: its name and its share."""

    name: str
    weight: float = 1.0
    max_concurrent: int | None = None
    background: bool = False
    """Batch work: served only when no live request is eligible, within ``background_cap``."""


@dataclass(eq=False)
class Lane:
    """One key's queue (live or background) and its place in the fair order."""

    name: str
    weight: float = 1.0
    max_concurrent: int | None = None
    background: bool = False
    waiting: deque[tuple[int, asyncio.Future, Stamps, int]] = field(default_factory=deque)
    running: int = 0
    finish: float = 0.0

    def room_for(self, size: int) -> bool:
        return self.max_concurrent is None or self.running + size <= self.max_concurrent

    def eligible(self) -> bool:
        return bool(self.waiting) and self.room_for(self.waiting[0][3])


@dataclass(frozen=True)
class Observer:
    """Callbacks to the metrics, so this module stays free of Prometheus."""

    depth: Callable[[str, int], None] = lambda key, depth: None
    waited: Callable[[str, float], None] = lambda key, seconds: None
    in_use: Callable[[int], None] = lambda slots: None


class Board(Protocol):
    """The other workers' live traffic on this queue's engine (``liveboard.Seat``)."""

    def post(self, live_until: float) -> None:
        """Publish this queue's ``live_until`` (``inf``: live traffic runs or waits)."""

    def others_until(self) -> float:
        """The latest ``live_until`` the other workers published."""


class FairQueue:
    def __init__(self, capacity: int, max_queued_per_key: int,
                 observer: Observer | None = None, background_cap: int | None = None,
                 background_beside_live: int | None = None,
                 live_linger_s: float = 1.0, board: Board | None = None) -> None:
        if capacity < 1 or max_queued_per_key < 0:
            raise ValueError("capacity must be positive and the per-key queue bound not negative")
        self.capacity = capacity
        self.background_cap = capacity if background_cap is None \
            else max(1, min(background_cap, capacity))
        self.background_beside_live = self.background_cap if background_beside_live is None \
            else max(0, min(background_beside_live, self.background_cap))
        self.gives_way = self.background_beside_live != self.background_cap
        """Live traffic limits background work: only then is it tracked (linger, board)."""
        self.live_linger_s = live_linger_s
        self.live_until = 0.0
        """Until when (monotonic) the last live request to end counts as live traffic still."""
        self.board = board if self.gives_way else None
        """Nobody reads it when live traffic does not limit background work."""
        self.board_idle = self.board is not None
        """The board shows no live traffic here: the next live request must post its start
        (always False without a board, so that a live admission costs one test)."""
        self.recheck: asyncio.TimerHandle | None = None
        self.background_running = 0
        self.max_queued_per_key = max_queued_per_key
        self.observe = observer or Observer()
        self.lanes: dict[tuple[str, bool], Lane] = {}
        self.running = 0
        self.stalled = False
        """The next request in the fair order waits for more slots than are free: nobody else
        is let in before it (a stream of small requests would keep it waiting for ever)."""
        self.clock = 0.0
        self.background_clock = 0.0
        """Background lanes keep a virtual clock of their own: a batch's long run must not
        move live keys' clock on (it would erase their order among themselves)."""
        self.arrivals = itertools.count()
        self.waiting = {False: 0, True: 0}
        """Requests waiting, live (False) and background (True): a release with nobody waiting
        (the common case) dispatches nothing, and a batch line sees at once whether a live one
        waits, without a walk over every key's lane."""

    def queued(self, name: str, background: bool = False) -> int:
        lane = self.lanes.get((name, background))
        return len(lane.waiting) if lane else 0

    def fits(self, tenant: Tenant, size: int) -> bool:
        """Whether ``size`` sequences can ever run at once for this key: a larger request
        would wait forever, and is refused instead."""
        most = self.background_cap if tenant.background else self.capacity
        return size <= most and (tenant.max_concurrent is None
                                 or size <= tenant.max_concurrent)

    def slot(self, tenant: Tenant, stamps: Stamps | None = None, size: int = 1) -> "Slot":
        """``async with queue.slot(tenant, size=n)``: hold ``n`` engine slots (one a sequence),
        waiting fairly for them; ``fits`` must hold."""
        return Slot(self, self._lane(tenant), stamps or Unstamped(), size)

    def _lane(self, tenant: Tenant) -> Lane:
        lane = self.lanes.get((tenant.name, tenant.background))
        if lane is None:
            lane = self.lanes[tenant.name, tenant.background] = Lane(
                tenant.name, background=tenant.background, finish=self._clock(tenant.background))
        lane.weight, lane.max_concurrent = tenant.weight, tenant.max_concurrent
        return lane

    def _try_admit(self, lane: Lane, size: int) -> bool:
        """Take free slots at once when nobody of this key is waiting ahead of it."""
        if not (lane.waiting or self.stalled) and self.running + size <= self.capacity \
                and lane.room_for(size) and (not lane.background or self._background_may(size)):
            self._admit(lane, size)
            return True
        return False

    def _background_may(self, size: int) -> bool:
        """Background work goes only within its cap and while no live request waits its turn."""
        return self.background_running + size <= self.background_cap_now() \
            and not self.waiting[False]

    def background_cap_now(self) -> int:
        """The slots background lanes may hold now: fewer while live traffic runs."""
        if not self.gives_way:
            return self.background_cap
        if self.running > self.background_running or self.waiting[False] \
                or time.monotonic() < self.live_until_anywhere():
            return self.background_beside_live
        return self.background_cap

    def live_until_anywhere(self) -> float:
        """Until when live traffic counts, here or in another worker (``inf``: it runs)."""
        if self.board is None:
            return self.live_until
        return max(self.live_until, self.board.others_until())

    def _recheck_when_live_gone(self) -> None:
        """Background work held back only by the linger of live traffic gone from here, or by
        other workers' live traffic: look again when the linger ends, or soon while theirs
        runs (no release here may come to trigger a dispatch)."""
        if self.recheck is None and self.running == self.background_running \
                and not self.waiting[False]:
            until = self.live_until_anywhere()
            delay = BOARD_POLL_S if until == math.inf else max(0.0, until - time.monotonic())
            self.recheck = asyncio.get_running_loop().call_later(delay, self._rechecked)

    def _rechecked(self) -> None:
        self.recheck = None
        self._dispatch()

    async def _wait(self, lane: Lane, stamps: Stamps, size: int) -> None:
        if len(lane.waiting) >= self.max_queued_per_key:
            raise QueueFull(lane.name)
        loop = asyncio.get_running_loop()
        granted = loop.create_future()
        entry = (next(self.arrivals), granted, stamps, size)
        stamps.queued = time.time()
        self._enqueue(lane, entry)
        self._dispatch()  # it may head the fair order, and stall it until its slots are free
        queued_at = loop.time()
        try:
            await granted
        except asyncio.CancelledError:
            if not granted.cancelled():
                stamps.admitted = None  # granted just as the waiter gave up: hand the slot on
                self._release(lane, size)
            elif entry in lane.waiting:
                self._dequeue(lane, entry)
                self._dispatch()  # whoever queued behind it may fit now
            if not lane.background:
                self._linger_if_live_gone()
            raise
        self.observe.waited(lane.name, loop.time() - queued_at)

    def _enqueue(self, lane: Lane, entry: tuple) -> None:
        lane.waiting.append(entry)
        self.waiting[lane.background] += 1
        if self.board_idle and not lane.background:
            self._post_live()
        self.observe.depth(lane.name, len(lane.waiting))

    def _dequeue(self, lane: Lane, entry: tuple | None = None) -> None:
        """Take ``entry`` (by default the lane's first) out of the lane's queue."""
        if entry is None:
            lane.waiting.popleft()
        else:
            lane.waiting.remove(entry)
        self.waiting[lane.background] -= 1
        self.observe.depth(lane.name, len(lane.waiting))

    def _clock(self, background: bool) -> float:
        return self.background_clock if background else self.clock

    def _admit(self, lane: Lane, size: int) -> None:
        start = max(lane.finish, self._clock(lane.background))
        lane.finish = start + size / lane.weight
        if lane.background:
            self.background_clock = start
        else:
            self.clock = start
            if self.board_idle:
                self._post_live()
        lane.running += size
        self.running += size
        if lane.background:
            self.background_running += size
        self.observe.in_use(self.running)

    def _release(self, lane: Lane, size: int) -> None:
        lane.running -= size
        self.running -= size
        if lane.background:
            self.background_running -= size
        else:
            self._linger_if_live_gone()
        self.observe.in_use(self.running)
        self._dispatch()

    def _post_live(self) -> None:
        """Live traffic starts here: the other workers' background work gives way to it."""
        self.board.post(math.inf)
        self.board_idle = False

    def _linger_if_live_gone(self) -> None:
        """A live request left: if it was the last here (none runs or waits), live traffic
        lingers from now, and the board shows until when. Under live load most releases skip
        the clock."""
        if self.gives_way and self.running == self.background_running \
                and not self.waiting[False]:
            self.live_until = time.monotonic() + self.live_linger_s
            if not self.board_idle and self.board is not None:
                self.board.post(self.live_until)
                self.board_idle = True

    def _dispatch(self) -> None:
        """Fill free slots from the eligible key whose next request starts earliest, live keys
        before background ones. When that request needs more slots than are free, nobody
        passes it: smaller requests behind it would otherwise keep a large one waiting for
        ever. A background request over the background cap waits without stalling live ones."""
        self.stalled = False
        while self.running < self.capacity and (self.waiting[False] or self.waiting[True]):
            ready = [lane for lane in self.lanes.values()
                     if lane.eligible() and not lane.background]
            if not ready:
                ready = [lane for lane in self.lanes.values()
                         if lane.eligible() and lane.background]
            if not ready:
                return
            clock = self._clock(ready[0].background)
            lane = min(ready, key=lambda ln: (max(ln.finish, clock), ln.waiting[0][0]))
            _, granted, stamps, size = lane.waiting[0]
            if granted.cancelled():
                self._dequeue(lane)  # its waiter is leaving and takes no slot
                continue
            if lane.background and self.background_running + size > self.background_cap_now():
                if self.background_running + size <= self.background_cap:
                    self._recheck_when_live_gone()
                return
            if self.running + size > self.capacity:
                self.stalled = True
                return
            self._dequeue(lane)
            self._admit(lane, size)
            stamps.admitted = time.time()
            granted.set_result(None)


class Slot:
    """One request's hold on an engine slot; a class, not a generator: it is on every request."""

    __slots__ = ("lane", "queue", "size", "stamps")

    def __init__(self, queue: FairQueue, lane: Lane, stamps: Stamps, size: int = 1) -> None:
        self.queue, self.lane, self.stamps, self.size = queue, lane, stamps, size

    async def __aenter__(self) -> None:
        if self.queue._try_admit(self.lane, self.size):
            self.stamps.queued = self.stamps.admitted = time.time()
        else:
            await self.queue._wait(self.lane, self.stamps, self.size)

    async def __aexit__(self, *exc_info: object) -> None:
        self.queue._release(self.lane, self.size)


class Unqueued:
    """A request that takes no engine slot (routes that do not generate): let in at once."""

    __slots__ = ("stamps",)

    def __init__(self, stamps: Stamps) -> None:
        self.stamps = stamps

    async def __aenter__(self) -> None:
        self.stamps.admitted = time.time()

    async def __aexit__(self, *exc_info: object) -> None:
        pass
