"""The engines behind the gateway: which models each serves, whether it may take traffic, and
which one a request goes to.

Each engine is one vLLM process on its own loopback port (``APPLIANCE_ENGINE_URLS``: one a model
replica, as the placement plan starts them). The gateway learns what each serves from the
engine itself (``/v1/models``: served names and adapters), so nothing here repeats the plan.

**Ready means it has generated.** A vLLM that listens is not yet one that answers: before an
engine gets a client's request (at start, and again after it went away), one short canary
generation of each of its models must succeed through it; a failure leaves it unready, with the
reason in the log and in ``/ready``. No client is ever an engine's first request (vLLM's CPU
build 0.32 has lost its worker to a first request of a three-token prompt; the canary's prompt
is longer).

**Which replica.** Among the ready engines of a model: the one a hash of the key and the
prompt's start prefers (rendezvous hashing, so the same key and prefix keep finding the replica
whose prefix cache holds them), unless it is busier than the least busy by more than
``AFFINITY_SLACK`` requests; then the least busy.
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from ..protocol.errors import ProxyError, engine_unavailable, invalid, model_not_found
from ..tenancy.admission import FairQueue
from .transport import CONNECT_TIMEOUT_S, EngineTransport, upstream_headers

log = logging.getLogger("appliance.proxy")
HEALTH_READ_TIMEOUT_S = 2.0
HEALTH_RECHECK_S = 0.5
CANARY_TIMEOUT_S = 120.0
CANARY_PROMPT = ("The appliance checks that this engine generates before it sends the engine any "
                 "client's request: one short completion of every model it serves.")
RELIST_S = 1.0
"""How often a model no engine lists, or a client's model list, reads the engines' lists again."""
AFFINITY_SLACK = 4
"""Requests a preferred replica may have beyond the least busy one and still be chosen."""
AFFINITY_BYTES = 512
"""How much of the prompt's start decides the preferred replica."""


@dataclass(eq=False)
class Engine:
    url: str
    transport: EngineTransport
    queue: FairQueue
    """This engine's slots, shared fairly between keys: each engine has its own."""
    cards: dict[str, dict] = field(default_factory=dict)
    """The models it serves (``/v1/models``'s cards by id), as last seen."""
    ready: bool = False
    why: str = "not checked yet"
    checked_at: float = 0.0
    outstanding: int = 0
    """Requests sent to it and not finished: what the replica choice balances."""
    listed_at: float = 0.0
    """When its model list was last read."""
    name: str = ""
    """How metrics and the access log name it: its loopback address."""

    def __post_init__(self) -> None:
        self.name = self.url.removeprefix("http://")

    def serves(self, model: str) -> bool:
        return model in self.cards

    def context_length(self, model: str | None) -> int | None:
        card = self.cards.get(model) if model is not None else (
            next(iter(self.cards.values())) if len(self.cards) == 1 else None)
        length = (card or {}).get("max_model_len")
        return length if isinstance(length, int) else None


def affinity(key: str, body: dict | None) -> bytes:
    """What a request's replica preference is made of: its key and its prompt's start."""
    if not body:
        return key.encode()
    prompt = body.get("messages") or body.get("prompt") or body.get("input") or ""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    return key.encode() + b"\0" + text[:AFFINITY_BYTES].encode()


def choose(replicas: list[Engine], preference: bytes) -> Engine:
    """The replica for a request among ready ``replicas`` (see the module's docstring)."""
    if len(replicas) == 1:
        return replicas[0]
    preferred = max(replicas, key=lambda e: hashlib.blake2b(
        e.url.encode() + b"\0" + preference, digest_size=8).digest())
    least = min(replicas, key=lambda e: e.outstanding)
    return preferred if preferred.outstanding <= least.outstanding + AFFINITY_SLACK else least


