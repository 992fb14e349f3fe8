"""Several gateway workers behind the real NGINX: per-key state stays exact, metrics add up.

The site is rendered with ``--gateway-workers 2`` and the gateway runs
``APPLIANCE_PROXY_WORKERS=2`` (a supervisor and two worker processes). If NGINX spread one
key over both workers, each would keep its own token bucket and quota reservations, and the
limits below would be exceeded (up to twice); the tests send each key's requests with
differently written ``Authorization`` headers so that hashing the raw header would split it.
"""

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration import nginx_stack
from tests.integration.proxy_stack import ENGINE_KEY, Proxy, keys_cli
from tests.integration.test_gateway import CHAT, usage_row, wait_for
from tests.servers import free_ports, proxy, running, wait_http

WORKERS = 2
SLOW = {**CHAT, "stream": True, "max_tokens": 2, "fake": {"first_delay": 2}}


def header_forms(secret: str) -> list[str]:
    """Ways of writing one key's header that the gateway accepts alike."""
    return [f"Bearer {secret}", f"bearer {secret}", f"BEARER {secret}", f"Bearer  {secret}"]


class Stack:
    def __init__(self, gateway: Proxy, site: nginx_stack.Site, supervisor, first_port: int):
        self.gateway = gateway
        self.site = site
        self.supervisor = supervisor
        self.first_port = first_port

    def post(self, headers: dict[str, str], body: dict, timeout: float = 30) -> httpx.Response:
        return httpx.post(self.site.https + "/v1/chat/completions", content=json.dumps(body),
                          headers={**headers, "Content-Type": "application/json"},
                          verify=self.site.trust(), timeout=timeout)

    def burst(self, name: str, body: dict, count: int) -> list[httpx.Response]:
        """``count`` requests of key ``name`` at once, each header written one of four ways."""
        secret = self.gateway.key(name)
        forms = header_forms(secret)
        results: list[httpx.Response] = []
        barrier = threading.Barrier(count)

        def go(i: int) -> None:
            barrier.wait()
            results.append(self.post({"Authorization": forms[i % len(forms)]}, body))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def metrics(self, port: int | None = None) -> str:
        return httpx.get(f"http://127.0.0.1:{port or self.first_port}/metrics").text

    def metric(self, name: str, port: int | None = None) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.metrics(port).splitlines()
                   if line.startswith(name))

    def workers_by_key(self) -> dict[str, set[int]]:
        served: dict[str, set[int]] = {}
        for line in self.gateway.log.read_text().splitlines():
            if line.startswith("{") and '"route": "/v1/' in line:
                entry = json.loads(line)
                served.setdefault(entry["key"], set()).add(entry["worker"])
        return served

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.supervisor.pid}/task/{self.supervisor.pid}/children")
        return [int(pid) for pid in children.read_text().split()]


@contextlib.contextmanager
def workers_stack(engine_url: str, workdir: Path, **settings: object) -> Iterator[Stack]:
    first = free_ports(WORKERS)
    db, log = workdir / "keys.db", workdir / "proxy.log"
    env = {"APPLIANCE_ENGINE_URL": engine_url, "APPLIANCE_ENGINE_API_KEY": ENGINE_KEY,
           "APPLIANCE_KEYS_DB": str(db), "APPLIANCE_USAGE_FLUSH_INTERVAL_S": "0.2",
           "APPLIANCE_PROXY_WORKERS": str(WORKERS)}
    env |= {f"APPLIANCE_{k.upper()}": str(v) for k, v in settings.items()}
    site = nginx_stack.render(workdir / "nginx", f"127.0.0.1:{first}",
                              gateway_workers=WORKERS)
    with running(proxy(first), env=env, log=log) as supervisor:
        for port in range(first, first + WORKERS):
            wait_http(f"http://127.0.0.1:{port}/health", proc=supervisor)
        with nginx_stack.serving(site):
            yield Stack(Proxy(f"http://127.0.0.1:{first}", db, log), site, supervisor, first)


@pytest.fixture
def stack(fake, tmp_path):
    with workers_stack(fake.url, tmp_path, engine_concurrency=2) as s:
        yield s


