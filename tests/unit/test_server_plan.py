"""Tensor-parallel sizing and the preflight checks, as pure functions (no GPUs, no files)."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.gpus import Gpu
from server.model import ModelInfo
from server.plan import (
    CPU_KV_CACHE_MAX_BYTES,
    CPU_KV_CACHE_MIN_BYTES,
    auto_tensor_parallel_size,
    choose_device,
    cpu_kv_cache_bytes,
    plan_engine,
    served_name_for,
    vllm_can_split,
)
from server.settings import EngineSettings

GIB = 2**30
MIB = 2**20
CPUS = (0, 1)
MEMORY = 16 * GIB


def gpus(count: int, memory_gib: float = 80) -> list[Gpu]:
    return [
        Gpu(index=i, name="NVIDIA H100 80GB HBM3", memory_bytes=int(memory_gib * GIB))
        for i in range(count)
    ]


def model(
    heads: int = 32, kv_heads: int = 8, weight_gib: float = 16, max_len: int | None = 8192
) -> ModelInfo:
    return ModelInfo(
        path=Path("/models/m"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_len,
        weight_bytes=int(weight_gib * GIB),
    )


def settings(**values) -> EngineSettings:
    return EngineSettings(_env_file=None, model="/models/m", **values)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "devices", "expected"),
    [
        (32, 8, 8, 8),
        (32, 8, 4, 4),
        (32, 8, 6, 4),  # largest power of two under 6
        (32, 8, 3, 2),
        (32, 8, 1, 1),
        (32, 8, 0, 1),
        (28, 4, 8, 4),  # Qwen2-7B: 28 heads stop at 4
        (64, 8, 16, 8),  # KV heads cap it
        (40, 40, 8, 8),
        (14, 2, 8, 2),
        (25, 5, 8, 1),  # odd head counts cannot be split
        (4, 2, 2, 2),  # the tiny test model
    ],
)
def test_auto_tensor_parallel_size(heads, kv_heads, devices, expected):
    assert auto_tensor_parallel_size(heads, kv_heads, devices) == expected


@given(
    kv_heads=st.integers(1, 128),
    group=st.integers(1, 16),
    devices=st.integers(0, 64),
)
def test_auto_size_is_the_largest_valid_power_of_two(kv_heads, group, devices):
    heads = kv_heads * group
    size = auto_tensor_parallel_size(heads, kv_heads, devices)
    assert size & (size - 1) == 0
    assert size <= max(devices, 1)
    assert heads % size == 0 and kv_heads % size == 0
    bigger = size * 2
    assert bigger > devices or heads % bigger or kv_heads % bigger


def test_auto_uses_every_gpu_the_heads_allow_and_says_why():
    plan = plan_engine(settings(), gpus(8), "gpu", model(), CPUS)
    assert plan.ok
    assert plan.device == "gpu"
    assert plan.tensor_parallel_size == 8
    assert any("tensor parallel size 8" in r and "32 attention heads" in r for r in plan.reasons)


def test_auto_reports_gpus_left_idle():
    plan = plan_engine(settings(), gpus(6), "gpu", model(), CPUS)
    assert plan.tensor_parallel_size == 4
    assert any("2 GPUs left idle" in r for r in plan.reasons)


def test_weights_that_do_not_fit_refuse_to_start():
    plan = plan_engine(settings(), gpus(2, memory_gib=24), "gpu", model(weight_gib=140), CPUS)
    assert not plan.ok
    assert any("need 70.0 GiB per GPU at tensor parallel size 2" in e for e in plan.errors)


def test_weights_fit_once_split():
    plan = plan_engine(settings(), gpus(4, memory_gib=80), "gpu", model(weight_gib=140), CPUS)
    assert plan.ok, plan.errors
    assert plan.tensor_parallel_size == 4


def test_memory_fraction_counts_in_the_fit():
    tight = model(weight_gib=75)
    assert plan_engine(settings(gpu_memory_utilization=0.95), gpus(1), "gpu", tight, CPUS).ok
    assert not plan_engine(settings(gpu_memory_utilization=0.9), gpus(1), "gpu", tight, CPUS).ok


def test_explicit_size_over_gpu_count_is_refused():
    plan = plan_engine(settings(tensor_parallel_size=4), gpus(2), "gpu", model(), CPUS)
    assert any("needs 4 GPUs, this host has 2" in e for e in plan.errors)


def test_explicit_size_that_cannot_split_heads_is_refused():
    plan = plan_engine(settings(tensor_parallel_size=3), gpus(4), "gpu", model(), CPUS)
    assert any("cannot split the model's 32 attention heads" in e for e in plan.errors)


def test_explicit_size_may_replicate_kv_heads_like_vllm():
    assert vllm_can_split(heads=32, kv_heads=2, tp=8)
    assert not vllm_can_split(heads=32, kv_heads=3, tp=8)
    assert plan_engine(settings(tensor_parallel_size=8), gpus(8), "gpu", model(kv_heads=2), CPUS).ok


def test_max_model_len_over_model_limit_is_refused():
    plan = plan_engine(settings(max_model_len=9000), gpus(1), "gpu", model(), CPUS)
    assert any("over the model's limit of 8192" in e for e in plan.errors)
    assert plan_engine(settings(max_model_len=8192), gpus(1), "gpu", model(), CPUS).ok


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_hosts_are_accepted(host):
    assert plan_engine(settings(engine_host=host), gpus(1), "gpu", model(), CPUS).ok


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::", "engine.internal"])
def test_engine_never_listens_beyond_loopback(host):
    plan = plan_engine(settings(engine_host=host), gpus(1), "gpu", model(), CPUS)
    assert any("not a loopback address" in e for e in plan.errors)


def test_no_gpus_and_no_cpu_build_is_refused():
    plan = plan_engine(settings(), [], "gpu", model(), CPUS)
    assert plan.device is None
    assert any("no GPUs found" in e and "no CPU build" in e for e in plan.errors)


def test_missing_vllm_is_refused():
    assert choose_device("auto", gpus(1), "none")[0] is None


def test_cpu_build_runs_on_cpu_with_size_one_by_default():
    tiny = model(heads=4, kv_heads=2, weight_gib=0.01)
    plan = plan_engine(settings(), [], "cpu", tiny, CPUS, MEMORY)
    assert plan.ok
    assert (plan.device, plan.tensor_parallel_size) == ("cpu", 1)


def test_cpu_tensor_parallel_is_bounded_by_cores():
    tiny = model(heads=4, kv_heads=2, weight_gib=0.01)
    assert plan_engine(settings(tensor_parallel_size=2), [], "cpu", tiny, CPUS, MEMORY).ok
    plan = plan_engine(settings(tensor_parallel_size=4), [], "cpu", tiny, CPUS, MEMORY)
    assert any("needs 4 CPU cores, this host has 2" in e for e in plan.errors)


def test_device_gpu_requested_without_gpus():
    device, why = choose_device("gpu", [], "gpu")
    assert device is None and "no GPUs" in why


def test_device_gpu_requested_with_cpu_build():
    device, why = choose_device("gpu", gpus(1), "cpu")
    assert device is None and "CPU build" in why


def test_device_cpu_requested_with_gpu_build():
    device, why = choose_device("cpu", gpus(1), "gpu")
    assert device is None and "GPU build" in why


@pytest.mark.parametrize(
    ("spec", "configured", "expected"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "", "meta-llama/Llama-3.1-8B-Instruct"),
        ("/srv/models/tiny/", "", "tiny"),
        ("s3://bucket/models/llama-8b", "", "llama-8b"),
        ("/srv/models/tiny", "chat", "chat"),
    ],
)
def test_served_name(spec, configured, expected):
    assert (
        served_name_for(EngineSettings(_env_file=None, model=spec, served_model_name=configured))
        == expected
    )


def test_cpu_kv_cache_fits_the_memory_actually_available():
    """The reported failure: 13.7 of 15.09 GiB free, where vLLM's own 92% did not fit."""
    tiny = model(heads=4, kv_heads=2, weight_gib=0.01)
    plan = plan_engine(settings(), [], "cpu", tiny, CPUS, int(13.7 * GIB))
    assert plan.ok
    assert plan.kv_cache_memory_bytes is not None
    assert plan.kv_cache_memory_bytes <= (13.7 - 2) / 2 * GIB
    assert plan.kv_cache_memory_bytes % MIB == 0
    assert any("KV cache of" in r and "13.7 GiB" in r for r in plan.reasons)


