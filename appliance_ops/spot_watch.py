"""appliance-spot-watch: polls IMDSv2 for a spot interruption notice every
APPLIANCE_SPOT_POLL_INTERVAL_S (5 s); on one, tells the gateway to drain (``POST /drain``):
``/ready`` turns 503 so a load balancer stops routing, new generation requests get 503 with
Retry-After, and requests already in flight finish. It tells the gateway again on every poll
while the notice stands, so a gateway that restarts meanwhile drains too.
"""

import asyncio
import logging
import sys

import httpx

from .settings import OpsSettings, load_settings
from .spot import Imds, Notice

log = logging.getLogger("appliance.spot-watch")


async def drain_gateway(client: httpx.AsyncClient, settings: OpsSettings, notice: Notice) -> bool:
    try:
        response = await client.post(settings.gateway_url + "/drain",
                                     json={"reason": notice.reason})
        return response.status_code == 200
    except httpx.HTTPError as exc:
        log.warning("could not reach the gateway to drain it: %s", exc)
        return False


async def watch(settings: OpsSettings) -> None:
    seen: Notice | None = None
    unreachable = False
    async with httpx.AsyncClient(timeout=2.0) as client:
        imds = Imds(client, settings.imds_url)
        while True:
            try:
                notice = await imds.instance_action()
                unreachable = False
            except (httpx.HTTPError, ValueError) as exc:
                if not unreachable:
                    log.warning("IMDS unavailable (%s); still polling", exc)
                unreachable = True
                notice = None
            if notice is not None:
                if notice != seen:
                    log.warning("%s: draining the gateway; in-flight requests may finish, "
                                "new generation requests are refused", notice.reason)
                    seen = notice
                await drain_gateway(client, settings, notice)
            await asyncio.sleep(settings.spot_poll_interval_s)


def main(argv: list[str] | None = None) -> int:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    log.info("watching %s for spot interruption notices every %gs", settings.imds_url,
             settings.spot_poll_interval_s)
    asyncio.run(watch(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
