"""Fair admission without I/O: who gets the next engine slot, and what a waiter may do."""

import asyncio

import pytest

from proxy.tenancy.admission import FairQueue, QueueFull, Tenant, Unstamped


async def hold(queue: FairQueue, tenant: Tenant, order: list[str], release: asyncio.Event,
               stamps: Unstamped | None = None) -> None:
    async with queue.slot(tenant, stamps):
        order.append(tenant.name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


def test_free_slots_are_taken_at_once_and_the_rest_wait():
    async def main():
        queue, order, gate = FairQueue(2, 10), [], asyncio.Event()
        tasks = [asyncio.create_task(hold(queue, Tenant("a"), order, gate)) for _ in range(3)]
        await settle()
        assert order == ["a", "a"] and queue.queued("a") == 1
        gate.set()
        await asyncio.gather(*tasks)
        assert order == ["a", "a", "a"] and queue.running == 0
    run(main())


async def served_order(queue: FairQueue, backlog: dict[Tenant, int], held: int) -> list[str]:
    """Fill the slots with ``held`` requests of a blocker, queue ``backlog``, then release one
    request at a time and return the order in which the backlog was served."""
    order: list[str] = []
    blocker = Tenant("blocker")
    gates = [asyncio.Event() for _ in range(held)]
    blockers = [asyncio.create_task(hold(queue, blocker, [], g)) for g in gates]
    await settle()
    waiting = []
    for tenant, count in backlog.items():
        for _ in range(count):
            done = asyncio.Event()
            done.set()
            waiting.append(asyncio.create_task(hold(queue, tenant, order, done)))
    await settle()
    for gate in gates:
        gate.set()
    await asyncio.gather(*blockers, *waiting)
    return order


def test_a_flood_does_not_delay_a_quiet_key_behind_it():
    async def main():
        queue = FairQueue(1, 100)
        order = await served_order(queue, {Tenant("noisy"): 20, Tenant("quiet"): 2}, held=1)
        assert order.index("quiet") <= 1
        assert [n for n in order[:4]].count("quiet") == 2
    run(main())


def test_slots_are_shared_in_proportion_to_weight():
    async def main():
        queue = FairQueue(1, 100)
        heavy, light = Tenant("heavy", weight=3), Tenant("light", weight=1)
        order = await served_order(queue, {heavy: 30, light: 30}, held=1)
        first = order[:20]
        assert 14 <= first.count("heavy") <= 16
    run(main())


def test_an_idle_key_does_not_bank_credit():
    """A key that was away re-enters at the current clock, not with its old low tag."""
    async def main():
        queue, gate = FairQueue(1, 100), asyncio.Event()
        gate.set()
        for _ in range(50):  # "busy" runs alone for a while; "late" is absent
            await hold(queue, Tenant("busy"), [], gate)
        order = await served_order(queue, {Tenant("busy"): 10, Tenant("late"): 10}, held=1)
        assert order[:10].count("late") <= 6
    run(main())


def test_max_concurrent_caps_a_key_while_others_use_the_rest():
    async def main():
        queue, order, gate = FairQueue(4, 10), [], asyncio.Event()
        capped = Tenant("capped", max_concurrent=1)
        tasks = [asyncio.create_task(hold(queue, capped, order, gate)) for _ in range(3)]
        tasks += [asyncio.create_task(hold(queue, Tenant("free"), order, gate)) for _ in range(3)]
        await settle()
        assert sorted(order) == ["capped", "free", "free", "free"]
        assert queue.queued("capped") == 2
        gate.set()
        await asyncio.gather(*tasks)
        assert queue.running == 0
    run(main())


def test_a_full_key_queue_refuses_only_that_key():
    async def main():
        queue, gate = FairQueue(1, 2), asyncio.Event()
        tasks = [asyncio.create_task(hold(queue, Tenant("a"), [], gate)) for _ in range(3)]
        await settle()
        with pytest.raises(QueueFull):
            async with queue.slot(Tenant("a")):
                pass
        other = asyncio.create_task(hold(queue, Tenant("b"), [], gate))
        await settle()
        assert queue.queued("b") == 1
        gate.set()
        await asyncio.gather(*tasks, other)
    run(main())


def test_a_waiter_that_gives_up_leaves_the_queue_and_takes_no_slot():
    async def main():
        queue, order, gate = FairQueue(1, 10), [], asyncio.Event()
        holder = asyncio.create_task(hold(queue, Tenant("a"), order, gate))
        await settle()
        quitter = asyncio.create_task(hold(queue, Tenant("b"), order, gate))
        await settle()
        quitter.cancel()
        await settle()
        assert queue.queued("b") == 0
        gate.set()
        await holder
        assert queue.running == 0 and order == ["a"]
        async with queue.slot(Tenant("c")):
            assert queue.running == 1
    run(main())


def test_a_waiter_cancelled_as_it_is_granted_hands_the_slot_on():
    async def main():
        queue, order, gate = FairQueue(1, 10), [], asyncio.Event()
        holder = asyncio.create_task(hold(queue, Tenant("a"), order, gate))
        await settle()
        unlucky = asyncio.create_task(hold(queue, Tenant("b"), order, gate))
        next_one = asyncio.create_task(hold(queue, Tenant("c"), order, gate))
        await settle()
        gate.set()
        await asyncio.sleep(0)  # holder leaves: "b" is granted but has not run yet
        unlucky.cancel()
        await asyncio.gather(holder, next_one)
        assert "b" not in order and order[-1] == "c" and queue.running == 0
    run(main())


def test_a_timeout_while_waiting_leaves_the_queue_clean():
    async def main():
        queue, gate = FairQueue(1, 10), asyncio.Event()
        holder = asyncio.create_task(hold(queue, Tenant("a"), [], gate))
        await settle()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01), queue.slot(Tenant("b")):
                pass
        assert queue.queued("b") == 0
        gate.set()
        await holder
        assert queue.running == 0
    run(main())