class Engines:
    def __init__(self, urls: list[str], engine_key: str,
                 make_queue: Callable[[int], FairQueue]) -> None:
        """``make_queue(index)``: the fair queue of the engine at ``urls[index]``."""
        self.engine_key = engine_key
        self.all: list[Engine] = []
        for url in urls:
            base = httpx.URL(url)
            if base.scheme != "http":
                raise ValueError(f"engines are reached over plain HTTP on loopback, not {url}")
            self.all.append(Engine(url, EngineTransport(base.host, base.port or 80),
                                   make_queue(len(self.all))))

    async def close(self) -> None:
        for engine in self.all:
            await engine.transport.aclose()

    async def _ask(self, engine: Engine, method: bytes, path: bytes, request_id: str,
                   body: dict | None = None, timeout: float = HEALTH_READ_TIMEOUT_S):
        content = b"" if body is None else json.dumps(body).encode()
        headers = upstream_headers([], request_id, self.engine_key, json_body=body is not None)
        response = await engine.transport.send(method, path, headers, content,
                                               CONNECT_TIMEOUT_S, timeout)
        await response.aread()
        return response

    async def check(self, engine: Engine) -> tuple[bool, str]:
        """Ask the engine's ``/health`` now; one that turns healthy is canaried before it is
        ready, one that fails is unready until it is healthy and canaried again."""
        engine.checked_at = time.monotonic()
        try:
            response = await self._ask(engine, b"GET", b"/health", "health")
        except httpx.HTTPError as exc:
            return self._unready(engine, f"the engine is not reachable ({type(exc).__name__});"
                                 " it may be loading")
        if response.status_code != 200:
            return self._unready(engine, f"the engine reports {response.status_code}; the model"
                                 " may be loading")
        if not engine.ready:
            ok, why = await self._canary(engine)
            if not ok:
                return self._unready(engine, why)
            engine.ready, engine.why = True, "ready: it has generated"
            log.info("engine %s is ready (%s)", engine.url, ", ".join(engine.cards))
        return True, engine.why

    def _unready(self, engine: Engine, why: str) -> tuple[bool, str]:
        if engine.ready or engine.why != why:
            log.warning("engine %s is not ready: %s", engine.url, why)
        engine.ready, engine.why = False, why
        return False, why

    async def _list(self, engine: Engine) -> dict[str, dict]:
        """The engine's ``/v1/models`` cards by id; raises what the read raised."""
        engine.listed_at = time.monotonic()
        listed = await self._ask(engine, b"GET", b"/v1/models", "models")
        return {card["id"]: card for card in listed.json().get("data", [])
                if isinstance(card, dict) and isinstance(card.get("id"), str)}

    async def relist(self) -> None:
        """Read again what the ready engines serve, at most every ``RELIST_S``: an adapter added
        or removed at runtime (``appliance-models``) is routed, or gone, without a restart. The
        canary covers base models; an adapter is the base model's weights."""
        now = time.monotonic()
        for engine in self.all:
            if engine.ready and now - engine.listed_at >= RELIST_S:
                with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError, TypeError):
                    engine.cards = await self._list(engine)

    async def _canary(self, engine: Engine) -> tuple[bool, str]:
        """One generation of each model (adapters are the base model's weights: skipped); a pooling
        model runs one embedding, or one pass of vLLM's generic ``/pooling``."""
        try:
            cards = await self._list(engine)
        except (httpx.HTTPError, ValueError, AttributeError, TypeError) as exc:
            return False, f"the engine lists no models ({type(exc).__name__})"
        for model, card in cards.items():
            if card.get("parent") not in (None, model) and card.get("parent") in cards:
                continue
            ok, why = await self._generate_once(engine, model)
            if not ok:
                return False, why
        engine.cards = cards
        return True, "ready"

    async def _generate_once(self, engine: Engine, model: str) -> tuple[bool, str]:
        tries = ((b"/v1/completions", {"model": model, "prompt": CANARY_PROMPT, "max_tokens": 1}),
                 (b"/v1/embeddings", {"model": model, "input": CANARY_PROMPT}),
                 (b"/pooling", {"model": model, "input": CANARY_PROMPT}))
        answer = None
        for path, body in tries:
            try:
                answer = await self._ask(engine, b"POST", path, "canary", body, CANARY_TIMEOUT_S)
            except httpx.HTTPError as exc:
                return False, f"the canary generation of {model!r} failed ({type(exc).__name__})"
            if answer.status_code == 200:
                return True, "ready"
            if answer.status_code not in (400, 404):  # 400/404: a pooling model, try its routes
                break
        return False, (f"the canary generation of {model!r} was answered "
                       f"{answer.status_code}: {answer.content[:300]!r}")

    async def check_all(self) -> list[tuple[Engine, bool, str]]:
        results = await asyncio.gather(*(self.check(engine) for engine in self.all))
        return [(engine, ok, why) for engine, (ok, why) in zip(self.all, results, strict=True)]

    def models(self) -> list[str]:
        """Every model some engine has served, ready or not."""
        return list(dict.fromkeys(model for engine in self.all for model in engine.cards))

    def cards(self) -> bytes:
        """``/v1/models`` of the whole box: each model once, from the engines that serve it."""
        seen: dict[str, dict] = {}
        for engine in self.all:
            for model, card in engine.cards.items():
                seen.setdefault(model, card)
        return json.dumps({"object": "list", "data": list(seen.values())}).encode()

    def at_hand(self, model: str | None) -> Engine | None:
        """The box's one engine, ready and serving ``model``: the common case, found without
        a coroutine on every request's path; None sends the request to ``engine_for``."""
        if len(self.all) == 1:
            engine = self.all[0]
            if engine.ready and (model is None or model in engine.cards):
                return engine
        return None

    async def engine_for(self, model: str | None, preference: bytes) -> Engine:
        """The engine a request for ``model`` goes to; 503 with Retry-After while none of its
        engines is ready (the other models keep serving), 404 for a model none serves."""
        if model is not None and not any(engine.serves(model) for engine in self.all):
            await self.relist()  # an adapter added since the engines were checked in
        replicas = self.replicas(model)
        ready = [e for e in replicas if e.ready]
        if not ready:
            now = time.monotonic()
            for engine in replicas:
                if now - engine.checked_at >= HEALTH_RECHECK_S:
                    await self.check(engine)
            replicas = self.replicas(model)
            ready = [e for e in replicas if e.ready]
        if ready:
            return choose(ready, preference)
        if model is not None and self.models() and model not in self.models() and all(
                engine.ready for engine in self.all):
            raise model_not_found(model)
        whose = "" if model is None else f" for model {model!r}"
        raise engine_unavailable(f"The engine{whose} is not ready; it may still be loading.")

    def replicas(self, model: str | None) -> list[Engine]:
        """The engines that serve ``model``; with no model named, the one model there is; a
        model no ready engine has listed may be one a loading engine will serve."""
        if model is None:
            models = self.models()
            if len(models) > 1:
                raise invalid("you must provide a model parameter", "model")
            return self.all if not models else [e for e in self.all if e.serves(models[0])]
        serving = [engine for engine in self.all if engine.serves(model)]
        return serving or [engine for engine in self.all if not engine.cards]

    def context_length(self, model: str | None) -> int | None:
        for engine in self.replicas(model) if model is not None else self.all:
            length = engine.context_length(model)
            if length is not None:
                return length
        return None


def not_ready(results: list[tuple[Engine, bool, str]]) -> ProxyError | None:
    """``/ready``'s refusal: while no engine is ready (one of several is enough to serve)."""
    if any(ok for _, ok, _ in results):
        return None
    why = "; ".join(why for _, _, why in results)
    return ProxyError(503, f"Not ready: {why}.", "engine_not_ready", headers={"Retry-After": "5"})
