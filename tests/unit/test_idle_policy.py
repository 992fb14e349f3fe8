"""appliance_ops.idle: when the appliance may power itself off, decided without I/O."""

import pytest

from appliance_ops.idle import (
    Activity,
    activity_from_metrics,
    decide,
    established_connections,
)
from appliance_ops.settings import OpsSettings

NOW = 1_800_000_000.0
MINUTES = 30


def idle_for(seconds: float, in_flight: int = 0) -> Activity:
    return Activity(NOW - seconds, in_flight)


def test_off_by_default_and_at_zero():
    assert OpsSettings().idle_stop_minutes == 0
    assert not decide(idle_for(10**6), 0, NOW, 0).stop


def test_stays_up_while_requests_are_recent():
    verdict = decide(idle_for(MINUTES * 60 - 1), 0, NOW, MINUTES)
    assert not verdict.stop and "1799s ago" in verdict.reason


def test_powers_off_after_the_idle_period():
    verdict = decide(idle_for(MINUTES * 60), 0, NOW, MINUTES)
    assert verdict.stop and "powering off" in verdict.reason


def test_never_while_a_stream_or_request_is_open():
    verdict = decide(idle_for(10 * MINUTES * 60, in_flight=1), 0, NOW, MINUTES)
    assert not verdict.stop and "in the gateway" in verdict.reason


def test_never_while_an_ssh_session_is_open():
    verdict = decide(idle_for(10 * MINUTES * 60), 2, NOW, MINUTES)
    assert not verdict.stop and "SSH" in verdict.reason


def test_unknown_activity_keeps_it_up():
    assert not decide(None, 0, NOW, MINUTES).stop


METRICS = """\
# HELP appliance_requests_in_flight Requests forwarded to the engine and not yet finished.
# TYPE appliance_requests_in_flight gauge
appliance_requests_in_flight 2.0
# HELP appliance_last_generation_timestamp_seconds When the last generation request was answered.
# TYPE appliance_last_generation_timestamp_seconds gauge
appliance_last_generation_timestamp_seconds 1.7999e+09
"""


def test_activity_is_read_from_the_gateways_metrics():
    assert activity_from_metrics(METRICS) == Activity(1.7999e9, 2)


def test_metrics_without_the_gauges_are_an_error_not_idle():
    with pytest.raises(ValueError, match="appliance_last_generation_timestamp_seconds"):
        activity_from_metrics(METRICS.split("# HELP appliance_last")[0])


TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:0016 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:1F90 0100007F:9C41 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0100007F:9C42 0100007F:0016 01 00000000:00000000 00:00000000 00000000     0        0 4 1
"""
TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:0016 00000000000000000000000001000000:A000 01 x
   1: 00000000000000000000000001000000:0016 00000000000000000000000001000000:A001 06 x
"""


def test_ssh_sessions_are_established_connections_to_the_local_port():
    """Listening sockets, other ports, outgoing connections and TIME_WAIT do not count."""
    assert established_connections([TCP, TCP6], 22) == 2
    assert established_connections([TCP], 8080) == 1
    assert established_connections([""], 22) == 0


def test_batch_lines_still_to_run_are_work_unless_told_otherwise():
    waiting = Activity(NOW - 10 * MINUTES * 60, 0, batch_lines=3)
    verdict = decide(waiting, 0, NOW, MINUTES)
    assert not verdict.stop and "3 batch line(s)" in verdict.reason
    assert decide(waiting, 0, NOW, MINUTES, ignore_batches=True).stop


def test_the_batch_gauge_is_read_when_the_gateway_reports_it():
    text = METRICS + "# TYPE appliance_batch_lines_queued gauge\nappliance_batch_lines_queued 7\n"
    assert activity_from_metrics(text).batch_lines == 7
