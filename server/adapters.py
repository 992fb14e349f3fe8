"""LoRA adapters: which ones each model serves, and the vLLM arguments that load them at start.

An adapter comes from two places: a model's ``adapters`` in the models file (static), and the
adapters list (``APPLIANCE_ADAPTERS_FILE``, ``/var/lib/appliance/adapters.json``) that
``appliance-models add-adapter`` keeps, so an adapter added at runtime is loaded again after a
restart or a reboot. The list is JSON, rewritten whole through a temporary file and a rename, so
a crash never leaves half of it.

vLLM reserves memory for adapters only with ``--enable-lora``; an engine gets it when its model
has adapters (from either place) or ``enable_lora`` is set for it, and only an engine started
with it can take adapters at runtime. ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` opens vLLM's
``/v1/load_lora_adapter``; the gateway's route table never lets a client reach it.

Pure, apart from reading and writing the list and reading an adapter's rank.
"""

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_MAX_LORA_RANK = 16
"""vLLM's default: adapters of a higher rank need ``--max-lora-rank``."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank``."""


class AdaptersError(Exception):
    """The adapters list or an adapter cannot be used."""


@dataclass(frozen=True)
class Adapter:
    name: str
    """The served name: what clients put in ``"model"`` to use it."""
    source: str
    """A local directory, a Hugging Face id or an ``s3://`` prefix, as a model's."""
    base: str
    """The served name of the model it adapts."""


def read_adapters(path: Path) -> list[Adapter]:
    """The adapters list; none when the file does not exist yet."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise AdaptersError(f"cannot read the adapters list {path}: {exc}") from exc
    entries = document.get("adapters") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise AdaptersError(f"{path}: expected {{\"adapters\": [...]}}")
    try:
        return [Adapter(name=e["name"], source=e["source"], base=e["base"]) for e in entries]
    except (KeyError, TypeError) as exc:
        raise AdaptersError(f"{path}: each adapter needs name, source and base ({exc})") from exc


def write_adapters(path: Path, adapters: list[Adapter]) -> None:
    """Replace the list atomically: a temporary file beside it, flushed, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"adapters": [asdict(a) for a in adapters]}, indent=2) + "\n"
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def with_adapter(adapters: list[Adapter], adapter: Adapter) -> list[Adapter]:
    """The list with ``adapter`` in it, replacing one of the same name."""
    return [a for a in adapters if a.name != adapter.name] + [adapter]


def without_adapter(adapters: list[Adapter], name: str) -> list[Adapter]:
    return [a for a in adapters if a.name != name]


def adapters_of(base: str, static: tuple[Adapter, ...], listed: list[Adapter]) -> list[Adapter]:
    """A model's adapters: the models file's, then the list's (a listed one of the same name
    wins, since it was added later)."""
    mine = {a.name: a for a in static if a.base == base}
    mine.update((a.name, a) for a in listed if a.base == base)
    return list(mine.values())


def adapter_rank(path: Path) -> int:
    """``r`` from a PEFT adapter's ``adapter_config.json``."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdaptersError(f"{path} is not a LoRA adapter: no readable adapter_config.json "
                            f"({exc})") from exc
    rank = config.get("r")
    if config.get("peft_type", "LORA") != "LORA" or type(rank) is not int or rank < 1:
        raise AdaptersError(f"{path}: adapter_config.json is not a LoRA adapter's "
                            f"(peft_type {config.get('peft_type')!r}, r {rank!r})")
    return rank


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that holds every adapter, at least vLLM's default (so
    adapters added at runtime up to that rank still load)."""
    needed = max([DEFAULT_MAX_LORA_RANK, *ranks])
    for allowed in VLLM_LORA_RANKS:
        if allowed >= needed:
            return allowed
    raise AdaptersError(f"an adapter of rank {needed} is above vLLM's largest "
                        f"--max-lora-rank, {VLLM_LORA_RANKS[-1]}")


def lora_argv(adapters: list[tuple[str, Path]], ranks: list[int]) -> list[str]:
    """vLLM's arguments for LoRA: ``--enable-lora``, the adapters to load at start
    (``--lora-modules NAME=PATH ...``) and ``--max-lora-rank`` when one needs more than 16."""
    argv = ["--enable-lora"]
    if adapters:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters)]
    rank = max_lora_rank(ranks)
    if rank != DEFAULT_MAX_LORA_RANK:
        argv += ["--max-lora-rank", str(rank)]
    return argv
