"""The operator's scripts fail loudly when the appliance is not there (the working path is
exercised against the real stack in test_make_run.py)."""

import os
import subprocess

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
