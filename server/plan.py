"""Pure policy: settings + the host's GPUs + the model -> how to run vLLM, and why.

Every decision is recorded as a sentence in ``reasons`` (printed at start-up), and every
reason not to start at all as a sentence in ``errors``, so an operator reading the journal
learns what was chosen and what to change.
"""

import ipaddress
from dataclasses import dataclass
from typing import Literal

from server.cluster import SINGLE_NODE, Cluster, cluster_checks, cluster_for
from server.gpus import Gpu
from server.model import ModelInfo
from server.parsers import ModelFamily, choose_parsers
from server.settings import EngineSettings
from server.vllm_build import VllmBuild

GIB = 2**30
MIB = 2**20
Device = Literal["gpu", "cpu"]

CPU_RUNTIME_RESERVE_BYTES = 2 * GIB
"""What vLLM's processes (Python, torch, activations) take on CPU beside weights and KV cache."""
CPU_KV_CACHE_SHARE = 0.5
"""The KV cache's share of the memory left over; the rest stays for the OS, NGINX, the gateway."""
CPU_KV_CACHE_MIN_BYTES = 64 * MIB
CPU_KV_CACHE_MAX_BYTES = 4 * GIB
"""CPU decoding is compute-bound: past this, a bigger cache only admits sequences the cores
cannot serve at a useful speed, while the memory is better left to the page cache."""


@dataclass(frozen=True)
class EnginePlan:
    settings: EngineSettings
    device: Device | None
    tensor_parallel_size: int
    model_path: str
    served_model_name: str
    cpus: tuple[int, ...] = ()
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    cluster: Cluster = SINGLE_NODE
    kv_cache_memory_bytes: int | None = None
    """Per rank; None leaves the size to vLLM (the GPU memory fraction)."""
    reasons: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def choose_device(requested: str, gpus: list[Gpu], build: VllmBuild) -> tuple[Device | None, str]:
    """The device to run on and a sentence saying why (or why none can be used)."""
    if build == "none":
        return None, "vLLM is not installed (install the project's [gpu] or [cpu] extra)"
    if requested == "cpu" or (requested == "auto" and build == "cpu"):
        if build != "cpu":
            return None, "APPLIANCE_DEVICE=cpu but the installed vLLM is the GPU build"
        unused = f" ({len(gpus)} GPUs left unused)" if gpus else ""
        return "cpu", f"running on CPU: vLLM's CPU build is installed{unused}"
    if build != "gpu":
        return None, "APPLIANCE_DEVICE=gpu but the installed vLLM is the CPU build"
    if not gpus:
        return None, "no GPUs found (NVML and nvidia-smi) and no CPU build of vLLM installed"
    return "gpu", f"running on {len(gpus)} GPU(s)"


def auto_tensor_parallel_size(heads: int, kv_heads: int, devices: int) -> int:
    """The largest power of two that is at most ``devices`` and divides both head counts."""
    size = 1
    while size * 2 <= devices and heads % (size * 2) == 0 and kv_heads % (size * 2) == 0:
        size *= 2
    return size


def vllm_can_split(heads: int, kv_heads: int, tp: int) -> bool:
    """vLLM's own rule, looser than ``auto``'s: KV heads may be replicated over the ranks."""
    kv_ok = kv_heads % tp == 0 if kv_heads >= tp else tp % kv_heads == 0
    return heads % tp == 0 and kv_ok


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_name_for(settings: EngineSettings) -> str:
    """The configured name, else the Hugging Face id, else the model directory's name."""
    if settings.served_model_name:
        return settings.served_model_name
    spec = settings.model.rstrip("/")
    if spec.startswith("s3://") or spec.startswith((".", "/")) or spec.count("/") != 1:
        return spec.rsplit("/", 1)[-1]
    return spec


