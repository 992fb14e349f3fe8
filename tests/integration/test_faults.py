"""The gateway under failure: the engine dies, loads slowly, or the key store goes away."""

import contextlib
import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.integration.proxy_stack import engine, gateway
from tests.integration.test_gateway import CHAT, error_of, sse_events, wait_for
from tests.servers import free_port


def test_engine_killed_mid_stream_then_back(tmp_path):
    port = free_port()
    with engine(port=port) as first, gateway(first.url, tmp_path) as p:
        body = {**CHAT, "stream": True, "max_tokens": 200, "fake": {"interval": 0.05}}
        headers = p.headers()
        plain = {}

        def slow_plain() -> None:
            plain["r"] = httpx.post(p.url + "/v1/chat/completions", headers=headers,
                                    json={**CHAT, "fake": {"delay": 5}}, timeout=10)

        waiter = threading.Thread(target=slow_plain)
        waiter.start()
        wait_for(lambda: (first.stats()["last_body"] or {}).get("fake") == {"delay": 5})
        with httpx.stream("POST", p.url + "/v1/chat/completions", headers=p.headers(),
                          json=body, timeout=10) as response:
            chunks = response.iter_raw()
            received = next(chunks)
            os.killpg(first.proc.pid, signal.SIGKILL)
            received += b"".join(chunks)
        waiter.join()
        events = sse_events(received.decode())
        assert events[-2].startswith("event: error")
        assert json.loads(events[-2].split("data: ", 1)[1])["error"]["code"] == "upstream_error"
        assert plain["r"].status_code == 502 and error_of(plain["r"])["code"] == "upstream_error"

        down = httpx.post(p.url + "/v1/chat/completions", headers=p.headers(), json=CHAT)
        assert down.status_code == 503 and down.headers["retry-after"]
        assert httpx.get(p.url + "/health").status_code == 200
        assert httpx.get(p.url + "/ready").status_code == 503

        with engine(port=port):
            wait_for(lambda: httpx.post(p.url + "/v1/chat/completions", headers=p.headers(),
                                        json=CHAT).status_code == 200, 5)


def test_server_errors_from_an_engine_going_away_are_503_with_retry_after(fake, tmp_path):
    """vLLM draining for a restart answers 500 ("cannot schedule new futures after shutdown")
    and fails its health check: clients get 503 engine_unavailable, not the 500, until it is
    healthy again. A 500 from a healthy engine is that request's own failure and stays one."""
    failing = {**CHAT, "fake": {"status": 500}}
    with gateway(fake.url, tmp_path) as p:
        own = httpx.post(p.url + "/v1/chat/completions", headers=p.headers(), json=failing)
        assert own.status_code == 500 and error_of(own)["code"] == "internal_error"
        try:
            for body in (failing, {**failing, "stream": True}):
                httpx.post(fake.url + "/fake/unhealthy")
                refused = httpx.post(p.url + "/v1/chat/completions", headers=p.headers(),
                                     json=body)
                assert refused.status_code == 503, refused.text
                assert error_of(refused)["code"] == "engine_unavailable"
                assert int(refused.headers["retry-after"]) > 0
                completed = fake.stats()["completed"]
                early = httpx.post(p.url + "/v1/chat/completions", headers=p.headers(),
                                   json=CHAT)
                assert early.status_code == 503 and early.headers["retry-after"]
                assert fake.stats()["completed"] == completed, "refused before the engine"
                httpx.delete(fake.url + "/fake/unhealthy")
                wait_for(lambda: httpx.post(p.url + "/v1/chat/completions", headers=p.headers(),
                                            json=CHAT).status_code == 200, 5)
        finally:
            httpx.delete(fake.url + "/fake/unhealthy")


def test_engine_slow_to_start_gives_503_with_retry_after_until_healthy(tmp_path):
    with engine("--ready-after", "8") as slow, gateway(slow.url, tmp_path) as p:
        ready = httpx.get(p.url + "/ready")
        assert ready.status_code == 503 and "Not ready" in error_of(ready)["message"]
        refused = httpx.post(p.url + "/v1/chat/completions", headers=p.headers(), json=CHAT)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert slow.stats()["completed"] == 0, "nothing reaches an engine that is not ready"
        wait_for(lambda: httpx.get(p.url + "/ready").status_code == 200, 15)
        assert httpx.post(p.url + "/v1/chat/completions", headers=p.headers(),
                          json=CHAT).status_code == 200


def test_key_store_removed_fails_closed_and_recovers(fake, tmp_path):
    with gateway(fake.url, tmp_path, key_cache_ttl_s=0.1) as p:
        headers = p.headers()
        assert httpx.get(p.url + "/v1/models", headers=headers).status_code == 200
        moved = p.db.with_suffix(".moved")
        os.rename(p.db, moved)
        time.sleep(0.2)
        for h in (headers, {"Authorization": "Bearer sk-app-unknown"}):
            refused = httpx.get(p.url + "/v1/models", headers=h)
            assert refused.status_code == 503
            assert error_of(refused)["code"] == "key_store_unavailable"
        os.rename(moved, p.db)
        wait_for(lambda: httpx.get(p.url + "/v1/models", headers=headers).status_code == 200)
        assert httpx.get(p.url + "/v1/models",
                         headers={"Authorization": "Bearer sk-app-unknown"}).status_code == 401


def test_usage_survives_a_locked_store(fake, tmp_path):
    import sqlite3

    from tests.integration.test_gateway import usage_row

    with gateway(fake.url, tmp_path) as p:
        client = p.client("locked")
        lock = sqlite3.connect(p.db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            for _ in range(3):
                client.chat.completions.create(**CHAT)
            time.sleep(0.5)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        wait_for(lambda: usage_row(p, "locked") == [3, 6, 12], 10)


def test_keys_created_and_revoked_while_serving_lose_nothing(gw):
    from tests.integration.proxy_stack import keys_cli
    from tests.integration.test_gateway import usage_row

    client = gw.client("busy")
    stop = threading.Event()
    errors = []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            name = f"churn-{i}"
            if keys_cli(gw.db, "create", "--name", name).returncode or keys_cli(
                    gw.db, "revoke", name).returncode:
                errors.append(name)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(20):
            client.chat.completions.create(**CHAT)
    finally:
        stop.set()
        worker.join()
    assert not errors
    wait_for(lambda: usage_row(gw, "busy") == [20, 40, 80])


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs, so the disk can really fill up under the key store."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_keeps_serving_reports_and_loses_no_usage(fake, small_disk, tmp_path):
    from tests.integration.test_gateway import usage_row

    with gateway(fake.url, tmp_path, db_dir=small_disk) as p:
        client = p.client("full")
        client.chat.completions.create(**CHAT)
        filler = small_disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as out:
            while True:
                out.write(b"\0" * 4096)
                out.flush()
        for _ in range(5):
            client.chat.completions.create(**CHAT)
        wait_for(lambda: "appliance_usage_write_failures_total 0.0" not in
                 httpx.get(p.url + "/metrics").text, 5)
        assert "usage not saved" in p.log.read_text()
        filler.unlink()
        wait_for(lambda: usage_row(p, "full") == [6, 12, 24], 5)