def test_a_rate_limit_is_not_multiplied_by_the_workers(stack):
    stack.gateway.key("limited", "--rpm", "5")
    results = stack.burst("limited", {**CHAT, "fake": {"delay": 0}}, 16)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 5 + [429] * 11, statuses
    refused = next(r for r in results if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert stack.workers_by_key()["limited"] in ({0}, {1})


def test_a_quota_is_never_overshot_across_workers(stack):
    """Each request reserves body bytes + max_tokens; three fit in the quota at once."""
    body = {**CHAT, "max_tokens": 200, "fake": {"delay": 1}}
    bound = len(json.dumps(body).encode()) + 200
    stack.gateway.key("metered", "--quota-tokens", str(3 * bound + bound // 2),
                      "--quota-period", "day")
    results = stack.burst("metered", body, 12)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 3 + [429] * 9, statuses
    assert {r.json()["error"]["code"] for r in results if r.status_code == 429} == {
        "insufficient_quota"}
    wait_for(lambda: usage_row(stack.gateway, "metered")[0] == 3)
    assert sum(usage_row(stack.gateway, "metered")[1:3]) <= 3 * bound + bound // 2


def test_each_key_stays_on_one_worker_and_keys_spread_over_all(stack):
    names = [f"tenant{i}" for i in range(16)]
    for name in names:
        for form in header_forms(stack.gateway.key(name))[:2]:
            assert stack.post({"Authorization": form}, CHAT).status_code == 200
    served = stack.workers_by_key()
    assert all(len(served[name]) == 1 for name in names), served
    assert set().union(*(served[name] for name in names)) == set(range(WORKERS))


def test_metrics_report_the_whole_gateway_from_any_worker(stack):
    names = [f"counted{i}" for i in range(16)]
    for name in names:
        assert stack.post({"Authorization": f"Bearer {stack.gateway.key(name)}"},
                          CHAT).status_code == 200
    total = 'appliance_requests_total{key="counted'
    for port in range(stack.first_port, stack.first_port + WORKERS):
        assert stack.metric(total, port) == len(names)
        assert stack.metric("appliance_engine_slots ", port) == 2
        assert stack.metric("appliance_proxy_workers ", port) == WORKERS
    scraped = httpx.get(stack.site.https + "/metrics", verify=stack.site.trust())
    assert scraped.status_code == 200 and f'{total}0"' in scraped.text


def test_the_engine_slots_are_divided_among_the_workers(stack, fake):
    """Two slots for two workers: at most two requests reach the engine, whoever sends them."""
    results: list = []
    names = [f"waiting{i}" for i in range(6)]
    headers = [{"Authorization": f"Bearer {stack.gateway.key(n)}"} for n in names]
    threads = [threading.Thread(target=lambda h=h: results.append(stack.post(h, SLOW)))
               for h in headers]
    for t in threads:
        t.start()
    wait_for(lambda: stack.metric("appliance_queue_depth") == 4)
    assert fake.stats()["in_progress"] <= 2
    assert stack.metric("appliance_engine_slots_in_use") <= 2
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 6


def test_a_crashed_worker_is_replaced_on_its_port(stack):
    names = [f"survivor{i}" for i in range(8)]
    for name in names:
        assert stack.post({"Authorization": f"Bearer {stack.gateway.key(name)}"},
                          CHAT).status_code == 200
    before = stack.worker_pids()
    assert len(before) == WORKERS
    os.kill(before[1], signal.SIGKILL)
    wait_for(lambda: len(set(stack.worker_pids()) - set(before)) == 1, timeout=15)
    for port in range(stack.first_port, stack.first_port + WORKERS):
        wait_http(f"http://127.0.0.1:{port}/health", proc=stack.supervisor)
    for name in names:
        assert stack.post({"Authorization": f"Bearer {stack.gateway.key(name)}"},
                          CHAT).status_code == 200
    # The dead worker's counters stay in the total.
    assert stack.metric('appliance_requests_total{key="survivor') == 2 * len(names)


def test_a_drain_asked_of_the_gateway_drains_every_worker(stack):
    """appliance-spot-watch posts /drain to the gateway's port; every worker must stop taking
    generation requests, whichever keys it serves."""
    names = [f"drained{i}" for i in range(8)]
    for name in names:
        stack.gateway.key(name)
    asked = httpx.post(f"http://127.0.0.1:{stack.first_port}/drain", json={"reason": "spot"})
    assert asked.status_code == 200
    for port in range(stack.first_port, stack.first_port + WORKERS):
        ready = httpx.get(f"http://127.0.0.1:{port}/ready")
        assert ready.status_code == 503 and "spot" in ready.json()["error"]["message"]
    for name in names:
        refused = stack.post({"Authorization": f"Bearer {stack.gateway.key(name)}"}, CHAT)
        assert refused.status_code == 503, name
    assert stack.metric("appliance_draining ") == 1


def test_stopping_the_service_stops_every_worker(fake, tmp_path):
    with workers_stack(fake.url, tmp_path) as s:
        pids = s.worker_pids()
        os.kill(s.supervisor.pid, signal.SIGTERM)
        assert s.supervisor.wait(40) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text()
    assert keys_cli(s.gateway.db, "list").returncode == 0
