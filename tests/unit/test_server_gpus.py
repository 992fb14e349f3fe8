"""GPU detection: ``nvidia-smi`` fallback against a stand-in script on PATH, NVML absent here."""

import os
import stat
from pathlib import Path

import pytest

from server.gpus import (
    MIB,
    Gpu,
    describe,
    detect_gpus,
    nvidia_smi_gpus,
    nvml_gpus,
    parse_nvidia_smi,
)

SMI_OUTPUT = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n"
EXPECTED = [Gpu(i, "NVIDIA H100 80GB HBM3", 81559 * MIB) for i in range(2)]


def fake_smi(directory: Path, body: str) -> None:
    """An ``nvidia-smi`` that answers only the query the launcher makes."""
    script = directory / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$*" != "--query-gpu=index,name,memory.total --format=csv,noheader,nounits" ]; then\n'
        '  echo "unexpected arguments: $*" >&2; exit 2\n'
        "fi\n" + body
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def smi_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_nvidia_smi_lists_gpus(smi_path):
    fake_smi(smi_path, f"printf '{SMI_OUTPUT}'\n")
    assert nvidia_smi_gpus() == EXPECTED


def test_nvidia_smi_failing_means_no_answer(smi_path):
    fake_smi(
        smi_path,
        "echo 'NVIDIA-SMI has failed because it could not communicate "
        "with the NVIDIA driver.'\nexit 9\n",
    )
    assert nvidia_smi_gpus() is None


def test_nvidia_smi_absent_means_no_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert nvidia_smi_gpus() is None


@pytest.mark.skipif(nvml_gpus() is not None, reason="this host has a working NVML")
def test_without_nvml_detection_falls_back_to_nvidia_smi(smi_path):
    fake_smi(smi_path, f"printf '{SMI_OUTPUT}'\n")
    assert detect_gpus() == EXPECTED


@pytest.mark.skipif(nvml_gpus() is not None, reason="this host has a working NVML")
def test_no_nvml_and_no_nvidia_smi_means_no_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpus() == []


def test_parse_keeps_commas_inside_names():
    assert parse_nvidia_smi("3, NVIDIA A100-SXM4-40GB, rev 2, 40960\n\n") == [
        Gpu(3, "NVIDIA A100-SXM4-40GB, rev 2", 40960 * MIB)
    ]


def test_describe():
    assert describe([]) == "no GPUs"
    assert describe(EXPECTED[:1]) == "#0 NVIDIA H100 80GB HBM3 (79.6 GiB)"
