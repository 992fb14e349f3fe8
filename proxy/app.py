"""create_app(settings): the gateway's parts, wired once, in the order a request meets them.

    Appliance (request id, access log, request metrics)
      ├── BatchApi    /v1/files*, /v1/batches*: stored jobs (``proxy/batch/``)
      ├── Gateway     /v1/* and vLLM's other API routes -> the engine
      └── FastAPI     /health, /ready, /metrics, the OpenAPI description

    Runner (lifespan task): batch lines -> the same Gateway, at background priority
"""

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .batch.api import BatchApi
from .batch.runner import Runner
from .batch.storage import Storage
from .gateway import Gateway
from .keys.auth import Authenticator
from .keys.backends import is_postgres, open_store
from .keys.store import StoreUnavailable
from .observe import accesslog
from .observe.accesslog import RequestRecord
from .observe.metrics import Metrics, QuotaFamilies
from .protocol.errors import ProxyError
from .protocol.routes import GENERATION_PATHS, ROUTES, api_of, is_gateway_path, route_for
from .protocol.salt import CacheSalts
from .relay.drain import RELAYED, Drain, tell_siblings
from .relay.engines import Engines, not_ready
from .relay.forward import Forwarder
from .settings import ProxySettings, batch_slots
from .tenancy.admission import FairQueue, Observer
from .tenancy.ledger import Ledger
from .tenancy.limits import RateLimiter
from .tenancy.liveboard import LiveBoard
from .tenancy.quota import QuotaBook

GATEWAY_OPENAPI = Path(__file__).with_name("openapi_gateway.json")
# Fresh request ids: unique per process start and request, without a random read per request.
ID_PREFIX = os.urandom(8).hex()
ID_COUNTER = itertools.count()
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
OPS_ROUTES = frozenset({"/health", "/ready", "/metrics", "/drain", "/docs", "/openapi.json"})
log = logging.getLogger("appliance.proxy")
KNOWN_ROUTES = OPS_ROUTES | frozenset(ROUTES)


def metric_route(path: str) -> str:
    """The ``route`` label: the path of a route the appliance serves, its template for a path
    with an id in it (``/v1/files/{id}``: one series, not one per file), else ``other``."""
    if path in KNOWN_ROUTES:
        return path
    route = route_for(path)
    return route.path if route is not None else "other"


