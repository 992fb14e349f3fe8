"""appliance_ops.spot: what IMDS's spot/instance-action answers mean."""

import json

import pytest

from appliance_ops.settings import OpsSettings
from appliance_ops.spot import Notice, notice_from


def test_no_notice_is_a_404():
    assert notice_from(404, b"Not Found") is None


def test_a_notice_names_the_action_and_its_time():
    body = json.dumps({"action": "terminate", "time": "2026-11-24T23:59:00Z"}).encode()
    notice = notice_from(200, body)
    assert notice == Notice("terminate", "2026-11-24T23:59:00Z")
    assert notice.reason == "spot interruption notice: terminate at 2026-11-24T23:59:00Z"


@pytest.mark.parametrize("status", [401, 500, 503])
def test_other_answers_are_errors_not_notices(status):
    with pytest.raises(ValueError):
        notice_from(status, b"")


def test_polls_every_five_seconds_by_default():
    assert OpsSettings().spot_poll_interval_s == 5
    assert OpsSettings().imds_url == "http://169.254.169.254"
