"""Pure policy: the models of the models file + the host's GPUs -> where every replica runs.

The rule, in the order it is applied (every decision is recorded as a sentence in
``reasons``, every reason not to start at all in ``errors``, before anything starts):

1. **What one GPU of a replica holds.** At tensor-parallel size *t*, each of its *t* GPUs
   holds 1/*t* of the weights, ``RUNTIME_RESERVE_BYTES`` (2 GiB) for vLLM itself (CUDA
   context, NCCL buffers, the activation peak of its profiling run, CUDA graphs: an estimate
   on the safe side for the models in ``docs/engine.md``'s table) and its share of a KV cache
   worth serving. It may take ``gpu_memory_utilization`` of the GPU (0.9 by default).
2. **A KV cache worth serving** holds one sequence at the full context (``max_model_len``,
   else the model's own limit: vLLM refuses to start without room for it) and, whichever
   needs more, ``CONCURRENT_SEQUENCES`` (8) sequences of ``CONCURRENT_TOKENS`` (2,048) tokens
   at once (of the full context, when that is shorter). Per token and layer it takes K and V
   of the KV heads at the dtype vLLM runs in; each rank holds 1/*t* of the KV heads (one at
   least); layers with a sliding window (``layer_types``) hold the window at most.
3. **Tensor-parallel size** ``auto``: the smallest power of two at which vLLM can split the
   heads (``vllm_can_split``) and each GPU holds the above. A number: exactly that, refused
   when it does not split the heads, exceeds the GPUs or does not fit.
4. **Replicas**, chat models (``generate``) first, in the file's order: each gets its number
   of replicas, or one for ``auto``, on GPUs of its own (exactly that number, or the plan is
   refused). Then the GPUs still free go round-robin to the ``auto`` models, one replica of
   *t* GPUs at a time, while one fits: ``auto`` means as many as the GPUs left allow.
5. **Growth.** A model with a set number of replicas and ``auto`` tensor-parallel size
   doubles its size, round-robin, while the free GPUs allow and the doubled size divides both
   its attention and KV heads: GPUs otherwise idle become KV cache and faster decoding. One
   model alone with one replica thus gets today's single-engine size (``server/plan.py``).
6. **Embedding models** (``embed``) come next, the same way: on GPUs of their own while any
   are free, else as a *guest* sharing GPUs that another model's replica owns.
7. **Sharing.** A replica that finds no free GPUs (a guest) goes to the GPUs with the most
   room, never beside a replica of its own model, and takes exactly the fraction it needs
   (rounded up to 0.01), or its own ``gpu_memory_utilization`` when its table sets one. The
   owner takes its fraction less its guests', so the fractions on a GPU never add to more
   than the owner's ``gpu_memory_utilization``; a guest that would leave the owner less than
   it needs is refused.
8. **Ports**: one loopback port per replica, consecutive from ``APPLIANCE_ENGINE_PORT``, in
   the file's order, replica by replica.

On CPU (vLLM's CPU build) every model runs one replica: the cores and the memory are
shared, and the memory left after every model's weights is divided evenly between their KV
caches (``server/plan.py``'s CPU rule, per model).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.gpus import Gpu
from server.model import ModelShape
from server.models_file import ModelSpec, Task
from server.plan import (
    CPU_RUNTIME_RESERVE_BYTES,
    Device,
    choose_device,
    cpu_kv_cache_bytes,
    vllm_can_split,
)
from server.vllm_build import VllmBuild

GIB = 2**30
MIB = 2**20
RUNTIME_RESERVE_BYTES = 2 * GIB
"""vLLM's own memory on each GPU, beside weights and KV cache."""
CONCURRENT_SEQUENCES = 8
CONCURRENT_TOKENS = 2048
"""A KV cache worth serving holds this many sequences of this many tokens at once."""
MAX_PORT = 65535


@dataclass(frozen=True)
class Replica:
    index: int
    port: int
    gpus: tuple[int, ...] = ()
    """GPU indices; empty on CPU."""
    memory_fraction: float | None = None
    """vLLM's ``--gpu-memory-utilization`` for this replica; None on CPU."""
    shares: bool = False
    """A guest on GPUs that another model's replica owns."""
    kv_cache_memory_bytes: int | None = None
    """Per rank; None leaves the size to vLLM (the memory fraction)."""


@dataclass(frozen=True)
class ModelPlacement:
    name: str
    task: Task
    tensor_parallel_size: int
    replicas: tuple[Replica, ...]