def request_id_from(scope) -> str:
    """The client's ``X-Request-Id`` when it is a sane token, else a fresh one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if SAFE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return f"{ID_PREFIX}{next(ID_COUNTER):016x}"


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe_gateway_routes(api: FastAPI) -> None:
    """Add the forwarded routes, which FastAPI never sees, to the OpenAPI description."""
    generate = api.openapi

    def openapi() -> dict:
        if api.openapi_schema is None:
            schema = generate()
            extra = json.loads(GATEWAY_OPENAPI.read_text())
            schema["paths"].update(extra["paths"])
            components = schema.setdefault("components", {})
            for section, entries in extra["components"].items():
                components.setdefault(section, {}).update(entries)
        return api.openapi_schema

    api.openapi = openapi


def with_id(send, record: RequestRecord):
    """``send`` for the routes FastAPI answers: the answer gets the request's id, and the
    record its status."""
    id_header = (b"x-request-id", record.request_id.encode())

    async def send_with_id(message) -> None:
        if message["type"] == "http.response.start":
            record.status = message["status"]
            message["headers"] = [*message.get("headers", ()), id_header]
        await send(message)

    return send_with_id


def error_response(err: ProxyError, path: str = "") -> JSONResponse:
    return JSONResponse(err.payload(api_of(path)), status_code=err.status, headers=err.headers)


BATCH_PREFIXES = ("/v1/files", "/v1/batches")


def is_batch_route(path: str) -> bool:
    route = route_for(path)
    return route is not None and route.served_by == "batch"


class Appliance:
    """The outermost ASGI app: every request gets an id, a metric and one access-log line."""

    def __init__(self, api: FastAPI, gateway: Gateway, metrics: Metrics, drain: Drain,
                 batches: BatchApi) -> None:
        self.api = api
        self.gateway = gateway
        self.batches = batches
        self.metrics = metrics
        self.drain = drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        path = scope["path"]
        request_id = request_id_from(scope)
        record = RequestRecord(request_id, scope["method"], path, time.monotonic(),
                               arrived=time.time())
        scope.setdefault("state", {})["record"] = record
        try:
            if path in GENERATION_PATHS and self.drain.active:
                err = self.drain.refusal()
                record.error = err.code
                await error_response(err, path)(scope, receive, with_id(send, record))
            elif path.startswith(BATCH_PREFIXES) and is_batch_route(path):
                await self.batches(scope, receive, send)
            elif is_gateway_path(path):  # its answers carry the id themselves (``answer_start``)
                await self.gateway(scope, receive, send)
            else:
                await self.api(scope, receive, with_id(send, record))
        finally:
            duration = time.monotonic() - record.started
            if path in GENERATION_PATHS and 200 <= record.status < 300:
                self.metrics.last_generation.set_to_current_time()
            route = metric_route(path)
            self.metrics.requests.labels(route, str(record.status), record.key).inc()
            self.metrics.latency.labels(route).observe(duration)
            accesslog.write(record, duration)


def prepare_store(settings: ProxySettings) -> None:
    """Create or upgrade the key store before serving, so the CLI and the proxy agree on it.

    A shared database that is down at start is not fatal: the gateway comes up, keys fail
    closed with 503, and the first lookup after it returns upgrades the schema if need be.
    """
    try:
        open_store(settings.keys_location, pool_size=1).close()
    except StoreUnavailable as exc:
        if not is_postgres(settings.keys_location):
            raise
        log.error("key store unreachable at start; keys get 503 until it answers: %s", exc)


def admission_observer(metrics: Metrics, engines: Callable[[], Engines],
                       several: bool) -> Observer:
    """A fair queue's callbacks into the metrics (admission itself knows no Prometheus); slots
    in use and keys' queues are counted over every engine's queue (a key may wait at several,
    and in its batch lane too: one queue's count would overwrite another's)."""
    in_use = (lambda _: metrics.engine_slots_in_use.set(
        sum(engine.queue.running for engine in engines().all))) if several \
        else metrics.engine_slots_in_use.set

    def depth(key: str, _: int) -> None:
        """A key's requests waiting, live and batch, over every engine: one gauge each."""
        metrics.queue_depth.labels(key).set(sum(
            engine.queue.queued(key) + engine.queue.queued(key, background=True)
            for engine in engines().all))

    return Observer(depth=depth,
                    waited=lambda key, s: metrics.queue_wait.labels(key).observe(s),
                    in_use=in_use)


def limits_for(settings: ProxySettings, auth: Authenticator, metrics: Metrics):
    """This gateway's own limiter and quota book, or the fleet's in Redis (and its link)."""
    if not settings.limits_url:
        return RateLimiter(), QuotaBook(auth.period_usage), None
    from .tenancy.limits_redis import Link, SharedLimiter, SharedQuotaBook, connect

    link = Link(connect(settings.limits_url, settings.limits_pool_size,
                        settings.limits_timeout_s), metrics)
    return SharedLimiter(link), SharedQuotaBook(link, auth.period_usage), link


