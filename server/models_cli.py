"""``appliance-models``: add, remove and list the LoRA adapters this host serves.

``add-adapter NAME SOURCE --base MODEL`` fetches the adapter as a model is fetched (a local
directory, a Hugging Face id, an ``s3://`` prefix), loads it into every engine that serves
MODEL through vLLM's adapter API with the engine's internal key, and only then records it in
the adapters list (``APPLIANCE_ADAPTERS_FILE``), which every engine start reads. It trusts no
200: some vLLM versions answer 200 for a path that holds no adapter, so it checks that each
engine lists the adapter in ``/v1/models`` with MODEL as its parent and that a one-token
completion of it succeeds; if not, it unloads it everywhere and exits 1 with the reason.

The engines are those of ``APPLIANCE_ENGINE_URLS`` (what first boot gives the gateway, in the
env file), else the one engine at ``APPLIANCE_ENGINE_HOST:APPLIANCE_ENGINE_PORT``; ``--engine``
names them instead. Whichever of them lists MODEL as a served model is one of its replicas.
An engine started without LoRA has no adapter API: the tool says so, and that its engines need
``enable_lora`` and a restart.

Exit status: 0 done, 1 the engines refused or failed it (nothing changed), 2 bad arguments or
settings, 3 the base model's engines run without LoRA (restart needed).
"""

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from dotenv import dotenv_values
from pydantic import ValidationError

from server.adapters import (
    Adapter,
    AdaptersError,
    adapter_rank,
    read_adapters,
    with_adapter,
    without_adapter,
    write_adapters,
)
from server.model import ModelError, fetch_model, parse_source
from server.models_file import ModelsFileError, model_specs
from server.settings import EngineSettings, env_file_path, load_settings, readable_env_file

EXIT_FAILED, EXIT_USAGE, EXIT_NO_LORA = 1, 2, 3
TIMEOUT_S = httpx.Timeout(10.0, read=120.0)
GATEWAY_HINT = ("The gateway reads the engines' model lists again on the next request that "
                "names it (or the next model list): no restart needed.")
PROBE_PROMPT = "The appliance checks that this adapter generates before it keeps it."


