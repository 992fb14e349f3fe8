"""The quota gauges, from key reports as the key store gives them."""

from proxy.keys.store import Key, KeyReport, Usage
from proxy.observe.metrics import QuotaFamilies


def test_quota_gauges_leave_out_keys_without_a_quota_and_keys_that_cannot_be_used():
    now = 1_800_000_000.0
    metered = Key("metered", "h", None, None, now, None, None, quota_tokens=100,
                  quota_period="day")
    over = Key("over", "h", None, None, now, None, None, quota_tokens=10)
    expired = Key("expired", "h", None, None, now, None, now - 1, quota_tokens=10)
    free = Key("free", "h", None, None, now, None, None)
    reports = [KeyReport(k, Usage(k.name, 1, 2, 3), "2027-01-15", used)
               for k, used in ((metered, 30), (over, 25), (expired, 0), (free, 9))]
    text = QuotaFamilies(reports, now).render().decode()
    assert 'appliance_key_quota_tokens{key="metered",period="day"} 100.0' in text
    assert 'appliance_key_quota_remaining_tokens{key="metered",period="day"} 70.0' in text
    assert 'appliance_key_quota_remaining_tokens{key="over",period="month"} 0.0' in text
    assert "expired" not in text and "free" not in text