def create_app(settings: ProxySettings, siblings: tuple[int, ...] = (),
               board: LiveBoard | None = None) -> Appliance:
    """``siblings``: the ports of the other workers of this gateway, if any; ``board``: where
    the workers tell each other whether live traffic runs (none with one worker)."""
    metrics = Metrics()
    prepare_store(settings)
    store = functools.partial(open_store, settings.keys_location, create=False,
                              pool_size=settings.keys_pool_size)
    auth = Authenticator(functools.partial(store, timeout_s=1.0), settings.key_cache_ttl_s)
    most_batch_slots, batch_slots_beside_live = batch_slots(settings)
    engines = Engines(settings.engine_endpoints, settings.engine_api_key, lambda index: FairQueue(
        settings.engine_concurrency, settings.max_queued_per_key,
        admission_observer(metrics, lambda: engines, len(settings.engine_endpoints) > 1),
        background_cap=most_batch_slots,
        background_beside_live=batch_slots_beside_live,
        board=board.seat(index) if board is not None else None))
    forwarder = Forwarder(engines,
                          on_error=lambda kind: metrics.upstream_errors.labels(kind).inc())
    ledger = Ledger(store, settings.usage_flush_interval_s, metrics)
    metrics.engine_slots.set(settings.engine_concurrency * len(engines.all))
    limiter, quota, shared = limits_for(settings, auth, metrics)
    salts = CacheSalts(settings.cache_salt_secret or settings.engine_api_key)
    gateway = Gateway(settings, auth, forwarder, limiter, ledger, metrics, quota, salts)
    drain = Drain()
    storage = Storage(store, settings.batch_dir, socket.gethostname())
    runner = Runner(storage, gateway, slots=most_batch_slots,
                    lease_s=settings.batch_lease_s, poll_s=settings.batch_poll_interval_s,
                    metrics=metrics, draining=lambda: drain.active,
                    slots_in_use=lambda: sum(e.queue.background_running for e in engines.all))
    batches = BatchApi(auth, storage, max_file_bytes=settings.batch_max_file_bytes,
                       max_stored_bytes=settings.batch_max_stored_bytes_per_key,
                       max_in_progress=settings.batch_max_in_progress_per_key,
                       started=runner.wake)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        ledger.start()
        if shared is not None:
            quota.start()
        await engines.check_all()
        runner.start()
        try:
            yield
        finally:
            await runner.stop()  # running lines finish and are billed before the ledger stops
            storage.close()
            if shared is not None:
                await quota.stop()
                await shared.client.aclose(close_connection_pool=True)
            await ledger.stop()
            await forwarder.close()
            auth.close()

    api = FastAPI(title="inference-appliance gateway", lifespan=lifespan,
                  description="OpenAI-compatible gateway in front of vLLM.")
    describe_gateway_routes(api)

    @api.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ProxyError(404, f"No route {request.url.path}.", "not_found"))

    @api.exception_handler(405)
    async def not_allowed(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(ProxyError(405, f"{request.method} is not allowed here.",
                                         "method_not_allowed", headers=dict(exc.headers or {})))

    error = {"description": "An error in OpenAI's shape.",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

    @api.get("/health")
    async def health() -> dict:
        """The proxy is alive (says nothing about the engine)."""
        return {"status": "ok"}

    def local_only(request: Request, what: str) -> JSONResponse | None:
        """Loopback clients only (NGINX passes the real client address, and routes neither)."""
        real = request.headers.get("x-real-ip")
        client = request.client.host if request.client else None
        if not is_loopback(client) or (real is not None and not is_loopback(real)):
            return error_response(ProxyError(403, f"{what} loopback only.", "forbidden"))
        return None

    @api.get("/ready", responses={503: error})
    async def ready() -> JSONResponse:
        """Ready when an engine is healthy and has generated, and the gateway is not draining;
        the answer says which models are ready (one engine away leaves the others serving)."""
        if drain.active:
            return error_response(ProxyError(503, f"Not ready: draining ({drain.reason}).",
                                             "draining", headers={"Retry-After": "30"}))
        results = await engines.check_all()
        refusal = not_ready(results)
        if refusal is not None:
            return error_response(refusal)
        status = "ready" if all(ok for _, ok, _ in results) else "partial"
        return JSONResponse({"status": status, "engines": [
            {"models": list(engine.cards), "ready": ok, "why": why}
            for engine, ok, why in results]})

    @api.get("/metrics", response_class=PlainTextResponse, responses={403: error})
    async def prometheus(request: Request) -> PlainTextResponse:
        """Prometheus metrics, to loopback clients only."""
        refused = local_only(request, "Metrics are served to")
        if refused is not None:
            return refused
        try:
            reports = await asyncio.to_thread(auth.reports)
        except Exception as exc:  # the rest of the scrape stands without them
            log.warning("quota gauges left out of this scrape: the key store failed (%s)",
                        type(exc).__name__)
            reports = []
        return PlainTextResponse(metrics.render() + QuotaFamilies(reports).render(),
                                 media_type="text/plain; version=0.0.4")

    # Kept out of the OpenAPI description: a local control for appliance-spot-watch, not API.
    @api.post("/drain", include_in_schema=False)
    async def start_draining(request: Request) -> JSONResponse:
        """Take no new generation requests, let those in flight finish (appliance-spot-watch
        calls it on a spot interruption notice). Loopback only; only a restart undoes it."""
        refused = local_only(request, "Draining is for")
        if refused is not None:
            return refused
        try:
            reason = str((await request.json()).get("reason") or "asked to drain")[:200]
        except (ValueError, AttributeError):
            reason = "asked to drain"
        drain.begin(reason)
        metrics.draining.set(1)
        if siblings and RELAYED not in request.headers:
            await tell_siblings(settings.proxy_host, list(siblings), reason)
        return JSONResponse({"status": "draining", "reason": drain.reason, "since": drain.since})

    return Appliance(api, gateway, metrics, drain, batches)
