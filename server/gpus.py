"""What GPUs this host has: NVML first, ``nvidia-smi`` when the NVML library cannot be loaded."""

import shutil
import subprocess
from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_bytes: int


def detect_gpus() -> list[Gpu]:
    """The host's NVIDIA GPUs; empty when there are none or no driver."""
    gpus = nvml_gpus()
    if gpus is None:
        gpus = nvidia_smi_gpus()
    return gpus or []


def nvml_gpus() -> list[Gpu] | None:
    """GPUs as NVML sees them; ``None`` when NVML (the driver's library) is not usable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode()
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(Gpu(index=index, name=name, memory_bytes=int(memory)))
        return gpus
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def nvidia_smi_gpus(timeout: float = 30.0) -> list[Gpu] | None:
    """GPUs as ``nvidia-smi`` lists them; ``None`` when it is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return parse_nvidia_smi(result.stdout)


def parse_nvidia_smi(csv_text: str) -> list[Gpu]:
    """Parse ``index, name, memory.total [MiB]`` lines; names may themselves hold commas."""
    gpus = []
    for line in csv_text.splitlines():
        if not line.strip():
            continue
        index, rest = line.split(",", 1)
        name, memory_mib = rest.rsplit(",", 1)
        gpus.append(
            Gpu(index=int(index), name=name.strip(), memory_bytes=int(float(memory_mib)) * MIB)
        )
    return gpus


def describe(gpus: list[Gpu]) -> str:
    if not gpus:
        return "no GPUs"
    return ", ".join(f"#{g.index} {g.name} ({g.memory_bytes / 2**30:.1f} GiB)" for g in gpus)
