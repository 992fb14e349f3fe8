"""``appliance-engine`` as operators run it, short of starting vLLM: preflight refusals, the
printed plan, a model fetched from S3 (a local moto server) before planning; and the tiny model
the end-to-end tests serve."""

import os
import subprocess
from pathlib import Path

import boto3
import pytest

from tests.e2e.engine_stack import ENGINE_BIN, engine_env, make_tiny_model, require_engine_venv
from tests.servers import VENV_BIN, free_port, running

EXIT_PREFLIGHT = 2


def launch(env: dict[str, str], *args: str, venv_bin: Path = ENGINE_BIN):
    require_engine_venv()
    return subprocess.run(
        [str(venv_bin / "appliance-engine"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


@pytest.fixture
def env(tiny_model, tmp_path):
    return engine_env(tiny_model, tmp_path, free_port(), engine_api_key="internal-secret-value")


def test_dry_run_prints_the_plan_and_the_command_but_not_the_key(env):
    result = launch(env, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "found no GPUs; vLLM build: cpu" in result.stderr
    assert "tensor parallel size 1 on CPU" in result.stderr
    assert "vllm.entrypoints.openai.api_server" in result.stderr
    assert "--enforce-eager" in result.stderr
    assert "internal-secret-value" not in result.stdout + result.stderr


def test_cpu_defaults_size_the_kv_cache_from_free_memory(env):
    """vLLM's CPU default (a fixed share of all RAM) refuses to start on a busy machine."""
    env = {k: v for k, v in env.items() if k != "APPLIANCE_KV_CACHE_MEMORY_BYTES"}
    result = launch(env | {"APPLIANCE_DEVICE": "cpu"}, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "of memory available once the weights" in result.stderr
    assert "--kv-cache-memory-bytes" in result.stderr


def test_missing_model_directory_is_refused(env, tmp_path):
    result = launch(env | {"APPLIANCE_MODEL": str(tmp_path / "absent")}, "--dry-run")
    assert result.returncode == EXIT_PREFLIGHT
    assert f"cannot start: model directory {tmp_path / 'absent'} does not exist" in result.stderr


def test_context_over_the_model_limit_is_refused(env):
    result = launch(env | {"APPLIANCE_MAX_MODEL_LEN": "4096"}, "--dry-run")
    assert result.returncode == EXIT_PREFLIGHT
    assert "over the model's limit of 2048 tokens" in result.stderr


def test_tensor_parallel_size_that_cannot_split_the_heads_is_refused(env):
    result = launch(env | {"APPLIANCE_TENSOR_PARALLEL_SIZE": "3"}, "--dry-run")
    assert result.returncode == EXIT_PREFLIGHT
    assert "cannot split the model's 4 attention heads and 2 KV heads" in result.stderr


def test_no_vllm_at_all_is_refused(env):
    result = launch(env, "--dry-run", venv_bin=VENV_BIN)  # the gateway's env has no vLLM
    assert result.returncode == EXIT_PREFLIGHT
    assert "vLLM is not installed" in result.stderr


def test_without_a_key_or_a_writable_env_file_it_does_not_start(env, tmp_path):
    env |= {
        "APPLIANCE_ENGINE_API_KEY": "",
        "APPLIANCE_ENV_FILE": str(tmp_path / "no-such-dir" / "appliance.env"),
    }
    result = launch(env)
    assert result.returncode == EXIT_PREFLIGHT
    assert "APPLIANCE_ENGINE_API_KEY is not set" in result.stderr
    assert "Starting vLLM" not in result.stderr


def test_s3_model_is_fetched_into_the_cache_then_planned(env, tiny_model, tmp_path):
    port = free_port()
    s3_env = {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with running(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        ready_url=f"http://127.0.0.1:{port}/moto-api/",
        log=tmp_path / "moto.log",
    ):
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_env["AWS_ENDPOINT_URL_S3"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket="models")
        for path in tiny_model.iterdir():
            s3.upload_file(str(path), "models", f"tiny/{path.name}")
        result = launch(env | s3_env | {"APPLIANCE_MODEL": "s3://models/tiny"}, "--dry-run")
    assert result.returncode == 0, result.stderr
    cached = Path(env["APPLIANCE_MODEL_CACHE"]) / "s3" / "models" / "tiny"
    assert f"--model {cached} " in result.stderr
    for path in tiny_model.iterdir():
        assert (cached / path.name).read_bytes() == path.read_bytes()
    # The moto server is gone now: a complete copy is used without asking S3 again.
    again = launch(env | s3_env | {"APPLIANCE_MODEL": "s3://models/tiny"}, "--dry-run")
    assert again.returncode == 0, again.stderr


TRANSFORMERS_CHECK = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
chat = [{"role": "user", "content": "Hello there"}]
prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False)
print(repr(prompt), out.shape[1] - ids.shape[1])
"""


def test_tiny_model_is_deterministic_and_loads_in_transformers(tiny_model, tmp_path):
    same = make_tiny_model(tmp_path / "same")
    other = make_tiny_model(tmp_path / "other", seed=1)
    for path in tiny_model.iterdir():
        assert (same / path.name).read_bytes() == path.read_bytes(), path.name
    weights = "model.safetensors"
    assert (other / weights).read_bytes() != (tiny_model / weights).read_bytes()
    assert (tiny_model / weights).stat().st_size < 16 * 2**20

    result = subprocess.run(
        [str(ENGINE_BIN / "python"), "-c", TRANSFORMERS_CHECK, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("'<s><|user|>\\nHello there</s>\\n<|assistant|>\\n' 8")