class AdapterFailed(Exception):
    """An engine refused or failed the adapter; ``exit_code`` says how to exit."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


def say(message: str) -> None:
    print(f"appliance-models: {message}", file=sys.stderr, flush=True)


@dataclass
class EngineApi:
    """One vLLM engine, spoken to with the internal key (never a client's)."""

    url: str
    client: httpx.Client

    def models(self) -> dict[str, dict]:
        response = self.client.get(self.url + "/v1/models")
        response.raise_for_status()
        return {card["id"]: card for card in response.json().get("data", [])
                if isinstance(card, dict) and isinstance(card.get("id"), str)}

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.client.post(self.url + path, json=body)


def engine_urls(explicit: list[str], settings: EngineSettings) -> list[str]:
    """``--engine``, else ``APPLIANCE_ENGINE_URLS`` (environment, then env file), else the one
    engine of the settings."""
    if explicit:
        return [url.rstrip("/") for url in explicit]
    env_file = readable_env_file(env_file_path())
    urls = os.environ.get("APPLIANCE_ENGINE_URLS") or (
        dotenv_values(env_file).get("APPLIANCE_ENGINE_URLS") if env_file else None)
    if urls:
        return [url.strip().rstrip("/") for url in urls.split(",") if url.strip()]
    return [f"http://{settings.engine_host}:{settings.engine_port}"]


def engines_of(base: str, engines: list[EngineApi]) -> list[EngineApi]:
    """The engines that serve ``base`` as a model of their own (not as an adapter)."""
    serving, unreachable = [], []
    for engine in engines:
        try:
            card = engine.models().get(base)
        except (httpx.HTTPError, ValueError) as exc:
            unreachable.append(f"{engine.url} ({type(exc).__name__}: {exc})")
            continue
        if card is not None and card.get("parent") in (None, base):
            serving.append(engine)
    if unreachable:
        raise AdapterFailed(f"cannot ask every engine what it serves: {'; '.join(unreachable)}")
    if not serving:
        raise AdapterFailed(f"no engine serves a model named {base!r} (asked "
                            f"{', '.join(e.url for e in engines)}): see appliance-models list",
                            EXIT_USAGE)
    return serving


def refusal(response: httpx.Response) -> str:
    try:
        message = response.json().get("error", {}).get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{response.status_code}: {message or response.text[:300]}"


def load(engine: EngineApi, adapter: Adapter, path: Path) -> None:
    """Load ``adapter`` into one engine (again, when it has one of that name already)."""
    if adapter.name in engine.models():
        unload(engine, adapter.name)
    response = engine.post("/v1/load_lora_adapter",
                           {"lora_name": adapter.name, "lora_path": str(path)})
    if response.status_code == 404 and "error" not in response.text:
        raise AdapterFailed(
            f"the engine at {engine.url} runs {adapter.base!r} without LoRA (vLLM's adapter API "
            "is not open there): set enable_lora = true in its [[models]] table (or "
            "APPLIANCE_ENABLE_LORA=true), restart its engines (sudo systemctl restart "
            "appliance-engine@N, or appliance-engine), then add the adapter again",
            EXIT_NO_LORA)
    if response.status_code != 200:
        raise AdapterFailed(f"the engine at {engine.url} refused to load it: {refusal(response)}")


def unload(engine: EngineApi, name: str) -> bool:
    """Unload ``name`` from one engine; False when it did not have it."""
    response = engine.post("/v1/unload_lora_adapter", {"lora_name": name})
    if response.status_code == 404:
        return False
    if response.status_code != 200:
        raise AdapterFailed(f"the engine at {engine.url} refused to unload {name!r}: "
                            f"{refusal(response)}")
    return True


def verify(engine: EngineApi, adapter: Adapter) -> None:
    """That the engine really serves it: listed with the base as parent, and it generates."""
    card = engine.models().get(adapter.name)
    if card is None:
        raise AdapterFailed(f"the engine at {engine.url} answered 200 but does not list "
                            f"{adapter.name!r} in /v1/models")
    if card.get("parent") != adapter.base:
        raise AdapterFailed(f"the engine at {engine.url} lists {adapter.name!r} with parent "
                            f"{card.get('parent')!r}, not {adapter.base!r}")
    response = engine.post("/v1/completions",
                           {"model": adapter.name, "prompt": PROBE_PROMPT, "max_tokens": 1})
    if response.status_code != 200:
        raise AdapterFailed(f"a one-token completion of {adapter.name!r} on {engine.url} "
                            f"failed: {refusal(response)}")


def add_adapter(settings: EngineSettings, engines: list[EngineApi], adapter: Adapter) -> str:
    """Fetch, load into every engine of the base, verify, record; undone on any failure."""
    static = static_adapters(settings)
    if adapter.name in static:
        raise AdapterFailed(f"{adapter.name!r} is an adapter of the models file: change it "
                            "there", EXIT_USAGE)
    try:
        if parse_source(adapter.source).kind == "local":  # the engines do not share our cwd
            adapter = replace(adapter, source=str(Path(adapter.source).resolve()))
        path = fetch_model(adapter.source, settings.model_cache)
        rank = adapter_rank(path)
    except (ModelError, AdaptersError) as exc:
        raise AdapterFailed(f"cannot fetch the adapter: {exc}", EXIT_USAGE) from exc
    replicas = engines_of(adapter.base, engines)
    for engine in replicas:
        cards = engine.models()
        if adapter.name in cards and cards[adapter.name].get("parent") in (None, adapter.name):
            raise AdapterFailed(f"{adapter.name!r} is a model's name on {engine.url}: an "
                                "adapter needs a name of its own", EXIT_USAGE)
    loaded: list[EngineApi] = []
    try:
        for engine in replicas:
            loaded.append(engine)
            load(engine, adapter, path)
            verify(engine, adapter)
    except (AdapterFailed, httpx.HTTPError) as exc:
        undone = undo(loaded, adapter.name)
        reason = str(exc) if isinstance(exc, AdapterFailed) else f"{type(exc).__name__}: {exc}"
        code = exc.exit_code if isinstance(exc, AdapterFailed) else EXIT_FAILED
        raise AdapterFailed(f"{reason} ({undone})", code) from exc
    write_adapters(settings.adapters_file,
                   with_adapter(read_adapters(settings.adapters_file), adapter))
    return (f"added {adapter.name} (rank {rank}, from {path}) to {adapter.base} on "
            f"{len(replicas)} engine(s): {', '.join(e.url for e in replicas)}; recorded in "
            f"{settings.adapters_file}. {GATEWAY_HINT}")


def undo(engines: list[EngineApi], name: str) -> str:
    """Unload ``name`` where it may have been loaded; a sentence saying what happened."""
    failed = []
    for engine in engines:
        try:
            unload(engine, name)
        except (AdapterFailed, httpx.HTTPError) as exc:
            failed.append(f"{engine.url}: {exc}")
    return ("unloaded again, nothing recorded" if not failed else
            f"nothing recorded; unloading it again failed on {'; '.join(failed)}")


def remove_adapter(settings: EngineSettings, engines: list[EngineApi], name: str) -> str:
    listed = read_adapters(settings.adapters_file)
    adapter = next((a for a in listed if a.name == name), None)
    if adapter is None:
        where = (" it is in the models file: remove it there and restart its engines"
                 if name in static_adapters(settings) else "")
        raise AdapterFailed(f"{name!r} is not in {settings.adapters_file}:{where or ' see list'}",
                            EXIT_USAGE)
    replicas = engines_of(adapter.base, engines)
    for engine in replicas:
        unload(engine, name)
        if name in engine.models():
            raise AdapterFailed(f"the engine at {engine.url} still lists {name!r} after "
                                "unloading it")
    write_adapters(settings.adapters_file, without_adapter(listed, name))
    return (f"removed {name} from {adapter.base} on {len(replicas)} engine(s); "
            f"{settings.adapters_file} updated. {GATEWAY_HINT}")


def static_adapters(settings: EngineSettings) -> dict[str, Adapter]:
    """The models file's adapters by name; none without a models file."""
    try:
        specs, _ = model_specs(settings)
    except ModelsFileError:
        return {}
    return {a.name: a for spec in specs for a in spec.adapters}


def list_adapters(settings: EngineSettings) -> list[str]:
    rows = [("NAME", "BASE", "FROM", "SOURCE")]
    rows += [(a.name, a.base, "models file", a.source) for a in static_adapters(settings).values()]
    rows += [(a.name, a.base, "added", a.source) for a in read_adapters(settings.adapters_file)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[3]])
            for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="appliance-models",
        description="Add, remove and list the LoRA adapters this host serves.")
    parser.add_argument("--engine", action="append", default=[], metavar="URL",
                        help="an engine to use (repeat for several); default: "
                        "APPLIANCE_ENGINE_URLS, else APPLIANCE_ENGINE_HOST:PORT")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add-adapter", help="load an adapter into every engine of its "
                              "base model now and at every start")
    add.add_argument("name", help="the name clients will put in \"model\"")
    add.add_argument("source", help="a local directory, a Hugging Face id or an s3:// prefix")
    add.add_argument("--base", required=True, metavar="MODEL",
                     help="the served name of the model it adapts")
    remove = commands.add_parser("remove-adapter", help="unload an adapter everywhere and "
                                 "forget it")
    remove.add_argument("name")
    commands.add_parser("list", help="the adapters: the models file's and those added")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except ValidationError as exc:
        say(f"invalid settings: {exc}")
        return EXIT_USAGE
    try:
        if args.command == "list":
            print("\n".join(list_adapters(settings)))
            return 0
        if args.command == "add-adapter" and (
                not args.name or args.name != "".join(args.name.split()) or
                args.name == args.base):
            say(f"an adapter needs a name without spaces, other than its base's "
                f"(got {args.name!r})")
            return EXIT_USAGE
        with httpx.Client(timeout=TIMEOUT_S, headers={
                "Authorization": f"Bearer {settings.engine_api_key}"}) as client:
            engines = [EngineApi(url, client) for url in engine_urls(args.engine, settings)]
            if args.command == "add-adapter":
                done = add_adapter(settings, engines,
                                   Adapter(name=args.name, source=args.source, base=args.base))
            else:
                done = remove_adapter(settings, engines, args.name)
    except AdapterFailed as exc:
        say(f"{args.command} failed: {exc}")
        return exc.exit_code
    except (AdaptersError, OSError) as exc:
        say(f"{args.command} failed: {exc}")
        return EXIT_FAILED
    except httpx.HTTPError as exc:
        say(f"{args.command} failed: an engine did not answer ({type(exc).__name__}: {exc})")
        return EXIT_FAILED
    say(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
