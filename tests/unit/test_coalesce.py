"""The gateway's connections send a header block and the body after it in one write."""

import asyncio

from proxy.coalesce import HeldHeadTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorded:
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


def on_a_loop(scenario) -> None:
    """Run ``scenario(sent, transport)`` on an event loop, the transport over ``sent``."""
    async def main() -> None:
        sent = Recorded()
        await scenario(sent, HeldHeadTransport(sent, asyncio.get_running_loop()))

    asyncio.run(main())


def test_a_head_and_its_body_go_in_one_write() -> None:
    async def scenario(sent: Recorded, transport: HeldHeadTransport) -> None:
        transport.write(HEAD)
        transport.write(b"{}")
        assert sent.writes == [HEAD + b"{}"]
        await asyncio.sleep(0)
        assert sent.writes == [HEAD + b"{}"]

    on_a_loop(scenario)


def test_a_head_alone_goes_out_on_the_loops_next_turn() -> None:
    async def scenario(sent: Recorded, transport: HeldHeadTransport) -> None:
        transport.write(HEAD)
        assert sent.writes == []
        await asyncio.sleep(0)
        assert sent.writes == [HEAD]
        transport.write(b"data: 1\n\n")
        assert sent.writes == [HEAD, b"data: 1\n\n"]

    on_a_loop(scenario)


def test_other_writes_go_straight_through_in_order() -> None:
    async def scenario(sent: Recorded, transport: HeldHeadTransport) -> None:
        for piece in (b"5\r\nhello\r\n", b"0\r\n\r\n", b"x"):
            transport.write(piece)
        assert sent.writes == [b"5\r\nhello\r\n", b"0\r\n\r\nx"]

    on_a_loop(scenario)


def test_close_sends_what_is_held_first_and_a_closed_connection_gets_nothing() -> None:
    async def scenario(sent: Recorded, transport: HeldHeadTransport) -> None:
        transport.write(HEAD)
        transport.close()
        assert sent.writes == [HEAD] and sent.closed
        transport.write(HEAD)
        await asyncio.sleep(0)
        assert sent.writes == [HEAD]
        assert transport.get_extra_info("peername") == "extra peername"

    on_a_loop(scenario)
