"""The models file: which models this host serves, each with settings of its own.

``APPLIANCE_MODELS_FILE`` (``/etc/appliance/models.toml``) holds one ``[[models]]`` table per
model (``server/models.example.toml`` is a commented example)::

    [[models]]
    name = "chat"                        # the name clients put in "model"
    source = "Qwen/Qwen2.5-7B-Instruct"  # as APPLIANCE_MODEL: a directory, an HF id, s3://...
    replicas = "auto"                    # or a number (default 1)
    tensor_parallel_size = "auto"        # or a number
    task = "generate"                    # or "embed"
    max_model_len = 16384                # any engine setting, by its field name
    adapters = [{name = "support", source = "/srv/adapters/support"}]  # LoRA, loaded at start

An engine setting in a table overrides the environment's value for that model only; the
settings that belong to the host (its ports, device, cache, cluster role) are refused there.
Without the file, ``APPLIANCE_MODEL`` is the one model, served as it always was.

Parsing is pure (text -> specs) and collects every mistake, each naming the model and the key,
so one run shows them all.
"""

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pydantic import ValidationError

from server.adapters import Adapter
from server.plan import served_name_for
from server.settings import EngineSettings

Task = Literal["generate", "embed"]
Replicas = int | Literal["auto"]

SPEC_KEYS = ("name", "source", "replicas", "task", "adapters")
HOST_WIDE = frozenset({
    "model", "served_model_name", "model_cache", "models_file", "adapters_file", "device",
    "pipeline_parallel_size", "node_role", "head_address", "ray_port",
    "engine_host", "engine_port", "engine_api_key",
})
"""Settings of the host, not of a model: ``name`` and ``source`` stand for the first two."""
PER_MODEL = tuple(name for name in EngineSettings.model_fields if name not in HOST_WIDE)


class ModelsFileError(Exception):
    """The models file cannot be used; ``errors`` holds one sentence per mistake."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """The served name: what clients put in ``"model"``."""
    source: str
    """A local directory, a Hugging Face id or an ``s3://`` prefix, as ``APPLIANCE_MODEL``."""
    settings: EngineSettings
    """The environment's settings with this model's own keys over them (``model`` and
    ``served_model_name`` are its source and name)."""
    replicas: Replicas = 1
    task: Task = "generate"
    overrides: frozenset[str] = frozenset()
    """The engine settings this model's table set itself."""
    adapters: tuple[Adapter, ...] = ()
    """Its LoRA adapters from the table's ``adapters``, loaded when its engines start."""


