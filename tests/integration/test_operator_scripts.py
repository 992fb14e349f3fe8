"""The operator's scripts fail loudly when the appliance is not there (the working path is
exercised against the real stack in test_make_run.py)."""

import http.server
import os
import subprocess
import threading

from tests.servers import ROOT, free_port


def test_status_says_not_ready_when_nothing_answers():
    done = subprocess.run(
        [str(ROOT / "appliance_ops" / "tools" / "appliance-status")],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "APPLIANCE_PROXY_URL": f"http://127.0.0.1:{free_port()}",
            "APPLIANCE_ENGINE_HEALTH_URL": f"http://127.0.0.1:{free_port()}/health",
        },
    )
    assert done.returncode == 1
    assert "NOT READY" in done.stdout
    assert "-> 000" in done.stdout


def test_smoke_test_fails_without_a_readable_key(tmp_path):
    done = subprocess.run(
        [
            str(ROOT / "appliance_ops" / "tools" / "smoke-test.sh"),
            "--key-file",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot read the key file" in done.stderr


def test_smoke_test_fails_when_nothing_answers(tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-test\n")
    done = subprocess.run(
        [
            str(ROOT / "appliance_ops" / "tools" / "smoke-test.sh"),
            "--url",
            f"https://127.0.0.1:{free_port()}",
            "--key-file",
            str(key),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "FAIL: no answer" in done.stderr
    assert "sk-test" not in done.stdout + done.stderr


class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_status_probes_every_engine_the_env_file_names(tmp_path):
    """With a models file the gateway has several engines (``APPLIANCE_ENGINE_URLS``): each is
    probed, and one that does not answer makes the box not ready."""
    up = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    away = free_port()
    env_file = tmp_path / "appliance.env"
    env_file.write_text("APPLIANCE_ENGINE_API_KEY=secret-never-shown\n"
                        f"APPLIANCE_ENGINE_URLS=http://127.0.0.1:{up.server_port},"
                        f"http://127.0.0.1:{away}\n")
    try:
        done = subprocess.run(
            [str(ROOT / "appliance_ops" / "tools" / "appliance-status")],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "APPLIANCE_ENV_FILE": str(env_file),
                 "APPLIANCE_PROXY_URL": f"http://127.0.0.1:{free_port()}"})
    finally:
        up.shutdown()
    assert f"http://127.0.0.1:{up.server_port}/health -> 200" in done.stdout
    assert f"http://127.0.0.1:{away}/health -> 000" in done.stdout
    assert done.returncode == 1 and "NOT READY" in done.stdout
    assert "secret-never-shown" not in done.stdout + done.stderr
