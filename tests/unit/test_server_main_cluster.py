"""``appliance-engine --dry-run`` on a head and on a worker: what each would start.

The host is stood in for (eight GPUs, vLLM's GPU build, a model on disk); the rest is the
launcher's own flow from settings to the printed commands.
"""

from pathlib import Path

import pytest

from server import main as launcher
from server.gpus import Gpu
from server.model import ModelInfo

GIB = 2**30


@pytest.fixture
def gpu_host(monkeypatch, tmp_path):
    monkeypatch.setenv("APPLIANCE_ENV_FILE", str(tmp_path / "absent.env"))
    monkeypatch.setenv("APPLIANCE_MODEL", "/models/m")
    monkeypatch.setattr(launcher, "detect_gpus", lambda: [Gpu(i, "H100", 80 * GIB)
                                                          for i in range(8)])
    monkeypatch.setattr(launcher, "installed_vllm", lambda: "gpu")
    monkeypatch.setattr(launcher, "fetch_model", lambda spec, cache: Path(spec))
    monkeypatch.setattr(launcher, "read_model_info",
                        lambda path: ModelInfo(path, 64, 8, 8192, 600 * GIB))
    return monkeypatch


def test_the_head_prints_ray_start_and_vllm_over_two_nodes(gpu_host, capsys):
    gpu_host.setenv("APPLIANCE_PIPELINE_PARALLEL_SIZE", "2")
    gpu_host.setenv("APPLIANCE_NODE_ROLE", "head")
    assert launcher.main(["--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "ray start --head --port 6380 --num-gpus 8 --disable-usage-stats" in err
    assert "--pipeline-parallel-size 2 --distributed-executor-backend ray" in err


def test_a_worker_prints_only_ray_start_block(gpu_host, capsys):
    gpu_host.setenv("APPLIANCE_PIPELINE_PARALLEL_SIZE", "2")
    gpu_host.setenv("APPLIANCE_NODE_ROLE", "worker")
    gpu_host.setenv("APPLIANCE_HEAD_ADDRESS", "10.0.1.5")
    assert launcher.main(["--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "ray start --address 10.0.1.5:6380 --num-gpus 8 --disable-usage-stats --block" in err
    assert "vLLM command" not in err


def test_a_model_too_big_for_one_node_is_refused_there(gpu_host, capsys):
    assert launcher.main(["--dry-run"]) == launcher.EXIT_PREFLIGHT
    assert "use more GPUs or nodes" in capsys.readouterr().err
