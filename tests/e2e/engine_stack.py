"""The real engine for end-to-end tests: the tiny model, served by vLLM (CPU) via appliance-engine.

vLLM and torch live in their own virtualenv (``make engine-venv``, ``$ENGINE_VENV``), apart
from the light one the tests run in; the engine is started from there as a subprocess.
"""

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.servers import ROOT, free_port, running

ENGINE_VENV = ROOT / os.environ.get("ENGINE_VENV", ".venv-engine")
ENGINE_BIN = ENGINE_VENV / "bin"
SERVED_NAME = "tiny"
MAX_MODEL_LEN = 1024
# The e2e engine's batch, told to the gateway too: small, so that a few dozen streams fill it.
MAX_NUM_SEQS = 8
START_TIMEOUT_S = 300.0


def require_engine_venv() -> None:
    if not (ENGINE_BIN / "appliance-engine").exists():
        raise RuntimeError(f"{ENGINE_VENV} has no appliance-engine: run `make engine-venv`")


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    subprocess.run(
        [
            str(ENGINE_BIN / "python"),
            str(ROOT / "scripts" / "make_tiny_model.py"),
            str(directory),
            "--seed",
            str(seed),
        ],
        check=True,
        capture_output=True,
    )
    return directory


def engine_env(model: Path, workdir: Path, port: int, **settings: object) -> dict[str, str]:
    """Settings for a small CPU engine whose caches and env file stay inside ``workdir``."""
    env = {
        "APPLIANCE_ENV_FILE": str(workdir / "appliance.env"),
        "APPLIANCE_MODEL": str(model),
        "APPLIANCE_SERVED_MODEL_NAME": SERVED_NAME,
        "APPLIANCE_MODEL_CACHE": str(workdir / "models"),
        "APPLIANCE_ENGINE_PORT": str(port),
        "APPLIANCE_ENGINE_API_KEY": "",
        "APPLIANCE_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "APPLIANCE_KV_CACHE_MEMORY_BYTES": str(256 * 2**20),
        "APPLIANCE_MAX_NUM_SEQS": "32",
        "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor-cache"),
        "HF_HUB_OFFLINE": "1",
    }
    return env | {f"APPLIANCE_{k.upper()}": str(v) for k, v in settings.items()}


def read_internal_key(env_file: Path) -> str:
    match = re.search(r"^APPLIANCE_ENGINE_API_KEY=(.+)$", env_file.read_text(), re.MULTILINE)
    assert match, f"{env_file} holds no internal key"
    return match.group(1)


@dataclass
class Engine:
    url: str
    key: str
    proc: subprocess.Popen
    log: Path

    def metric(self, name: str) -> float:
        """A counter or gauge from vLLM's /metrics, summed over its label sets."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        ]
        assert values, f"{name} not in /metrics"
        return sum(values)

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until vLLM runs and queues nothing: what a cancelled load left has been let go."""
        deadline = time.monotonic() + timeout
        while self.metric("vllm:num_requests_running") + self.metric("vllm:num_requests_waiting"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM still holds requests after {timeout:g}s")
            time.sleep(0.2)

    def aborted(self, response_id: str) -> bool:
        """Whether vLLM logged that it aborted the request that answered with ``response_id``.

        Needs ``--enable-log-requests``; vLLM names a request by its response's id and the
        prompt's index (``cmpl-...-0``).
        """
        pattern = rf"Request {re.escape(response_id)}(-\d+)? aborted\."
        return re.search(pattern, self.log.read_text()) is not None

    def arrivals(self) -> list[str]:
        """Response ids in the order vLLM took their requests in, which is the order it starts
        them: it schedules first come, first served. Needs ``--enable-log-requests``."""
        return re.findall(r"Added request (\S+?)-\d+-[0-9a-f]+\.", self.log.read_text())

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0, **kwargs)


@contextlib.contextmanager
def engine(model: Path, workdir: Path, **settings: object) -> Iterator[Engine]:
    """``appliance-engine`` on a free loopback port; it generates its internal key on start."""
    require_engine_venv()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "engine.log"
    with running(
        [str(ENGINE_BIN / "appliance-engine")],
        ready_url=url + "/health",
        env=engine_env(model, workdir, port, **settings),
        timeout=START_TIMEOUT_S,
        log=log,
    ) as proc:
        yield Engine(url, read_internal_key(workdir / "appliance.env"), proc, log)