def test_slots_note_when_each_request_queued_and_when_its_turn_was_given():
    """On the wall clock, so that the access log orders requests: a request let in at once is
    noted as queued and let in at the same instant, a waiter when its turn is given."""
    async def main():
        queue, gate = FairQueue(2, 10), asyncio.Event()
        first, second = Unstamped(), Unstamped()
        holders = [asyncio.create_task(hold(queue, Tenant("a"), [], gate, stamps))
                   for stamps in (first, second)]
        await settle()
        assert first.queued == first.admitted and second.queued == second.admitted
        waiters = [Unstamped(), Unstamped()]
        tasks = [asyncio.create_task(hold(queue, Tenant(name), [], asyncio.Event(), stamps))
                 for name, stamps in zip("bc", waiters, strict=True)]
        await settle()
        assert all(w.queued is not None and w.admitted is None for w in waiters)
        gate.set()
        await asyncio.gather(*holders)
        b, c = waiters
        assert b.queued <= c.queued <= b.admitted <= c.admitted
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    run(main())


def test_a_refused_or_cancelled_request_is_not_noted_as_let_in():
    async def main():
        queue, gate = FairQueue(1, 1), asyncio.Event()
        holder = asyncio.create_task(hold(queue, Tenant("a"), [], gate))
        await settle()
        unlucky, refused = Unstamped(), Unstamped()
        task = asyncio.create_task(hold(queue, Tenant("a"), [], gate, unlucky))
        await settle()
        with pytest.raises(QueueFull):
            async with queue.slot(Tenant("a"), refused):
                pass
        assert refused == Unstamped()
        gate.set()
        await asyncio.sleep(0)  # holder leaves: the waiter is granted but has not run yet
        assert unlucky.admitted is not None
        task.cancel()
        await asyncio.gather(holder, task, return_exceptions=True)
        assert unlucky.admitted is None and queue.running == 0
    run(main())
