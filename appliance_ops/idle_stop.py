"""appliance-idle-stop: run once by appliance-idle-stop.timer; powers the instance off when
it has been idle for APPLIANCE_IDLE_STOP_MINUTES (see idle.py for what idle means).

Launched with "stop" as its shutdown behaviour, a stopped instance costs only its EBS volume
until the operator starts it again.
"""

import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .idle import Activity, activity_from_metrics, decide, established_connections
from .settings import OpsSettings, load_settings

TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
log = logging.getLogger("appliance.idle-stop")


def gateway_activity(settings: OpsSettings) -> Activity | None:
    try:
        response = httpx.get(settings.gateway_url + "/metrics", timeout=5)
        response.raise_for_status()
        return activity_from_metrics(response.text)
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("cannot read the gateway's activity: %s", exc)
        return None


def ssh_sessions(port: int) -> int:
    tables = [path.read_text() for path in TCP_TABLES if path.exists()]
    return established_connections(tables, port)


def main(argv: list[str] | None = None) -> int:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    if settings.idle_stop_minutes <= 0:
        log.info("idle stop is off (APPLIANCE_IDLE_STOP_MINUTES is 0)")
        return 0
    verdict = decide(gateway_activity(settings), ssh_sessions(settings.ssh_port), time.time(),
                     settings.idle_stop_minutes, settings.idle_stop_ignores_batches)
    log.info("%s", verdict.reason)
    if not verdict.stop:
        return 0
    return subprocess.run(shlex.split(settings.idle_stop_command), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
