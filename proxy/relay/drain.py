"""Draining: the appliance is about to go away (a spot interruption notice), so it takes no
new work but lets what is running finish.

One flag, set once: ``/ready`` answers 503 from then on (a load balancer stops routing here),
and new generation requests get 503 ``engine_unavailable`` with ``Retry-After``, while
requests already inside run to their end. Only a restart clears it, which on a spot instance
means a new boot.
"""

import asyncio
import logging
import time

import httpx

from ..protocol.errors import ProxyError, engine_unavailable

log = logging.getLogger("appliance.proxy")
RETRY_AFTER_S = 30
RELAYED = "x-appliance-drain-relayed"
"""Marks a drain passed on by a sibling worker, which is not passed on again."""


async def tell_siblings(host: str, ports: list[int], reason: str) -> None:
    """Each worker keeps its own flag; the one asked passes the drain on to the others, so
    ``POST /drain`` to the gateway's port drains all of it. A sibling that does not answer
    (restarting) is asked again by the spot watcher's next call."""
    async with httpx.AsyncClient(timeout=2.0) as client:
        answers = await asyncio.gather(
            *(client.post(f"http://{host}:{port}/drain", json={"reason": reason},
                          headers={RELAYED: "1"}) for port in ports), return_exceptions=True)
    for port, answer in zip(ports, answers, strict=True):
        if isinstance(answer, Exception):
            log.warning("could not pass the drain on to the worker on port %d: %s", port, answer)


class Drain:
    def __init__(self) -> None:
        self.reason: str | None = None
        self.since: float | None = None

    @property
    def active(self) -> bool:
        return self.reason is not None

    def begin(self, reason: str) -> None:
        if self.reason is None:
            self.reason, self.since = reason, time.time()
            log.warning("draining (%s): /ready answers 503 and new generation requests are "
                        "refused; requests in flight may finish", reason)

    def refusal(self) -> ProxyError:
        err = engine_unavailable(f"The appliance is shutting down ({self.reason}); "
                                 "retry on another instance.")
        err.headers["Retry-After"] = str(RETRY_AFTER_S)
        return err
