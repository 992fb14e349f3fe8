"""``appliance-engine``: settings -> GPUs -> model fetch -> plan -> exec vLLM.

With a models file, ``--replica N`` starts replica N of the placement plan (one process and
one systemd unit, ``appliance-engine@N``, a replica; ``--plan`` lists them): every replica is
its own vLLM on its own port and GPUs, supervised and restarted on its own, and the gateway
routes to it by model. vLLM's own ``--data-parallel-size`` would put a model's replicas behind
one port in one process tree: one crash or restart would take every replica of the model down
together, and the gateway could not keep a prompt's prefix on the replica that has it cached.

The launcher replaces itself with vLLM (``exec``), so systemd supervises vLLM directly and
its SIGTERM reaches vLLM, which drains in-flight requests for ``APPLIANCE_SHUTDOWN_GRACE_S``
(``--shutdown-timeout``) before it stops.
"""

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from pydantic import ValidationError

from server.adapters import (
    Adapter,
    AdaptersError,
    adapter_rank,
    adapters_of,
    lora_argv,
    read_adapters,
)
from server.argv import engine_argv, engine_env
from server.cluster import ray_argv
from server.gpus import Gpu, describe, detect_gpus
from server.host_memory import available_memory_bytes
from server.internal_key import KeyFileError, ensure_internal_key
from server.model import (
    ModelError,
    fetch_model,
    local_model_dir,
    read_model_info,
    read_model_shape,
)
from server.models_file import ModelsFileError, ModelSpec, model_specs
from server.placement import place_models, render_plan
from server.plan import choose_device, plan_engine, served_name_for
from server.settings import EngineSettings, env_file_path, load_settings
from server.vllm_build import VllmBuild, installed_vllm

EXIT_PREFLIGHT = 2


def say(message: str) -> None:
    print(f"appliance-engine: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="appliance-engine",
        description="Start vLLM sized to this host's GPUs (settings: APPLIANCE_* variables).",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="fetch the model and print the plan and vLLM's command; start nothing",
    )
    parser.add_argument(
        "--replica",
        type=int,
        metavar="N",
        help="start replica N of the models file's placement plan (see --plan)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print where every model of the models file would run (replicas, GPUs, ports, "
        "tensor parallel size, memory fraction) and why; fetch and start nothing",
    )
    parser.add_argument(
        "--list-replicas",
        action="store_true",
        help="print one line per replica of the plan, 'INDEX MODEL PORT', for scripts (make run, "
        "first boot); start nothing",
    )
    parser.add_argument(
        "--fetch",
        action="store_true",
        help="with --plan or --list-replicas: fetch the models that are not here yet first",
    )
    args = parser.parse_args(argv)

    env_file = env_file_path()
    try:
        settings = load_settings(env_file)
    except ValidationError as exc:
        say(f"invalid settings: {exc}")
        return EXIT_PREFLIGHT
    if args.plan or args.list_replicas:
        return show_plan(settings, listing=args.list_replicas, fetch=args.fetch)

    gpus, build = detect_gpus(), installed_vllm()
    say(f"found {describe(gpus)}; vLLM build: {build}")
    if args.replica is not None:
        return start_replica(args.replica, settings, gpus, build, env_file, args.dry_run)
    return start_engine(settings, gpus, build, env_file, args.dry_run)


def start_engine(settings: EngineSettings, gpus: list[Gpu], build: VllmBuild, env_file: Path,
                 dry_run: bool, extra_args: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None,
                 static_adapters: tuple[Adapter, ...] = ()) -> int:
    """Plan one engine of ``settings``' model on ``gpus`` and exec vLLM (or print, dry)."""
    device, why = choose_device(settings.device, gpus, build)
    if device is None:
        say(f"cannot start: {why}")
        return EXIT_PREFLIGHT

    try:
        model = read_model_info(fetch_model(settings.model, settings.model_cache))
    except ModelError as exc:
        say(f"cannot start: {exc}")
        return EXIT_PREFLIGHT

    cpus = tuple(sorted(os.sched_getaffinity(0)))
    plan = plan_engine(settings, gpus, build, model, cpus, available_memory_bytes())
    for reason in plan.reasons:
        say(reason)
    for error in plan.errors:
        say(f"cannot start: {error}")
    if not plan.ok:
        return EXIT_PREFLIGHT

    try:
        lora = lora_args(settings, static_adapters)
    except (AdaptersError, ModelError) as exc:
        say(f"cannot start: {exc}")
        return EXIT_PREFLIGHT

    ray = str(Path(sys.executable).with_name("ray"))
    if plan.cluster.role == "worker":
        command = ray_argv(plan.cluster, ray, plan.tensor_parallel_size)
        say(f"Ray worker command: {shlex.join(command)}")
        if dry_run:
            return 0
        sys.stdout.flush()
        os.execv(command[0], command)
    command = [*engine_argv(plan, sys.executable, lora), *extra_args]
    if plan.cluster.role == "head":
        ray_head = ray_argv(plan.cluster, ray, plan.tensor_parallel_size)
        say(f"Ray head command: {shlex.join(ray_head)}")
    say(f"vLLM command: {shlex.join(command)}")
    if dry_run:
        return 0
    if plan.cluster.role == "head" and subprocess.run(ray_head, check=False).returncode != 0:
        say("cannot start: the Ray head did not start")
        return EXIT_PREFLIGHT
    try:
        api_key = settings.engine_api_key or ensure_internal_key(env_file)
    except KeyFileError as exc:
        say(f"cannot start: {exc}")
        return EXIT_PREFLIGHT
    sys.stdout.flush()
    os.execve(command[0], command, engine_env(plan, api_key, {**os.environ, **(extra_env or {})},
                                                 lora=bool(lora)))
    return 1  # not reached: execve replaces this process


