"""Pure: an EnginePlan -> the command line and environment that start vLLM's OpenAI server.

``python -m vllm.entrypoints.openai.api_server`` rather than ``vllm serve``: the CPU
repackage's distribution is not named ``vllm``, which ``vllm serve`` trips over. The internal
key travels in ``VLLM_API_KEY``, not on the command line, where any local user could read it.
"""

import math
from collections.abc import Mapping, Sequence

from server.cluster import vllm_cluster_args
from server.plan import EnginePlan

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
ENGINE_KEEPALIVE_S = 60


def engine_argv(plan: EnginePlan, python: str, lora: Sequence[str] = ()) -> list[str]:
    """vLLM's arguments; ``APPLIANCE_ENGINE_EXTRA_ARGS`` come last so they override ours.
    ``lora``: the LoRA arguments (``server/adapters.py``'s ``lora_argv``), when it has any."""
    s = plan.settings
    # Options and their values side by side.
    # fmt: off
    argv = [
        python, "-m", API_SERVER_MODULE,
        "--model", plan.model_path,
        "--served-model-name", plan.served_model_name,
        "--host", s.engine_host,
        "--port", str(s.engine_port),
        "--tensor-parallel-size", str(plan.tensor_parallel_size),
        "--dtype", s.dtype,
        "--max-num-seqs", str(s.max_num_seqs),
        "--enable-prefix-caching" if s.enable_prefix_caching else "--no-enable-prefix-caching",
        # Usage names the prompt tokens the prefix cache held: what per-key isolation costs.
        "--enable-prompt-tokens-details",
        # vLLM drains in-flight requests this long on SIGTERM, then aborts them.
        "--shutdown-timeout", str(math.ceil(s.shutdown_grace_s)),
    ]
    # fmt: on
    if plan.device == "gpu":
        argv += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
    if s.max_model_len:
        argv += ["--max-model-len", str(s.max_model_len)]
    if plan.kv_cache_memory_bytes:
        argv += ["--kv-cache-memory-bytes", str(plan.kv_cache_memory_bytes)]
    if s.quantization:
        argv += ["--quantization", s.quantization]
    if plan.tool_call_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", plan.tool_call_parser]
    if plan.reasoning_parser:
        argv += ["--reasoning-parser", plan.reasoning_parser]
    enforce_eager = s.enforce_eager if s.enforce_eager is not None else plan.device == "cpu"
    if enforce_eager:
        argv.append("--enforce-eager")
    return argv + list(lora) + vllm_cluster_args(plan.cluster) + s.extra_args


def engine_env(plan: EnginePlan, api_key: str, base: Mapping[str, str],
               lora: bool = False) -> dict[str, str]:
    """The environment vLLM runs with: the internal key, no phoning home, CPU thread pinning,
    and keep-alive connections held far longer than the gateway keeps them idle (see
    ``proxy/relay/transport.py``), so the engine never closes one as a request arrives on it.
    With LoRA, vLLM's adapter API is opened (only the internal key reaches it), so
    ``appliance-models`` can load and unload adapters at runtime."""
    env = {key: value for key, value in base.items() if key != "APPLIANCE_ENGINE_API_KEY"}
    env["VLLM_API_KEY"] = api_key
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(ENGINE_KEEPALIVE_S))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    if plan.device == "cpu" and plan.tensor_parallel_size > 1:
        env.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(plan.cpus, plan.tensor_parallel_size)
        )
    return env


def cpu_thread_binding(cpus: tuple[int, ...], ranks: int) -> str:
    """Split the usable CPUs into ``ranks`` contiguous groups, vLLM's ``0-3|4-7`` syntax."""
    ordered = sorted(cpus)
    if ranks < 1 or len(ordered) < ranks:
        raise ValueError(f"cannot split {len(ordered)} CPUs over {ranks} ranks")
    size, extra = divmod(len(ordered), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        end = start + size + (1 if rank < extra else 0)
        groups.append(_cpu_list(ordered[start:end]))
        start = end
    return "|".join(groups)


def _cpu_list(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for cpu in cpus:
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
