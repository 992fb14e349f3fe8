"""A lean HTTP/1.1 transport to the engine, under httpx's API.

httpx's default transport (httpcore, h11, anyio) parses HTTP in Python and polls every pooled
connection before each request; profiles of the gateway showed it spending more than half its
CPU there on streams. This transport keeps httpx's client API but talks to the one upstream the
gateway has over asyncio protocols with httptools' C parser:

- a LIFO pool of keep-alive connections; a connection the engine closed leaves the pool when
  the loop reports it (no polling);
- idle connections expire before the engine's own keep-alive timeout (vLLM's 5 s by default;
  ``appliance-engine`` gives it a minute, so a stalled gateway still never sends a request
  into a connection the engine is closing); a failed request is a real failure, never retried:
  the engine may have started generating it;
- closing a response before its end closes the connection, which is how the engine learns the
  client is gone and aborts the generation.

The gateway's own path calls ``send`` and reads an ``EngineAnswer``: building httpx's Request
and Response objects (URL parsing, header normalisation, encoding detection) cost a sixth of a
small request's CPU in profiles. ``handle_async_request`` keeps httpx's interface on top of it.
"""

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator

import httptools
import httpx

log = logging.getLogger("appliance.proxy")
READ_PAUSE_BYTES = 1 << 20
# Below uvicorn's (and so vLLM's) default 5 s keep-alive timeout.
KEEPALIVE_EXPIRY_S = 4.0
# Reads are bounded by each request's own deadlines, which the gateway arms around each call.
CONNECT_TIMEOUT_S = 5.0
# Client headers the engine may see; everything else (cookies, the client's key) stays here.
FORWARDED_REQUEST_HEADERS = frozenset({b"content-type", b"accept", b"user-agent"})
FORWARDED_WITH_JSON = FORWARDED_REQUEST_HEADERS - {b"content-type"}
"""A JSON body's content type is the gateway's to say (clients label it as they please)."""


def upstream_headers(client: list[tuple[bytes, bytes]], request_id: str, engine_key: str,
                     json_body: bool) -> list[tuple[bytes, bytes]]:
    if json_body:
        headers = [(k, v) for k, v in client if k in FORWARDED_WITH_JSON]
        headers.append((b"content-type", b"application/json"))
    else:
        headers = [(k, v) for k, v in client if k in FORWARDED_REQUEST_HEADERS]
    headers.append((b"x-request-id", request_id.encode()))
    if engine_key:
        headers.append((b"authorization", b"Bearer " + engine_key.encode()))
    return headers


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.error: Exception | None = None
        self.idle_since = 0.0
        self.paused = False
        self._reset()

    def _reset(self) -> None:
        """Fresh state for the next exchange on this connection."""
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.answering = False
        self.waiter: asyncio.Future | None = None

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.answering = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"bad response from the engine: {exc}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete or self.error is not None:
            return
        if self.answering:
            self._fail(httpx.RemoteProtocolError("the engine closed the connection mid-answer"))
        else:
            self._fail(httpx.RemoteProtocolError(
                "the engine closed the connection before answering"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_PAUSE_BYTES and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # used by the transport and the response stream

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until the parser has news (headers, body, end) or the connection fails."""
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            if timeout is None:
                await self.waiter
            else:
                await asyncio.wait_for(self.waiter, timeout)
        except TimeoutError:
            raise httpx.ReadTimeout("the engine did not answer in time") from None
        finally:
            self.waiter = None

    def take_all(self) -> bytes:
        """Everything received and not yet read, at once: a stream's events that arrived
        together are relayed with one write to the client, never held back for more."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return not self.closed and self.complete and not self.chunks and self.keep_alive

    def start(self, head: bytes, body: bytes) -> None:
        self._reset()
        self.transport.writelines((head, body))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class ResponseStream(httpx.AsyncByteStream):
    def __init__(self, connection: Connection, pool: "EngineTransport",
                 read_timeout: float | None) -> None:
        self.connection = connection
        self.pool = pool
        self.read_timeout = read_timeout
        self.released = False

    async def next_chunk(self) -> bytes:
        """What arrived since the last call, waiting for something if nothing did; ``b""`` at
        the body's end. A coroutine rather than an async generator: each of those is registered
        with the event loop for finalisation, a cost on every request."""
        conn = self.connection
        while True:
            if conn.chunks:
                return conn.take_all()
            if conn.complete:
                await self.aclose()
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait(self.read_timeout)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.next_chunk():
            yield chunk

    async def aclose(self) -> None:
        if self.released:
            return
        self.released = True
        self.pool.release(self.connection)


class EngineAnswer:
    """An engine's answer as the gateway reads it: status, raw headers, the body as it comes."""

    __slots__ = ("content", "headers", "status_code", "stream")

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]],
                 stream: ResponseStream) -> None:
        self.status_code = status_code
        self.headers = headers
        self.stream = stream
        self.content = b""

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self.stream.__aiter__()

    async def aread(self) -> bytes:
        chunks = []
        while chunk := await self.stream.next_chunk():
            chunks.append(chunk)
        self.content = b"".join(chunks)
        return self.content

    def json(self):
        return json.loads(self.content)

    async def aclose(self) -> None:
        await self.stream.aclose()


