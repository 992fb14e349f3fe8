"""Pure: one model over several nodes (vLLM pipeline parallel over a Ray cluster).

Every node runs the same image with the same model. The head starts a Ray cluster and then
vLLM's API server, which places one pipeline stage of ``tensor_parallel_size`` GPUs on each
node; a worker joins the head's cluster and blocks there, lending its GPUs. Nodes are the
same instance type, so the tensor-parallel size the head picks for its own GPUs fits each.
"""

from dataclasses import dataclass

from server.settings import EngineSettings


@dataclass(frozen=True)
class Cluster:
    role: str
    nodes: int
    head_address: str
    port: int

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1


SINGLE_NODE = Cluster("single", 1, "", 0)


def cluster_for(settings: EngineSettings) -> Cluster:
    return Cluster(settings.node_role, settings.pipeline_parallel_size, settings.head_address,
                   settings.ray_port)


def cluster_checks(cluster: Cluster, device: str | None, tp: int) -> tuple[list[str], list[str]]:
    """(reasons, errors) for a cluster layout; a single node has nothing to say."""
    reasons: list[str] = []
    errors: list[str] = []
    if not cluster.multi_node:
        if cluster.role != "single":
            errors.append(f"APPLIANCE_NODE_ROLE={cluster.role} needs "
                          "APPLIANCE_PIPELINE_PARALLEL_SIZE above 1 (the number of nodes)")
        return reasons, errors
    if cluster.role == "single":
        errors.append(f"APPLIANCE_PIPELINE_PARALLEL_SIZE={cluster.nodes} spreads the model over "
                      f"{cluster.nodes} nodes: set APPLIANCE_NODE_ROLE=head on one and worker "
                      "on the others")
    if cluster.role == "worker" and not cluster.head_address:
        errors.append("a worker node needs APPLIANCE_HEAD_ADDRESS, the head's private address")
    if device == "cpu":
        errors.append("multi-node serving runs on GPUs only")
    if cluster.role == "head":
        reasons.append(f"head of {cluster.nodes} nodes: pipeline parallel size {cluster.nodes}, "
                       f"tensor parallel size {tp} on each, {cluster.nodes * tp} GPUs in all, "
                       f"over Ray on port {cluster.port}")
    elif cluster.role == "worker":
        reasons.append(f"worker of a {cluster.nodes}-node cluster: lends its GPUs to the head at "
                       f"{cluster.head_address}:{cluster.port} and serves nothing itself")
    return reasons, errors


def ray_argv(cluster: Cluster, ray: str, gpus: int) -> list[str]:
    """``ray start`` for this node: the head returns once its cluster runs; a worker blocks."""
    common = ["--num-gpus", str(gpus), "--disable-usage-stats"]
    if cluster.role == "head":
        return [ray, "start", "--head", "--port", str(cluster.port), *common]
    return [ray, "start", "--address", f"{cluster.head_address}:{cluster.port}", *common,
            "--block"]


def vllm_cluster_args(cluster: Cluster) -> list[str]:
    if not cluster.multi_node:
        return []
    return ["--pipeline-parallel-size", str(cluster.nodes),
            "--distributed-executor-backend", "ray"]
