"""The idle deadline between stream chunks: only time spent awaiting the engine counts."""

import asyncio

import pytest

from proxy.relay.forward import IdleWatch

IDLE_S = 0.2


async def relay(steps: list[tuple[str, float]]) -> None:
    """Alternate awaiting the engine and writing to the client for the given times."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as deadline:
        watch = IdleWatch(deadline, IDLE_S, loop)
        try:
            for state, seconds in steps:
                if state == "engine":
                    watch.awaiting_engine()
                else:
                    watch.writing_to_client()
                await asyncio.sleep(seconds)
        finally:
            watch.close()


def test_an_engine_silent_past_the_idle_deadline_times_out():
    with pytest.raises(TimeoutError):
        asyncio.run(relay([("engine", 0.05), ("client", 0.0), ("engine", 1.0)]))


def test_steady_chunks_never_time_out_however_long_the_stream():
    asyncio.run(relay([("engine", IDLE_S / 4), ("client", 0.0)] * 12))


def test_a_slow_client_write_does_not_count_as_engine_silence():
    asyncio.run(relay([("engine", 0.05), ("client", 3 * IDLE_S), ("engine", IDLE_S / 2)]))


def test_a_timer_firing_after_the_stream_ended_is_harmless():
    async def main() -> None:
        async with asyncio.timeout(None) as deadline:
            watch = IdleWatch(deadline, 0.05, asyncio.get_running_loop())
            watch.awaiting_engine()
        await asyncio.sleep(0.2)  # the timer fires after the block: nothing raises
        watch.close()

    asyncio.run(main())