class EngineTransport(httpx.AsyncBaseTransport):
    """Connections to one host and port; every request's URL must point there."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[Connection] = []

        self.host_header = f"{host}:{port}".encode()

    async def _connect(self, timeout: float | None) -> Connection:
        """A connect that times out is tried once more before it fails: when the gateway's own
        loop runs late (a CPU-starved process), uvloop runs the due timeout before the I/O that
        says the connect succeeded long ago, and the engine was never the problem."""
        loop = asyncio.get_running_loop()

        def connect():
            return asyncio.wait_for(loop.create_connection(Connection, self.host, self.port),
                                    timeout)

        try:
            try:
                _, conn = await connect()
            except TimeoutError:
                log.warning("no connection to the engine within %g s; trying once more", timeout)
                _, conn = await connect()
        except TimeoutError:
            raise httpx.ConnectError(f"cannot connect to the engine: no connection within "
                                     f"{timeout:g} s, twice") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to the engine: {exc}") from None
        return conn

    def _idle_connection(self) -> Connection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE_EXPIRY_S:
                return conn
            conn.close()
        return None

    def release(self, conn: Connection) -> None:
        if conn.reusable():
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.close()

    async def send(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes, connect_timeout: float | None,
                   read_timeout: float | None) -> EngineAnswer:
        """Send one request and wait for the answer's headers (httpx errors on failure)."""
        conn = self._idle_connection() or await self._connect(connect_timeout)
        conn.start(request_head(method, target, self.host_header, headers, body), body)
        try:
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(read_timeout)
        except BaseException:
            conn.close()
            raise
        return EngineAnswer(conn.parser.get_status_code(), conn.headers,
                            ResponseStream(conn, self, read_timeout))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        headers = [(k, v) for k, v in request.headers.raw
                   if k.lower() not in (b"host", b"content-length")]
        body = request.content
        try:
            answer = await self.send(request.method.encode(), request.url.raw_path, headers,
                                     body, timeouts.get("connect"), timeouts.get("read"))
        except httpx.HTTPError as exc:
            exc.request = request
            raise
        return httpx.Response(answer.status_code, headers=answer.headers, stream=answer.stream,
                              request=request, extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def request_head(method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]],
                 body: bytes) -> bytes:
    """The request line and headers, with ``Host`` and the body's length (none for a bodiless
    GET, as httpx sends it)."""
    lines = [b"%s %s HTTP/1.1" % (method, target), b"host: " + host]
    if body or method != b"GET":
        lines.append(b"content-length: %d" % len(body))
    lines += [b"%s: %s" % (name, value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"
