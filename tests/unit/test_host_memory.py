"""Reading the memory the engine may take, from /proc/meminfo's and cgroup files' text."""

from server.host_memory import cgroup_headroom, mem_available

MEMINFO = """MemTotal:       15822508 kB
MemFree:         1000000 kB
MemAvailable:   14365900 kB
Buffers:          100000 kB
"""


def test_mem_available_is_read_in_bytes():
    assert mem_available(MEMINFO) == 14365900 * 1024


def test_mem_available_missing():
    assert mem_available("MemTotal: 1 kB\n") is None


def test_unlimited_cgroups_do_not_bound_memory():
    assert cgroup_headroom([("max\n", "123\n"), ("max\n", "456\n")]) is None


def test_the_tightest_cgroup_limit_wins():
    assert cgroup_headroom([("max\n", "1\n"), ("1000\n", "400\n"), ("5000\n", "100\n")]) == 600


def test_a_cgroup_over_its_limit_has_no_room():
    assert cgroup_headroom([("1000\n", "1200\n")]) == 0


def test_this_host_reports_memory_below_its_total():
    from server.host_memory import MEMINFO as PROC_MEMINFO
    from server.host_memory import available_memory_bytes

    total = int(PROC_MEMINFO.read_text().split()[1]) * 1024
    assert 0 < (available_memory_bytes() or 0) <= total