def parse_models(
    text: str, base: EngineSettings, origin: str = "the models file"
) -> list[ModelSpec]:
    """The models a models file names, in its order; ``ModelsFileError`` lists what is wrong."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelsFileError([f"{origin} is not valid TOML: {exc}"]) from exc
    errors = [f"{origin}: unknown top-level key {key!r} (only [[models]] tables belong here)"
              for key in document if key != "models"]
    tables = document.get("models", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ModelsFileError([*errors, f"{origin}: models must be [[models]] tables"])
    if not tables:
        errors.append(f"{origin} names no models: add a [[models]] table")
    specs: list[ModelSpec] = []
    seen: dict[str, int] = {}
    for number, table in enumerate(tables, 1):
        spec, problems = _model_spec(table, base)
        where = f"{origin}: model {spec.name!r}" if spec else f"{origin}: [[models]] #{number}"
        if spec and spec.name in seen:
            problems.append(f"the name is taken by [[models]] #{seen[spec.name]} already: "
                            "each model needs a name of its own")
        for adapter in spec.adapters if spec else ():
            if adapter.name in seen:
                problems.append(f"adapter {adapter.name!r}: the name is taken already: an "
                                "adapter needs a name no model or other adapter has")
        errors.extend(f"{where}: {problem}" for problem in problems)
        if spec:
            seen.setdefault(spec.name, number)
            for adapter in spec.adapters:
                seen.setdefault(adapter.name, number)
            specs.append(spec)
    if errors:
        raise ModelsFileError(errors)
    return specs


def _model_spec(
    table: dict, base: EngineSettings
) -> tuple[ModelSpec | None, list[str]]:
    """One ``[[models]]`` table -> its spec (None when it has no usable name) and its problems."""
    problems: list[str] = []
    name, source = table.get("name"), table.get("source")
    if not isinstance(name, str) or not name.strip() or name != "".join(name.split()):
        problems.append(f"key 'name': a served name without spaces is required (got {name!r})")
        name = None
    if not isinstance(source, str) or not source.strip():
        problems.append("key 'source': a directory, a Hugging Face id or an s3:// prefix is "
                        f"required (got {source!r})")
    replicas = table.get("replicas", 1)
    if replicas != "auto" and (type(replicas) is not int or replicas < 1):
        problems.append(f"key 'replicas': a number of at least 1, or \"auto\" (got {replicas!r})")
    task = table.get("task", "generate")
    if task not in get_args(Task):
        problems.append(f"key 'task': \"generate\" or \"embed\" (got {task!r})")

    adapters, adapter_problems = _adapters(table.get("adapters", []), name)
    problems += adapter_problems

    overrides = {key: value for key, value in table.items() if key not in SPEC_KEYS}
    for key in list(overrides):
        if key in HOST_WIDE:
            problems.append(f"key {key!r} is the host's, not a model's: set "
                            f"APPLIANCE_{key.upper()} in the environment")
            del overrides[key]
        elif key not in PER_MODEL:
            close = difflib.get_close_matches(key, [*SPEC_KEYS, *PER_MODEL], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
            del overrides[key]
    try:
        settings = EngineSettings.model_validate(
            {**dict(base), **overrides, "model": source or "", "served_model_name": name or ""}
        )
    except ValidationError as exc:
        by_key: dict[str, list[dict]] = {}
        for error in exc.errors():
            by_key.setdefault(str(error["loc"][0]), []).append(error)
        problems.extend(
            f"key {key!r}: {' or '.join(e['msg'] for e in found)} (got {found[0].get('input')!r})"
            for key, found in by_key.items()
        )
        settings = base
    if name is None:
        return None, problems
    spec = ModelSpec(name=name, source=source if isinstance(source, str) else "",
                     settings=settings, replicas=replicas, task=task,
                     overrides=frozenset(overrides), adapters=adapters)
    return spec, problems


def _adapters(entries: object, base: str | None) -> tuple[tuple[Adapter, ...], list[str]]:
    """A table's ``adapters = [{name = ..., source = ...}]`` and its problems."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return (), ["key 'adapters': a list of {name = ..., source = ...} tables"]
    adapters, problems, names = [], [], set()
    for number, entry in enumerate(entries, 1):
        name, source = entry.get("name"), entry.get("source")
        unknown = sorted(set(entry) - {"name", "source"})
        if not isinstance(name, str) or not name.strip() or name != "".join(name.split()):
            problems.append(f"adapter #{number}: a name without spaces is required (got "
                            f"{name!r})")
        elif not isinstance(source, str) or not source.strip():
            problems.append(f"adapter {name!r}: a directory, a Hugging Face id or an s3:// "
                            f"prefix is required in 'source' (got {source!r})")
        elif unknown:
            problems.append(f"adapter {name!r}: unknown key(s) {', '.join(unknown)} (only name "
                            "and source)")
        elif name == base or name in names:
            problems.append(f"adapter {name!r}: the name is taken already")
        else:
            names.add(name)
            adapters.append(Adapter(name=name, source=source, base=base or ""))
    return tuple(adapters), problems


def single_model_spec(settings: EngineSettings) -> ModelSpec:
    """``APPLIANCE_MODEL`` as a one-model file: one replica, every setting from the environment."""
    return ModelSpec(name=served_name_for(settings), source=settings.model, settings=settings)


def model_specs(settings: EngineSettings) -> tuple[list[ModelSpec], str]:
    """The models this host serves and a sentence saying where they were read from."""
    path: Path = settings.models_file
    try:
        text = path.read_text()
    except FileNotFoundError:
        if not settings.model:
            raise ModelsFileError([
                f"no model configured: set APPLIANCE_MODEL, or list the models in {path}"
            ]) from None
        return [single_model_spec(settings)], (
            f"one model, APPLIANCE_MODEL={settings.model} (there is no models file at {path})"
        )
    except OSError as exc:
        raise ModelsFileError([f"cannot read the models file {path}: {exc}"]) from exc
    specs = parse_models(text, settings, origin=str(path))
    ignored = f"; APPLIANCE_MODEL={settings.model} is ignored" if settings.model else ""
    return specs, f"{len(specs)} model(s) from {path}{ignored}"