@given(
    available=st.integers(min_value=0, max_value=2**40),
    weights=st.integers(min_value=0, max_value=2**38),
    tp=st.integers(min_value=1, max_value=8),
)
def test_cpu_kv_cache_never_takes_more_than_is_left(available, weights, tp):
    size, why = cpu_kv_cache_bytes(available, weights, tp)
    if size is None:
        assert "APPLIANCE_KV_CACHE_MEMORY_BYTES" in why
    else:
        assert CPU_KV_CACHE_MIN_BYTES <= size <= CPU_KV_CACHE_MAX_BYTES
        assert weights + tp * (size + 2 * GIB) <= available


def test_cpu_kv_cache_is_capped_on_big_hosts():
    size, why = cpu_kv_cache_bytes(256 * GIB, GIB, 1)
    assert size == CPU_KV_CACHE_MAX_BYTES
    assert "at most 4 GiB" in why


def test_cpu_kv_cache_is_split_over_ranks():
    one, _ = cpu_kv_cache_bytes(12 * GIB, GIB, 1)
    two, why = cpu_kv_cache_bytes(12 * GIB, GIB, 2)
    assert one and two and two < one / 2 + 1
    assert "per rank (2 ranks)" in why


def test_too_little_memory_on_cpu_is_refused_with_the_fix():
    tiny = model(heads=4, kv_heads=2, weight_gib=0.01)
    plan = plan_engine(settings(), [], "cpu", tiny, CPUS, 2 * GIB)
    assert not plan.ok
    assert any("2.0 GiB of memory is available" in e for e in plan.errors)
    assert plan_engine(settings(kv_cache_memory_bytes=64 * MIB), [], "cpu", tiny, CPUS, GIB).ok


def test_unknown_memory_on_cpu_asks_for_a_size():
    tiny = model(heads=4, kv_heads=2, weight_gib=0.01)
    plan = plan_engine(settings(), [], "cpu", tiny, CPUS, None)
    assert any("APPLIANCE_KV_CACHE_MEMORY_BYTES" in e for e in plan.errors)


def test_configured_kv_cache_wins_on_cpu():
    tiny = model(heads=4, kv_heads=2, weight_gib=0.01)
    plan = plan_engine(settings(kv_cache_memory_bytes=256 * MIB), [], "cpu", tiny, CPUS, MEMORY)
    assert plan.kv_cache_memory_bytes == 256 * MIB
    assert any("256 MiB, as configured" in r for r in plan.reasons)


def test_gpu_leaves_the_kv_cache_to_the_memory_fraction():
    plan = plan_engine(settings(), gpus(1), "gpu", model(), CPUS, MEMORY)
    assert plan.kv_cache_memory_bytes is None
