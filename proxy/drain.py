"""Draining: the appliance is about to go away (a spot interruption notice), so it takes no
new work but lets what is running finish.

One flag, set once: ``/ready`` answers 503 from then on (a load balancer stops routing here),
and new generation requests get 503 ``engine_unavailable`` with ``Retry-After``, while
requests already inside run to their end. Only a restart clears it, which on a spot instance
means a new boot.
"""

import logging
import time

from .errors import ProxyError, engine_unavailable

log = logging.getLogger("appliance.proxy")
RETRY_AFTER_S = 30


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
