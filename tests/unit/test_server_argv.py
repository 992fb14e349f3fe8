"""The vLLM command line and environment built from a plan, as pure functions."""

from pathlib import Path

import pytest

from proxy.relay.transport import KEEPALIVE_EXPIRY_S
from server.argv import API_SERVER_MODULE, cpu_thread_binding, engine_argv, engine_env
from server.gpus import Gpu
from server.model import ModelInfo
from server.plan import plan_engine
from server.settings import EngineSettings

PYTHON = "/venv/bin/python"


def plan_for(device: str = "gpu", **values):
    settings = EngineSettings(_env_file=None, model="/models/m", **values)
    gpus = [Gpu(i, "H100", 80 * 2**30) for i in range(2)] if device == "gpu" else []
    info = ModelInfo(Path("/models/m"), 4, 2, 2048, 10_000_000)
    build = "gpu" if device == "gpu" else "cpu"
    return plan_engine(settings, gpus, build, info, (0, 1, 2, 3), 16 * 2**30)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_gpu_defaults():
    argv = engine_argv(plan_for("gpu"), PYTHON)
    assert argv[:3] == [PYTHON, "-m", API_SERVER_MODULE]
    assert option(argv, "--model") == "/models/m"
    assert option(argv, "--served-model-name") == "m"
    assert option(argv, "--host") == "127.0.0.1"
    assert option(argv, "--port") == "8000"
    assert option(argv, "--tensor-parallel-size") == "2"
    assert option(argv, "--gpu-memory-utilization") == "0.9"
    assert option(argv, "--max-num-seqs") == "256"
    assert option(argv, "--shutdown-timeout") == "30"
    assert "--enable-prefix-caching" in argv
    assert "--enforce-eager" not in argv
    assert "--max-model-len" not in argv
    assert "--quantization" not in argv


def test_the_internal_key_is_never_on_the_command_line():
    plan = plan_for("gpu", engine_api_key="s3cret-internal")
    assert not any("s3cret" in arg for arg in engine_argv(plan, PYTHON))
    assert "--api-key" not in engine_argv(plan, PYTHON)
    env = engine_env(plan, "s3cret-internal", {"PATH": "/bin", "APPLIANCE_ENGINE_API_KEY": "x"})
    assert env["VLLM_API_KEY"] == "s3cret-internal"
    assert "APPLIANCE_ENGINE_API_KEY" not in env
    assert env["PATH"] == "/bin"


def test_the_engine_keeps_connections_alive_well_past_the_gateways_idle_expiry():
    """A connection the engine closes as a request arrives on it fails that request."""
    env = engine_env(plan_for("gpu"), "k", {})
    assert int(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) >= 10 * KEEPALIVE_EXPIRY_S
    assert engine_env(plan_for("gpu"), "k", {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "9"})[
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "9"


def test_overrides_reach_vllm():
    argv = engine_argv(
        plan_for(
            "gpu",
            max_model_len=1024,
            quantization="fp8",
            enable_prefix_caching=False,
            max_num_seqs=32,
            gpu_memory_utilization=0.8,
            enforce_eager=True,
            kv_cache_memory_bytes=2**30,
            shutdown_grace_s=4.5,
            engine_port=9000,
        ),
        PYTHON,
    )
    assert option(argv, "--max-model-len") == "1024"
    assert option(argv, "--quantization") == "fp8"
    assert "--no-enable-prefix-caching" in argv
    assert option(argv, "--max-num-seqs") == "32"
    assert option(argv, "--gpu-memory-utilization") == "0.8"
    assert option(argv, "--kv-cache-memory-bytes") == str(2**30)
    assert option(argv, "--shutdown-timeout") == "5"
    assert option(argv, "--port") == "9000"
    assert "--enforce-eager" in argv


def test_extra_args_come_last_so_they_win():
    argv = engine_argv(plan_for("gpu", engine_extra_args="--max-num-seqs 8 --seed '4 2'"), PYTHON)
    assert argv[-4:] == ["--max-num-seqs", "8", "--seed", "4 2"]


def test_cpu_is_eager_and_has_no_gpu_fraction():
    argv = engine_argv(plan_for("cpu"), PYTHON)
    assert "--enforce-eager" in argv
    assert "--gpu-memory-utilization" not in argv
    assert "--enforce-eager" not in engine_argv(plan_for("cpu", enforce_eager=False), PYTHON)


def test_cpu_passes_the_planned_kv_cache_size():
    plan = plan_for("cpu")
    assert plan.kv_cache_memory_bytes
    assert option(engine_argv(plan, PYTHON), "--kv-cache-memory-bytes") == str(
        plan.kv_cache_memory_bytes
    )
    assert "--kv-cache-memory-bytes" not in engine_argv(plan_for("gpu"), PYTHON)


def test_cpu_tensor_parallel_pins_threads_per_rank():
    plan = plan_for("cpu", tensor_parallel_size=2)
    assert engine_env(plan, "k", {})["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|2-3"
    assert (
        engine_env(plan, "k", {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})["VLLM_CPU_OMP_THREADS_BIND"]
        == "0|1"
    )
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(plan_for("cpu"), "k", {})


def test_usage_stats_are_off_by_default():
    env = engine_env(plan_for("gpu"), "k", {})
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["DO_NOT_TRACK"] == "1"


@pytest.mark.parametrize(
    ("cpus", "ranks", "expected"),
    [
        ((0, 1), 2, "0|1"),
        ((0, 1, 2, 3), 2, "0-1|2-3"),
        ((0, 1, 2, 3, 4), 2, "0-2|3-4"),
        ((0, 2, 3, 5, 6, 7), 2, "0,2-3|5-7"),
        ((3, 1, 2, 0), 1, "0-3"),
    ],
)
def test_cpu_thread_binding(cpus, ranks, expected):
    assert cpu_thread_binding(cpus, ranks) == expected


def test_cpu_thread_binding_needs_a_core_per_rank():
    with pytest.raises(ValueError):
        cpu_thread_binding((0,), 2)


def test_parsers_chosen_from_the_model_reach_vllm():
    settings = EngineSettings(_env_file=None, model="/models/m")
    info = ModelInfo(Path("/models/m"), 4, 2, 2048, 10, ("Qwen3ForCausalLM",),
                     "<tool_call></tool_call><think></think>")
    argv = engine_argv(plan_engine(settings, [], "cpu", info, (0,)), PYTHON)
    assert "--enable-auto-tool-choice" in argv
    assert option(argv, "--tool-call-parser") == "hermes"
    assert option(argv, "--reasoning-parser") == "qwen3"


def test_no_parser_flags_for_a_model_without_tool_markup_or_when_off():
    argv = engine_argv(plan_for("gpu"), PYTHON)
    assert "--enable-auto-tool-choice" not in argv and "--reasoning-parser" not in argv
    off = engine_argv(plan_for("gpu", tool_call_parser="none", reasoning_parser="none"), PYTHON)
    assert "--tool-call-parser" not in off and "--reasoning-parser" not in off
    forced = engine_argv(plan_for("gpu", tool_call_parser="pythonic"), PYTHON)
    assert option(forced, "--tool-call-parser") == "pythonic"


def test_parser_setting_must_be_one_name():
    with pytest.raises(ValueError):
        EngineSettings(_env_file=None, tool_call_parser="hermes --api-key x")
