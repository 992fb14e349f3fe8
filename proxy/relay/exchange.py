"""One client request on its way through the gateway, as one object.

The gateway's handlers and the forwarder need the same dozen facts about a request: what to
send the engine, when to give up, how to reach the client, and what to write in the access log.
Passing them one by one made every signature ten values long; an ``Exchange`` is built once,
after the request is authenticated and checked, and travels down instead.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..observe.accesslog import RequestRecord
from ..protocol.routes import CHAT, Route
from ..tenancy.admission import Tenant
from ..tenancy.deadlines import Deadlines
from .engines import Engine

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


def answer_start(record: RequestRecord, status: int, headers: Headers) -> dict[str, Any]:
    """The start of an answer from the gateway: it carries the request's id, and the record
    notes its status (the app's other routes get both from a wrapper around ``send``, which
    would cost an extra call on every one of a stream's writes)."""
    record.status = status
    return {"type": "http.response.start", "status": status,
            "headers": [*headers, (b"x-request-id", record.request_id.encode())]}


async def send_answer(send: Send, record: RequestRecord, status: int, headers: Headers,
                      body: bytes) -> None:
    """A whole answer at once: its start (``answer_start``), then its body."""
    await send(answer_start(record, status, headers))
    await send({"type": "http.response.body", "body": body})


@dataclass(slots=True, eq=False)
class Exchange:
    engine: Engine
    """The engine it goes to (``Engines.engine_for``): its pool, its slots."""
    tenant: Tenant
    """The key it runs under, as fair admission sees it."""
    method: str
    path: str
    query: bytes
    upstream_headers: Headers
    """What the engine sees: the few client headers it may, the request id, the internal key."""
    content: bytes
    """The body sent to the engine: the client's own bytes unless the gateway had to add to it."""
    deadlines: Deadlines
    record: RequestRecord
    receive: Receive
    send: Send
    answer_headers: Headers = field(default_factory=list)
    """Added to every answer the client gets, errors included (``x-ratelimit-*``)."""
    strip_final_usage: bool = False
    """The gateway asked a stream for usage on the client's behalf: drop the usage-only chunk."""
    strip_chunk_usage: bool = False
    """... and for the running count on every chunk: cut it out of each before relaying."""
    route: Route = CHAT
    """What the route is (``protocol.routes``): its error shape, how its stream reports usage."""
    sequences: int = 1
    """Engine slots it holds: one a sequence it asks for."""

    async def answer(self, status: int, headers: Headers, body: bytes) -> None:
        """A whole answer at once, with the exchange's own headers added."""
        await send_answer(self.send, self.record, status, [*headers, *self.answer_headers], body)
