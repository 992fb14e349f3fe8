"""Pure: is the appliance idle long enough to power off? And the facts that decide it, read
from the gateway's metrics and the kernel's TCP table, without any I/O of their own.

Idle means: no generation request answered for the idle period (the gateway's
``appliance_last_generation_timestamp_seconds``, which starts at the gateway's start), nothing
inside the gateway now (``appliance_requests_in_flight``: open streams and queued requests
included), no batch line still to run (``appliance_batch_lines_queued``: a batch waiting for
the appliance to be idle is work; ``APPLIANCE_IDLE_STOP_IGNORES_BATCHES`` powers off anyway,
and the batch resumes at the next boot), and no established SSH connection.
"""

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

LAST_ACTIVITY = "appliance_last_generation_timestamp_seconds"
IN_FLIGHT = "appliance_requests_in_flight"
BATCH_QUEUED = "appliance_batch_lines_queued"
ESTABLISHED = "01"


@dataclass(frozen=True)
class Activity:
    last_generation_at: float
    """Epoch seconds of the last generation request answered (or the gateway's start)."""
    in_flight: int
    batch_lines: int = 0
    """Lines of unfinished batches that have no result yet."""


@dataclass(frozen=True)
class Verdict:
    stop: bool
    reason: str


def activity_from_metrics(text: str) -> Activity:
    """The two gauges from the gateway's ``/metrics``; a missing one is an error, not idle."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (LAST_ACTIVITY, IN_FLIGHT, BATCH_QUEUED):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    missing = {LAST_ACTIVITY, IN_FLIGHT} - set(values)
    if missing:
        raise ValueError(f"the gateway's metrics lack {', '.join(sorted(missing))}")
    return Activity(values[LAST_ACTIVITY], int(values[IN_FLIGHT]),
                    int(values.get(BATCH_QUEUED, 0)))


def established_connections(tcp_tables: list[str], port: int) -> int:
    """Established TCP connections to local ``port``, from /proc/net/tcp and tcp6 texts."""
    count = 0
    for table in tcp_tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == ESTABLISHED:
                count += 1
    return count


def decide(activity: Activity | None, ssh_sessions: int, now: float,
           idle_minutes: float, ignore_batches: bool = False) -> Verdict:
    if idle_minutes <= 0:
        return Verdict(False, "idle stop is off (APPLIANCE_IDLE_STOP_MINUTES is 0)")
    if activity is None:
        return Verdict(False, "the gateway's activity is unknown, so the appliance stays up")
    if activity.in_flight > 0:
        return Verdict(False, f"{activity.in_flight} request(s) in the gateway now")
    if activity.batch_lines > 0 and not ignore_batches:
        return Verdict(False, f"{activity.batch_lines} batch line(s) still to run")
    if ssh_sessions > 0:
        return Verdict(False, f"{ssh_sessions} SSH session(s) open")
    idle_s = now - activity.last_generation_at
    limit_s = idle_minutes * 60
    if idle_s < limit_s:
        return Verdict(False, f"last generation request {idle_s:.0f}s ago "
                              f"(powering off after {limit_s:.0f}s)")
    return Verdict(True, f"no generation request for {idle_s:.0f}s (limit {limit_s:.0f}s), "
                         "nothing in flight and no SSH session: powering off")
