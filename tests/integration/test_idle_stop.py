"""appliance-idle-stop, the real program, against a real gateway (in front of the fake
engine), with the power-off command replaced by one that leaves a mark: it stays up while
requests flow, powers off after the idle period, and never while a stream or an SSH session is
open. The systemd timer runs it every minute on the host; here the test runs it."""

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.proxy_stack import gateway
from tests.servers import VENV_BIN, free_port

IDLE_S = 3.0


@pytest.fixture
def gw(fake, tmp_path):
    """A gateway of the test's own: its idle clock starts when it starts."""
    with gateway(fake.url, tmp_path) as p:
        yield p


def idle_stop(gw, marker: Path, minutes: float | None = IDLE_S / 60,
              ssh_port: int | None = None) -> str:
    env = {**os.environ, "APPLIANCE_ENV_FILE": "/nonexistent",
           "APPLIANCE_PROXY_HOST": "127.0.0.1",
           "APPLIANCE_PROXY_PORT": gw.url.rsplit(":", 1)[1],
           "APPLIANCE_IDLE_STOP_COMMAND": f"touch {marker}",
           "APPLIANCE_SSH_PORT": str(ssh_port or free_port())}
    if minutes is not None:
        env["APPLIANCE_IDLE_STOP_MINUTES"] = str(minutes)
    done = subprocess.run([str(VENV_BIN / "appliance-idle-stop")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def chat(gw, **extra) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers(),
                      timeout=60)


def test_stays_up_while_requests_flow_then_powers_off_when_idle(gw, tmp_path):
    marker = tmp_path / "powered-off"
    started = time.monotonic()
    while time.monotonic() - started < 2 * IDLE_S:
        assert chat(gw).status_code == 200
        out = idle_stop(gw, marker)
        assert not marker.exists(), out
        assert "last generation request" in out
        time.sleep(IDLE_S / 3)
    time.sleep(IDLE_S + 0.5)
    out = idle_stop(gw, marker)
    assert marker.exists(), out
    assert "powering off" in out


def test_refused_requests_are_not_activity(gw, tmp_path):
    marker = tmp_path / "powered-off"
    time.sleep(IDLE_S + 0.5)
    bad = httpx.post(gw.url + "/v1/chat/completions", json={},
                     headers={"Authorization": "Bearer not-a-key"}, timeout=10)
    assert bad.status_code == 401
    idle_stop(gw, marker)
    assert marker.exists()


def test_never_while_a_stream_is_open(gw, tmp_path):
    marker = tmp_path / "powered-off"
    finished = threading.Event()

    def long_stream() -> None:
        answer = chat(gw, stream=True, max_tokens=40, fake={"interval": 0.15})
        assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
        finished.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    time.sleep(IDLE_S + 1)
    assert not finished.is_set()
    out = idle_stop(gw, marker)
    assert not marker.exists(), out
    assert "1 request(s) in the gateway" in out
    thread.join(30)
    assert finished.is_set()
    out = idle_stop(gw, marker)
    assert not marker.exists(), out


def test_never_while_an_ssh_session_is_open(gw, tmp_path):
    marker = tmp_path / "powered-off"
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            session, _ = server.accept()
            time.sleep(IDLE_S + 0.5)
            out = idle_stop(gw, marker, ssh_port=port)
            assert not marker.exists(), out
            assert "1 SSH session(s) open" in out
            session.close()
        out = idle_stop(gw, marker, ssh_port=port)
    assert marker.exists(), out


def test_off_unless_asked(gw, tmp_path):
    marker = tmp_path / "powered-off"
    time.sleep(IDLE_S + 0.5)
    out = idle_stop(gw, marker, minutes=None)
    assert "idle stop is off" in out and not marker.exists()


def test_a_gateway_that_does_not_answer_keeps_it_up(tmp_path):
    marker = tmp_path / "powered-off"

    class Down:
        url = f"http://127.0.0.1:{free_port()}"

    out = idle_stop(Down, marker, minutes=0.001)
    assert not marker.exists() and "unknown" in out
