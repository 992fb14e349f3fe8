"""One model over several nodes: the plan's checks and the Ray and vLLM command lines, pure."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.argv import engine_argv
from server.cluster import cluster_for, ray_argv
from server.gpus import Gpu
from server.model import ModelInfo
from server.plan import plan_engine
from server.settings import EngineSettings

GIB = 2**30
RAY = "/venv/bin/ray"


def plan_for(gpus: int = 8, weight_gib: float = 16, device: str = "gpu", **values):
    settings = EngineSettings(_env_file=None, model="/models/m", **values)
    found = [Gpu(i, "H100", 80 * GIB) for i in range(gpus)]
    info = ModelInfo(Path("/models/m"), 64, 8, 8192, int(weight_gib * GIB))
    return plan_engine(settings, found if device == "gpu" else [], device, info, (0, 1))


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_one_node_is_the_default_and_adds_nothing():
    plan = plan_for()
    assert plan.ok and not plan.cluster.multi_node
    argv = engine_argv(plan, "python")
    assert "--pipeline-parallel-size" not in argv
    assert "--distributed-executor-backend" not in argv


def test_the_head_runs_vllm_over_ray_with_one_stage_per_node():
    plan = plan_for(pipeline_parallel_size=2, node_role="head")
    assert plan.ok, plan.errors
    argv = engine_argv(plan, "python")
    assert option(argv, "--pipeline-parallel-size") == "2"
    assert option(argv, "--tensor-parallel-size") == "8"
    assert option(argv, "--distributed-executor-backend") == "ray"
    assert option(argv, "--host") == "127.0.0.1"
    assert any("2 nodes" in r and "16 GPUs in all" in r for r in plan.reasons)
    assert ray_argv(plan.cluster, RAY, 8) == [
        RAY, "start", "--head", "--port", "6380", "--num-gpus", "8", "--disable-usage-stats"]


def test_a_worker_joins_the_head_and_blocks():
    plan = plan_for(pipeline_parallel_size=2, node_role="worker", head_address="10.0.1.5")
    assert plan.ok, plan.errors
    assert ray_argv(plan.cluster, RAY, plan.tensor_parallel_size) == [
        RAY, "start", "--address", "10.0.1.5:6380", "--num-gpus", "8", "--disable-usage-stats",
        "--block"]


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"pipeline_parallel_size": 2}, "set APPLIANCE_NODE_ROLE=head on one"),
        ({"node_role": "head"}, "needs APPLIANCE_PIPELINE_PARALLEL_SIZE above 1"),
        ({"pipeline_parallel_size": 3, "node_role": "worker"}, "needs APPLIANCE_HEAD_ADDRESS"),
    ],
)
def test_an_incomplete_cluster_is_refused_with_what_to_set(values, error):
    plan = plan_for(**values)
    assert not plan.ok
    assert any(error in e for e in plan.errors), plan.errors


def test_multi_node_is_gpu_only():
    plan = plan_for(device="cpu", pipeline_parallel_size=2, node_role="head")
    assert any("GPUs only" in e for e in plan.errors)


def test_weights_too_big_for_one_node_fit_when_split_over_nodes():
    """640 GiB of weights do not fit 8 x 80 GiB at 90%, but do over two such nodes."""
    one = plan_for(weight_gib=640)
    assert any("per GPU at tensor parallel size 8" in e for e in one.errors)
    two = plan_for(weight_gib=640, pipeline_parallel_size=2, node_role="head")
    assert two.ok, two.errors


def test_the_role_is_one_of_three():
    with pytest.raises(ValidationError):
        EngineSettings(_env_file=None, node_role="leader")


def test_settings_come_from_user_data_names(monkeypatch):
    monkeypatch.setenv("APPLIANCE_PIPELINE_PARALLEL_SIZE", "4")
    monkeypatch.setenv("APPLIANCE_NODE_ROLE", "worker")
    monkeypatch.setenv("APPLIANCE_HEAD_ADDRESS", "10.0.0.9")
    cluster = cluster_for(EngineSettings(_env_file=None))
    assert (cluster.nodes, cluster.role, cluster.head_address) == (4, "worker", "10.0.0.9")