def lora_args(settings: EngineSettings, static: tuple[Adapter, ...]) -> list[str]:
    """vLLM's LoRA arguments for this model: its adapters (the models file's and the adapters
    list's), fetched; none when it has no adapter and ``enable_lora`` is off (LoRA costs
    memory)."""
    adapters = adapters_of(served_name_for(settings), static, read_adapters(settings.adapters_file))
    if not adapters and not settings.enable_lora:
        return []
    paths = [(a.name, fetch_model(a.source, settings.model_cache)) for a in adapters]
    say("LoRA on: " + (", ".join(f"adapter {name} from {path}" for name, path in paths)
                       or "no adapter yet (enable_lora)"))
    return lora_argv(paths, [adapter_rank(path) for _, path in paths])


def read_specs(settings: EngineSettings) -> list[ModelSpec] | None:
    """The models to serve (the models file, else ``APPLIANCE_MODEL``), or None once every
    mistake in the file is said."""
    try:
        specs, why = model_specs(settings)
    except ModelsFileError as exc:
        for error in exc.errors:
            say(f"cannot start: {error}")
        return None
    say(why)
    return specs


def start_replica(index: int, settings: EngineSettings, gpus: list[Gpu], build: VllmBuild,
                  env_file: Path, dry_run: bool) -> int:
    """Replica ``index`` of the placement plan: its model's settings with the plan's port,
    GPUs, tensor-parallel size and memory share over them. Every model is fetched first (the
    plan reads every model's shape; a complete fetch is never repeated)."""
    specs = read_specs(settings)
    if specs is None:
        return EXIT_PREFLIGHT
    try:
        models = [(spec, read_model_shape(fetch_model(spec.source, settings.model_cache),
                                          spec.settings.dtype)) for spec in specs]
    except ModelError as exc:
        say(f"cannot start: {exc}")
        return EXIT_PREFLIGHT
    plan = place_models(models, gpus, build, device=settings.device,
                        first_port=settings.engine_port,
                        available_memory=available_memory_bytes())
    for error in plan.errors:
        say(f"cannot start: {error}")
    if not plan.ok:
        return EXIT_PREFLIGHT
    if not 0 <= index < len(plan.replicas):
        say(f"cannot start: the plan has {len(plan.replicas)} replicas (0 to "
            f"{len(plan.replicas) - 1}), not {index}: see appliance-engine --plan")
        return EXIT_PREFLIGHT
    name, replica = plan.replicas[index]
    spec = next(spec for spec in specs if spec.name == name)
    placed = next(model for model in plan.models if model.name == name)
    update: dict[str, object] = {"engine_port": replica.port,
                                 "tensor_parallel_size": placed.tensor_parallel_size}
    if replica.memory_fraction is not None:
        update["gpu_memory_utilization"] = replica.memory_fraction
    if replica.kv_cache_memory_bytes is not None:
        update["kv_cache_memory_bytes"] = replica.kv_cache_memory_bytes
    say(f"replica {index}: {name} on port {replica.port}"
        + (f", GPUs {','.join(map(str, replica.gpus))}" if replica.gpus else ""))
    visible = [gpu for gpu in gpus if gpu.index in replica.gpus]
    extra_env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, replica.gpus))} if replica.gpus \
        else {}
    extra_args = ("--runner", "pooling") if spec.task == "embed" else ()
    return start_engine(spec.settings.model_copy(update=update), visible, build, env_file,
                        dry_run, extra_args, extra_env, spec.adapters)


def show_plan(settings: EngineSettings, listing: bool = False, fetch: bool = False) -> int:
    """``--plan``: every model's placement on this host, printed; 0 when it can start, else 2.

    It reads the models' ``config.json`` and weight sizes where they already are (a local
    directory, or a complete copy in the model cache) and fetches nothing, unless ``fetch``
    (first boot, which must know the replicas before it enables their units)."""
    specs = read_specs(settings)
    if specs is None:
        return EXIT_PREFLIGHT
    if settings.node_role != "single":
        say(f"cannot start: --plan places models on one node, and APPLIANCE_NODE_ROLE is "
            f"{settings.node_role}: use --dry-run")
        return EXIT_PREFLIGHT
    gpus, build = detect_gpus(), installed_vllm()
    say(f"found {describe(gpus)}; vLLM build: {build}")
    models, unread = [], []
    for spec in specs:
        try:
            path = (fetch_model if fetch else local_model_dir)(spec.source, settings.model_cache)
            models.append((spec, read_model_shape(path, spec.settings.dtype)))
        except ModelError as exc:
            unread.append(f"{spec.name}: {exc}")
    for error in unread:
        say(f"cannot start: {error}")
    if unread:
        return EXIT_PREFLIGHT
    plan = place_models(models, gpus, build, device=settings.device,
                        first_port=settings.engine_port,
                        available_memory=available_memory_bytes())
    if listing and plan.ok:
        for index, (name, replica) in enumerate(plan.replicas):
            print(index, name, replica.port)
    elif not listing:
        print(render_plan(plan), flush=True)
    for error in plan.errors if listing else ():
        say(f"cannot start: {error}")
    return 0 if plan.ok else EXIT_PREFLIGHT


if __name__ == "__main__":
    sys.exit(main())