@dataclass(frozen=True)
class PlacementPlan:
    device: Device | None
    models: tuple[ModelPlacement, ...] = ()
    reasons: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def replicas(self) -> tuple[tuple[str, Replica], ...]:
        return tuple((m.name, r) for m in self.models for r in m.replicas)


@dataclass(eq=False)
class _Slot:
    """A replica while it is being placed."""

    model: "_Model"
    gpus: tuple[int, ...] = ()
    shares: bool = False
    fraction: float | None = None
    kv_cache_memory_bytes: int | None = None


@dataclass(eq=False)
class _Model:
    spec: ModelSpec
    shape: ModelShape
    tp: int = 0
    owners: int = 0
    guests: int = 0
    slots: list[_Slot] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fraction(self) -> float:
        return self.spec.settings.gpu_memory_utilization

    @property
    def context(self) -> int:
        return self.spec.settings.max_model_len or self.shape.context

    @property
    def wanted(self) -> int:
        return 1 if self.spec.replicas == "auto" else self.spec.replicas

    def kv_need(self, tp: int) -> tuple[int, str]:
        """The KV cache each rank needs at ``tp``, and what it holds."""
        configured = self.spec.settings.kv_cache_memory_bytes
        if configured:
            return configured, "as configured (kv_cache_memory_bytes)"
        one = self.shape.kv_bytes(1, self.context, tp)
        tokens = min(self.context, CONCURRENT_TOKENS)
        many = self.shape.kv_bytes(CONCURRENT_SEQUENCES, tokens, tp)
        if one >= many:
            return one, f"one {self.context}-token sequence"
        return many, f"{CONCURRENT_SEQUENCES} sequences of {tokens} tokens"

    def need(self, tp: int) -> int:
        """Bytes on each GPU of one replica at ``tp``: weights, vLLM, KV cache."""
        return math.ceil(self.shape.weight_bytes / tp) + RUNTIME_RESERVE_BYTES + self.kv_need(tp)[0]


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def place_models(
    models: Sequence[tuple[ModelSpec, ModelShape]],
    gpus: Sequence[Gpu],
    build: VllmBuild,
    *,
    device: str = "auto",
    first_port: int = 8000,
    available_memory: int | None = None,
) -> PlacementPlan:
    """Where every replica of every model runs, and why; refused with ``errors`` when the
    models do not fit, before anything starts."""
    reasons: list[str] = []
    errors: list[str] = []
    chosen, why = choose_device(device, list(gpus), build)
    (reasons if chosen else errors).append(why)
    todo = [_Model(spec, shape) for spec, shape in models]
    for m in todo:
        limit = m.shape.context
        if m.spec.settings.max_model_len and m.spec.settings.max_model_len > limit:
            errors.append(f"{m.name}: max_model_len {m.spec.settings.max_model_len} is over "
                          f"the model's limit of {limit} tokens (max_position_embeddings)")
    if chosen == "cpu":
        _place_on_cpu(todo, available_memory, reasons, errors)
    elif chosen == "gpu":
        _place_on_gpus(todo, list(gpus), reasons, errors)
    return PlacementPlan(chosen, _with_ports(todo, first_port, errors), tuple(reasons),
                         tuple(errors))


def _with_ports(
    models: list[_Model], first_port: int, errors: list[str]
) -> tuple[ModelPlacement, ...]:
    placed, port = [], first_port
    for m in models:
        if not m.slots:
            continue
        replicas = []
        for index, slot in enumerate(m.slots):
            replicas.append(Replica(index, port, slot.gpus, slot.fraction, slot.shares,
                                    slot.kv_cache_memory_bytes))
            port += 1
        placed.append(ModelPlacement(m.name, m.spec.task, m.tp, tuple(replicas)))
    if port - 1 > MAX_PORT:
        errors.append(f"{port - first_port} replicas need ports {first_port} to {port - 1}: "
                      f"past {MAX_PORT}; lower APPLIANCE_ENGINE_PORT")
    return tuple(placed)


