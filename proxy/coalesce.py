"""One send per answer: uvicorn writes a response's head and its body separately.

uvicorn's HTTP protocol writes the status line and headers the moment the app starts its answer,
and the body in a second write: two system calls and two TCP segments per small answer, about a
tenth of a small request's CPU in the gateway. Here a write that ends a header block is held
until the next write on the connection, or until the loop's next turn, whichever comes first;
every other write goes straight through, so streamed events are not delayed.
"""

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_END = b"\r\n\r\n"


class HeldHeadTransport:
    """The connection's transport, holding back a header block for the body that follows it."""

    __slots__ = ("held", "loop", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self.held
        if held is not None:
            self.held = None
            self.transport.write(held + data)
        elif data.endswith(HEAD_END):
            self.held = data
            self.loop.call_soon(self.flush)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        held = self.held
        self.held = None
        if held is not None and not self.transport.is_closing():
            self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:  # uvicorn asks after every answer: not through __getattr__
        return self.transport.is_closing()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a transport that sends a small answer in one write."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeldHeadTransport(transport, self.loop))  # type: ignore[arg-type]
