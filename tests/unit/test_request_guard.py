"""A plain request's guard: its deadline and its watch for a hang-up, on one timer."""

import asyncio

import pytest

from proxy.gateway import CancelledOnDisconnect, ClientGone


def client(leaves_after_s: float | None):
    """An ASGI ``receive`` whose client hangs up after ``leaves_after_s`` (None: never), and
    how often it was called (0: nobody watched)."""
    calls = []

    async def receive() -> dict:
        calls.append(1)
        if leaves_after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(leaves_after_s)
        return {"type": "http.disconnect"}

    return receive, calls


def test_the_deadline_raises_timeout_and_leaves_the_task_usable():
    async def main() -> None:
        receive, _ = client(None)
        with pytest.raises(TimeoutError):
            async with CancelledOnDisconnect(receive, 0.01, total_s=0.05):
                await asyncio.sleep(5)
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0.01)  # not cancelled again

    asyncio.run(main())


def test_work_done_in_time_is_left_alone():
    async def main() -> str:
        receive, calls = client(None)
        async with CancelledOnDisconnect(receive, 0.01, total_s=1.0):
            await asyncio.sleep(0.03)
        await asyncio.sleep(1.1)  # the deadline's timer is gone with the block
        assert calls == [1]  # watched from 10 ms on
        return "done"

    assert asyncio.run(main()) == "done"


def test_a_deadline_sooner_than_the_watch_needs_no_watch():
    async def main() -> list:
        receive, calls = client(None)
        with pytest.raises(TimeoutError):
            async with CancelledOnDisconnect(receive, 0.05, total_s=0.01):
                await asyncio.sleep(5)
        return calls

    assert asyncio.run(main()) == []


@pytest.mark.parametrize("leaves_after_s", [0.0, 0.1])
def test_a_client_that_leaves_before_the_deadline_is_client_gone(leaves_after_s):
    async def main() -> None:
        receive, _ = client(leaves_after_s)
        with pytest.raises(ClientGone):
            async with CancelledOnDisconnect(receive, 0.01, total_s=5.0):
                await asyncio.sleep(5)
        assert asyncio.current_task().cancelling() == 0

    asyncio.run(main())


def test_an_outside_cancel_is_not_taken_for_the_deadline():
    async def main() -> None:
        receive, _ = client(None)
        async with CancelledOnDisconnect(receive, 0.01, total_s=5.0):
            await asyncio.sleep(5)

    async def outer() -> None:
        task = asyncio.ensure_future(main())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(outer())