def _place_on_cpu(models: list[_Model], available: int | None, reasons: list[str],
                  errors: list[str]) -> None:
    """One replica per model; the memory left after all weights is shared out evenly."""
    sizes = {id(m): m.spec.settings.tensor_parallel_size for m in models}
    tps = {key: 1 if size == "auto" else size for key, size in sizes.items()}
    spare = None
    if available is not None:
        spare = available - sum(m.shape.weight_bytes + CPU_RUNTIME_RESERVE_BYTES * tps[id(m)]
                                for m in models)
    if len(models) > 1 and spare is not None:
        reasons.append(
            f"the {len(models)} models share the {gib(available)} of memory available: each "
            f"plans its KV cache with an even part of the {gib(max(spare, 0))} left after all "
            "their weights and vLLM's own memory"
        )
    for m in models:
        m.tp = tps[id(m)]
        how = "as configured" if sizes[id(m)] != "auto" else "on CPU"
        reasons.append(f"{m.name}: tensor parallel size {m.tp} {how}, one replica")
        if m.spec.replicas != 1:
            reasons.append(f"{m.name}: replicas = {m.spec.replicas!r} asked for; on CPU every "
                           "model runs one replica")
        kv = m.spec.settings.kv_cache_memory_bytes
        if kv:
            reasons.append(f"{m.name}: KV cache of {kv / MIB:.0f} MiB, as configured")
        else:
            own = None if spare is None else (
                m.shape.weight_bytes + CPU_RUNTIME_RESERVE_BYTES * m.tp + spare // len(models))
            kv, why = cpu_kv_cache_bytes(own, m.shape.weight_bytes, m.tp)
            (reasons if kv else errors).append(f"{m.name}: {why}")
        m.slots = [_Slot(m, kv_cache_memory_bytes=kv)]


def _place_on_gpus(models: list[_Model], gpus: list[Gpu], reasons: list[str],
                   errors: list[str]) -> None:
    memory = {g.index: g.memory_bytes for g in gpus}
    smallest = min(memory.values())
    placeable = [m for m in models if _choose_size(m, len(gpus), smallest, reasons, errors)]
    chat = [m for m in placeable if m.spec.task == "generate"]
    embed = [m for m in placeable if m.spec.task == "embed"]

    free = len(gpus)
    for group in (chat, embed):
        for m in group:
            m.owners = min(m.wanted, free // m.tp)
            m.guests = m.wanted - m.owners
            free -= m.owners * m.tp
        free = _more_replicas([m for m in group if m.spec.replicas == "auto"], free)
        if group is chat:
            free = _grow(chat, free, reasons)

    ledger = _Ledger(memory)
    for m in chat + embed:
        m.slots = [ledger.own(m) for _ in range(m.owners)]
    for m in chat + embed:
        for _ in range(m.guests):
            slot = ledger.share(m, reasons, errors)
            if slot:
                m.slots.append(slot)
    for m in placeable:
        _say_replicas(m, len(gpus), reasons)
    ledger.settle(reasons)
    idle = sorted(set(memory) - set(ledger.owner))
    autos = [m.name for m in placeable if m.spec.replicas == "auto"]
    if idle and placeable:
        why = (f"too few for another replica of {', '.join(autos)}" if autos else
               "no model asks for more replicas (replicas = \"auto\" would use them)")
        reasons.append(f"GPU(s) {', '.join(map(str, idle))} left idle: {why}")


def _choose_size(m: _Model, count: int, memory: int, reasons: list[str],
                 errors: list[str]) -> bool:
    """Set ``m.tp`` to the smallest size that splits the heads and fits (or the configured
    one); False, with an error naming the numbers, when there is none."""
    heads, kv_heads = m.shape.attention_heads, m.shape.kv_heads
    allowed = m.fraction * memory
    where = f"{m.fraction:.0%} of {gib(memory)}"
    configured = m.spec.settings.tensor_parallel_size
    if configured != "auto":
        problems = []
        if configured > count:
            problems.append(f"tensor parallel size {configured} needs {configured} GPUs, this "
                            f"host has {count}")
        if not vllm_can_split(heads, kv_heads, configured):
            problems.append(f"tensor parallel size {configured} cannot split its {heads} "
                            f"attention heads and {kv_heads} KV heads evenly")
        if problems:
            errors.extend(f"{m.name}: {p}" for p in problems)
            return False
        sizes = [configured]
    else:
        sizes = [t for t in (2**i for i in range(count.bit_length()))
                 if t <= count and vllm_can_split(heads, kv_heads, t)]
    rejected = ""
    for t in sizes:
        weights, (kv, holds) = math.ceil(m.shape.weight_bytes / t), m.kv_need(t)
        full = m.need(t)
        if full <= allowed:
            how = "as configured" if configured != "auto" else "the smallest that holds it"
            reasons.append(
                f"{m.name}: tensor parallel size {t}, {how}: each GPU holds {gib(weights)} of "
                f"weights, {gib(RUNTIME_RESERVE_BYTES)} for vLLM and a {gib(kv)} KV cache "
                f"({holds}): {gib(full)} of the {gib(allowed)} allowed ({where}){rejected}"
            )
            _check_configured_kv(m, t, errors)
            m.tp = t
            return True
        rejected = f"; at {t}, {gib(full)} would not fit"
    errors.append(f"{m.name}: {_misfit(m, sizes[-1] if sizes else 1, count, allowed, where)}")
    return False


def _check_configured_kv(m: _Model, tp: int, errors: list[str]) -> None:
    configured = m.spec.settings.kv_cache_memory_bytes
    one = m.shape.kv_bytes(1, m.context, tp)
    if configured and configured < one:
        errors.append(f"{m.name}: kv_cache_memory_bytes {configured} holds less than one "
                      f"{m.context}-token sequence ({one} bytes per rank at tensor parallel "
                      f"size {tp}): vLLM would refuse to start")


def _misfit(m: _Model, tp: int, count: int, allowed: float, where: str) -> str:
    """Why the model fits at no size: the numbers at the largest size the host allows."""
    at = (f"at tensor parallel size {tp}, the most that {count} GPU(s) and its "
          f"{m.shape.attention_heads} attention heads and {m.shape.kv_heads} KV heads allow")
    weights = math.ceil(m.shape.weight_bytes / tp)
    if weights + RUNTIME_RESERVE_BYTES > allowed:
        return (f"its weights ({gib(m.shape.weight_bytes)}) do not fit: {at}, each GPU would "
                f"hold {gib(weights)} of weights and {gib(RUNTIME_RESERVE_BYTES)} for vLLM, "
                f"more than the {gib(allowed)} allowed ({where}); use a quantized model or "
                "more GPUs")
    left = allowed - weights - RUNTIME_RESERVE_BYTES
    kv, holds = m.kv_need(tp)
    text = (f"no room for a KV cache worth serving: {at}, each GPU has {gib(left)} left "
            f"after {gib(weights)} of weights and {gib(RUNTIME_RESERVE_BYTES)} for vLLM "
            f"({where}), and a KV cache for {holds} takes {gib(kv)}")
    longest = _longest_context(m, tp, left)
    if longest:
        text += f"; a max_model_len of at most {longest} fits"
    return text + "; or use a quantized model or more GPUs"


def _longest_context(m: _Model, tp: int, room: float) -> int | None:
    """The longest max_model_len, a multiple of 1024, whose KV cache worth serving fits."""
    def fits(tokens: int) -> bool:
        return max(m.shape.kv_bytes(1, tokens, tp), m.shape.kv_bytes(
            CONCURRENT_SEQUENCES, min(tokens, CONCURRENT_TOKENS), tp)) <= room

    low, high = 0, m.shape.context // 1024
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid * 1024) else (low, mid - 1)
    return low * 1024 or None


def _more_replicas(autos: list[_Model], free: int) -> int:
    """Round-robin: one more replica of each ``auto`` model in turn, while one fits."""
    while any(m.tp <= free for m in autos):
        for m in autos:
            if m.tp <= free:
                m.owners += 1
                free -= m.tp
    return free


def _grow(chat: list[_Model], free: int, reasons: list[str]) -> int:
    """Double the size of models with a set number of replicas while GPUs would sit idle."""
    start = {id(m): m.tp for m in chat}
    grew = True
    while grew:
        grew = False
        for m in chat:
            size = m.tp * 2
            if (m.spec.replicas != "auto" and m.spec.settings.tensor_parallel_size == "auto"
                    and m.owners and not m.guests and free >= m.owners * m.tp
                    and m.shape.attention_heads % size == 0 and m.shape.kv_heads % size == 0):
                free -= m.owners * m.tp
                m.tp = size
                grew = True
    for m in chat:
        if m.tp != start[id(m)]:
            reasons.append(
                f"{m.name}: tensor parallel size {start[id(m)]} grown to {m.tp}: its "
                f"{m.wanted} replica(s) would leave GPUs idle, and more GPUs per replica give "
                "a larger KV cache and faster decoding (a size must divide its "
                f"{m.shape.attention_heads} attention and {m.shape.kv_heads} KV heads)"
            )
    return free


def _say_replicas(m: _Model, count: int, reasons: list[str]) -> None:
    placed = len(m.slots)
    if m.spec.replicas == "auto" and all(slot.shares for slot in m.slots):
        reasons.append(f"{m.name}: {placed} replica(s) (auto: the models before it left no "
                       "GPU free, so one that shares)")
    elif m.spec.replicas == "auto":
        reasons.append(f"{m.name}: {placed} replica(s) (auto: as many as the {count} GPUs "
                       f"allow at tensor parallel size {m.tp} once the models before it "
                       "are placed)")
    else:
        reasons.append(f"{m.name}: {m.spec.replicas} replica(s), as configured")


class _Ledger:
    """Which replica owns each GPU, and the guests sharing it."""

    def __init__(self, memory: dict[int, int]):
        self.memory = memory
        self.owner: dict[int, _Slot] = {}
        self.guests: dict[int, list[_Slot]] = {index: [] for index in memory}

    def own(self, m: _Model) -> _Slot:
        free = [index for index in sorted(self.memory) if index not in self.owner]
        slot = _Slot(m, tuple(free[: m.tp]))
        for index in slot.gpus:
            self.owner[index] = slot
        return slot

    def room(self, index: int) -> float:
        """The fraction of the GPU still free once its owner and guests have what they need."""
        owner = self.owner[index]
        taken = owner.model.need(owner.model.tp) / self.memory[index]
        return owner.model.fraction - taken - sum(g.fraction for g in self.guests[index])

    def share(self, m: _Model, reasons: list[str], errors: list[str]) -> _Slot | None:
        """A guest replica on the GPUs with the most room, away from its own model."""
        candidates = sorted(
            (index for index, owner in self.owner.items()
             if owner.model is not m and all(g.model is not m for g in self.guests[index])),
            key=lambda index: (-self.room(index), index),
        )[: m.tp]
        need = m.need(m.tp)
        own = "gpu_memory_utilization" in m.spec.overrides
        if len(candidates) == m.tp:
            memory = min(self.memory[index] for index in candidates)
            fraction = m.fraction if own else math.ceil(need / memory * 100 - 1e-9) / 100
            if need <= fraction * memory and all(self.room(i) >= fraction - 1e-9
                                                 for i in candidates):
                slot = _Slot(m, tuple(sorted(candidates)), shares=True, fraction=fraction)
                for index in slot.gpus:
                    self.guests[index].append(slot)
                hosts = sorted({self.owner[i].model.name for i in slot.gpus})
                reasons.append(
                    f"{m.name}: replica {len(m.slots)} shares GPU(s) "
                    f"{', '.join(map(str, slot.gpus))} with {', '.join(hosts)}: no GPU is "
                    f"free, and it takes {fraction:.2f} of the memory ({gib(need)} of weights, "
                    f"vLLM and KV cache)"
                )
                return slot
        rooms = ", ".join(f"GPU {i}: {gib(max(self.room(i), 0) * self.memory[i])}"
                          for i in sorted(self.owner))
        errors.append(
            f"{m.name}: no room for replica {len(m.slots) + 1} of {m.wanted} "
            f"({m.tp} GPU(s) with {gib(need)} each): every GPU is taken, and what their "
            f"owners leave is {rooms or 'nothing'}"
        )
        return None

    def settle(self, reasons: list[str]) -> None:
        """Owners take their fraction less the most their guests take on any of their GPUs."""
        owners = {id(slot): slot for slot in self.owner.values()}.values()
        for slot in owners:
            taken = max(sum(g.fraction for g in self.guests[i]) for i in slot.gpus)
            slot.fraction = math.floor((slot.model.fraction - taken) * 100 + 1e-9) / 100
            if taken:
                reasons.append(
                    f"{slot.model.name}: replica {slot.model.slots.index(slot)} takes "
                    f"{slot.fraction:.2f} of GPU(s) {', '.join(map(str, slot.gpus))}, its "
                    f"{slot.model.fraction:.2f} less {taken:.2f} for the replicas sharing them"
                )


def render_plan(plan: PlacementPlan) -> str:
    """The plan as an operator reads it: every replica, then why, then what is wrong."""
    lines = [f"device: {plan.device or 'none'}"]
    for m in plan.models:
        count = len(m.replicas)
        lines.append(f"{m.name} ({m.task}): tensor parallel size {m.tensor_parallel_size}, "
                     f"{count} replica{'s' if count != 1 else ''}")
        for r in m.replicas:
            where = (f"GPU{'s' if len(r.gpus) > 1 else ''} {','.join(map(str, r.gpus))}"
                     if r.gpus else "CPU")
            line = f"  replica {r.index}: port {r.port}, {where}"
            if r.memory_fraction is not None:
                line += f", memory fraction {r.memory_fraction:.2f}"
            if r.shares:
                line += " (shared)"
            if r.kv_cache_memory_bytes:
                line += f", KV cache {r.kv_cache_memory_bytes / MIB:.0f} MiB"
            lines.append(line)
    lines += ["why:", *(f"  {reason}" for reason in plan.reasons)]
    if plan.errors:
        lines += ["cannot start:", *(f"  {error}" for error in plan.errors)]
    return "\n".join(lines)