def plan_engine(
    settings: EngineSettings,
    gpus: list[Gpu],
    build: VllmBuild,
    model: ModelInfo,
    cpus: tuple[int, ...],
    available_memory: int | None = None,
) -> EnginePlan:
    reasons: list[str] = []
    errors: list[str] = []
    device, why = choose_device(settings.device, gpus, build)
    (reasons if device else errors).append(why)

    heads, kv_heads = model.num_attention_heads, model.num_key_value_heads
    devices = len(gpus) if device == "gpu" else len(cpus)
    unit = "GPUs" if device == "gpu" else "CPU cores"
    if settings.tensor_parallel_size == "auto":
        if device == "gpu":
            tp = auto_tensor_parallel_size(heads, kv_heads, devices)
            reasons.append(
                f"tensor parallel size {tp}: the largest power of two <= {devices} GPUs that "
                f"divides the model's {heads} attention heads and {kv_heads} KV heads"
                + (f" ({devices - tp} GPUs left idle)" if tp < devices else "")
            )
        else:
            tp = 1
            reasons.append(
                "tensor parallel size 1 on CPU (set APPLIANCE_TENSOR_PARALLEL_SIZE "
                "to split over CPU cores)"
            )
    else:
        tp = settings.tensor_parallel_size
        reasons.append(f"tensor parallel size {tp}, as configured")
        if device and tp > devices:
            errors.append(f"tensor parallel size {tp} needs {tp} {unit}, this host has {devices}")
        if not vllm_can_split(heads, kv_heads, tp):
            errors.append(
                f"tensor parallel size {tp} cannot split the model's {heads} "
                f"attention heads and {kv_heads} KV heads evenly"
            )

    cluster = cluster_for(settings)
    cluster_reasons, cluster_errors = cluster_checks(cluster, device, tp)
    reasons.extend(cluster_reasons)
    errors.extend(cluster_errors)

    if device == "gpu" and gpus and cluster.role != "worker":
        errors.extend(weight_fit_errors(model.weight_bytes, gpus[:tp], tp, cluster.nodes,
                                        settings.gpu_memory_utilization))

    kv_cache_bytes = settings.kv_cache_memory_bytes
    if kv_cache_bytes:
        reasons.append(f"KV cache of {kv_cache_bytes / MIB:.0f} MiB, as configured")
    elif device == "cpu":
        kv_cache_bytes, why = cpu_kv_cache_bytes(available_memory, model.weight_bytes, tp)
        (reasons if kv_cache_bytes else errors).append(why)

    if not is_loopback(settings.engine_host):
        errors.append(
            f"APPLIANCE_ENGINE_HOST={settings.engine_host} is not a loopback address: "
            "the engine must be reachable only through the proxy"
        )

    limit = model.max_position_embeddings
    if settings.max_model_len and limit and settings.max_model_len > limit:
        errors.append(
            f"APPLIANCE_MAX_MODEL_LEN={settings.max_model_len} is over the model's "
            f"limit of {limit} tokens (max_position_embeddings)"
        )

    parsers = choose_parsers(ModelFamily(model.architectures, model.chat_template),
                             settings.tool_call_parser, settings.reasoning_parser)
    reasons.extend(parsers.reasons)

    return EnginePlan(
        settings=settings,
        device=device,
        tensor_parallel_size=tp,
        model_path=str(model.path),
        served_model_name=served_name_for(settings),
        cpus=cpus,
        tool_call_parser=parsers.tool_call_parser,
        reasoning_parser=parsers.reasoning_parser,
        cluster=cluster,
        kv_cache_memory_bytes=kv_cache_bytes,
        reasons=tuple(reasons),
        errors=tuple(errors),
    )


def weight_fit_errors(weight_bytes: int, gpus: list[Gpu], tp: int, nodes: int,
                      utilization: float) -> list[str]:
    """Each GPU holds 1/(tp x nodes) of the weights and must keep room within its fraction."""
    if not gpus:
        return []
    per_gpu = weight_bytes / (tp * nodes)
    where = f" on each of {nodes} nodes" if nodes > 1 else ""
    budget = min(g.memory_bytes for g in gpus) * utilization
    if per_gpu <= budget:
        return []
    return [
        f"the model's weights ({weight_bytes / GIB:.1f} GiB) need {per_gpu / GIB:.1f} GiB per GPU "
        f"at tensor parallel size {tp}{where}, more than the {budget / GIB:.1f} GiB allowed "
        f"({utilization:.0%} of {min(g.memory_bytes for g in gpus) / GIB:.1f} GiB): use more "
        f"GPUs or nodes, a quantized model, or a higher APPLIANCE_GPU_MEMORY_UTILIZATION"
    ]


def cpu_kv_cache_bytes(available: int | None, weight_bytes: int, tp: int) -> tuple[int | None, str]:
    """The KV cache per rank on CPU, sized from the memory actually free, and why.

    vLLM's CPU build otherwise reserves a fixed fraction of the node's whole memory and refuses
    to start when less than that is free, which is the normal state of a developer's machine.
    """
    if available is None:
        return None, (
            "cannot size the KV cache: this host does not report its available memory; "
            "set APPLIANCE_KV_CACHE_MEMORY_BYTES"
        )
    spare = available - weight_bytes - CPU_RUNTIME_RESERVE_BYTES * tp
    share = int(spare * CPU_KV_CACHE_SHARE / tp) // MIB * MIB
    per_rank = min(share, CPU_KV_CACHE_MAX_BYTES)
    if per_rank < CPU_KV_CACHE_MIN_BYTES:
        return None, (
            f"only {available / GIB:.1f} GiB of memory is available: the weights "
            f"({weight_bytes / GIB:.1f} GiB), {CPU_RUNTIME_RESERVE_BYTES / GIB:.0f} GiB per rank "
            f"for vLLM itself and a KV cache of at least {CPU_KV_CACHE_MIN_BYTES // MIB} MiB do "
            "not fit; free memory or set APPLIANCE_KV_CACHE_MEMORY_BYTES"
        )
    ranks = f" per rank ({tp} ranks)" if tp > 1 else ""
    cap = (
        f", at most {CPU_KV_CACHE_MAX_BYTES / GIB:.0f} GiB (CPU decoding is compute-bound)"
        if per_rank < share
        else ""
    )
    return per_rank, (
        f"KV cache of {per_rank / MIB:.0f} MiB{ranks}: {CPU_KV_CACHE_SHARE:.0%} of what is left "
        f"of the {available / GIB:.1f} GiB of memory available once the weights "
        f"({weight_bytes / GIB:.1f} GiB) and {CPU_RUNTIME_RESERVE_BYTES / GIB:.0f} GiB per rank "
        f"for vLLM itself are set aside{cap}; APPLIANCE_KV_CACHE_MEMORY_BYTES fixes a size"
    )
