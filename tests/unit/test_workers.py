"""Dividing one box among gateway workers: counts, ports and engine slots, without I/O."""

import pytest
from pydantic import ValidationError

from proxy.settings import ProxySettings, default_worker_count
from proxy.workers import ports, share, worker_settings


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (4, 2), (16, 8), (192, 8)])
def test_default_worker_count_is_half_the_cores_from_one_to_eight(cpus, workers):
    assert default_worker_count(cpus) == workers


def test_shares_add_up_to_the_whole_and_differ_by_at_most_one():
    for total in (2, 7, 256):
        for workers in range(1, min(total, 9) + 1):
            parts = [share(total, workers, i) for i in range(workers)]
            assert sum(parts) == total
            assert max(parts) - min(parts) <= 1


def test_each_worker_gets_its_port_and_its_part_of_the_engine_slots():
    settings = ProxySettings(proxy_port=9000, proxy_workers=3, engine_concurrency=8,
                             max_queued_per_key=4)
    assert ports(settings) == [9000, 9001, 9002]
    workers = [worker_settings(settings, i) for i in range(3)]
    assert [w.proxy_port for w in workers] == [9000, 9001, 9002]
    assert [w.engine_concurrency for w in workers] == [3, 3, 2]
    for w in workers:
        assert w.max_inflight > w.engine_concurrency + w.max_queued_per_key
        assert w.max_queued_per_key == 4
    with pytest.raises(ValueError, match="out of range"):
        worker_settings(settings, 3)


def test_one_worker_serves_with_the_settings_unchanged():
    settings = ProxySettings(proxy_workers=1)
    assert worker_settings(settings, 0) is settings


def test_more_workers_than_engine_slots_is_refused():
    with pytest.raises(ValidationError, match="APPLIANCE_PROXY_WORKERS"):
        ProxySettings(proxy_workers=4, engine_concurrency=2)
    with pytest.raises(ValidationError, match="not a port"):
        ProxySettings(proxy_workers=2, proxy_port=65535)
