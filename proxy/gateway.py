"""The model's routes (OpenAI's and Anthropic's): authenticate, check, limit, then forward.

A pure ASGI handler rather than a framework route: it must see ``http.disconnect`` the moment
it arrives (to abort the engine's work) and it sits on every request's path, so nothing here
is done that a request does not need.
"""

import asyncio
import logging
import math
import time
from urllib.parse import unquote

from .keys.auth import Authenticator, api_key, store_error
from .keys.store import Key, StoreUnavailable
from .observe.accesslog import RequestRecord
from .observe.metrics import Metrics
from .protocol.body import (
    encode,
    lacks_output_cap,
    output_cap,
    parse_request,
    usage_requested,
    with_output_cap,
)
from .protocol.engine_errors import engine_error
from .protocol.errors import (
    ProxyError,
    engine_unavailable,
    invalid,
    limits_unavailable,
    model_not_found,
)
from .protocol.models import is_models_route, models_answer
from .protocol.routes import Route, api_of, route_for
from .protocol.salt import SALT_FIELD, CacheSalts
from .protocol.usage import TokenUsage, from_json_body
from .relay.engines import Engine, Engines, affinity
from .relay.exchange import Exchange, answer_start, send_answer
from .relay.forward import (
    Forwarder,
    StreamOutcome,
    client_headers,
    timeout_error,
)
from .relay.transport import upstream_headers
from .settings import ProxySettings
from .tenancy.admission import QueueFull, Slot, Tenant, Unqueued
from .tenancy.deadlines import deadlines_for
from .tenancy.ledger import Ledger
from .tenancy.limits import Decision, RateLimiter
from .tenancy.quota import (
    LimitsUnavailable,
    QuotaBook,
    QuotaExceeded,
    Reservation,
    reservation_for,
    retry_after_text,
)

log = logging.getLogger("appliance.proxy")
# Uploads (audio) are multipart; every other POST body is JSON, whatever curl -d labels it.
NOT_JSON = (b"multipart/", b"application/octet-stream")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
JSON_HEADERS = [(b"content-type", b"application/json")]


def route_of(path: str, method: str) -> Route:
    """The route's specification, before anything else: an unknown route is refused, never
    forwarded ungoverned, and a method it does not take is refused before auth."""
    route = route_for(path)
    if route is None:
        raise ProxyError(404, f"Invalid URL ({method} {path}): the appliance serves no such "
                         "route.", "not_found")
    if method not in route.methods:
        raise ProxyError(405, f"{method} is not allowed here.", "method_not_allowed",
                         headers={"Allow": ", ".join(route.methods)})
    return route


def is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
               for name, value in headers)


def is_json(headers: dict[bytes, bytes]) -> bool:
    return not headers.get(b"content-type", b"").lower().startswith(NOT_JSON)


def note_usage(record: RequestRecord, usage: TokenUsage | None) -> None:
    if usage is not None:
        record.prompt_tokens = usage.prompt_tokens
        record.completion_tokens = usage.completion_tokens
        record.cached_tokens = usage.cached_tokens


class ClientGone(Exception):
    """The client hung up; there is nobody left to answer."""


def too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"The request body exceeds {limit} bytes.", "request_too_large")


async def read_body(receive, limit: int, declared: bytes | None) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def as_header_list(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


# A plain request's watch for a hang-up starts once it has run this long: most small requests
# are answered sooner and cost a timer instead of a task (a sizeable share of their CPU), and a
# client that left sooner is noticed then, when its request would still be running. A stream is
# watched from its start: what the engine generates after a hang-up is wasted, and billed.
WATCH_AFTER_S = 0.05


async def until_disconnect(receive) -> None:
    """Outside the watch's class: a watcher that held the watch would tie the request's task to
    its own cancelled frame, a cycle per request for the collector."""
    while (await receive())["type"] != "http.disconnect":
        pass


class CancelledOnDisconnect:
    """Cancel the enclosed work the moment the client disconnects, and raise ClientGone; and,
    given ``total_s``, when that time is up, raising TimeoutError.

    The deadline rides on the timer that starts the watch (``asyncio.timeout`` beside it cost
    about 6 µs a request: its own timer, a Python class, the task's cancel count). A class
    rather than a generator-based context manager: it wraps every request.
    """

    __slots__ = ("after_s", "ends_at", "expired", "receive", "task", "timer", "total_s",
                 "watcher")

    def __init__(self, receive, after_s: float = 0.0, total_s: float | None = None) -> None:
        self.receive = receive
        self.after_s = after_s
        self.total_s = total_s
        self.ends_at: float | None = None
        self.expired = False
        self.timer: asyncio.TimerHandle | None = None
        self.watcher: asyncio.Future | None = None

    async def __aenter__(self) -> None:
        self.task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.total_s is not None:
            self.ends_at = now + self.total_s
        if self.after_s <= 0:
            self._watch_then_deadline()
        elif self.ends_at is not None and self.ends_at <= now + self.after_s:
            self._arm_deadline()  # over before a watch would start
        else:
            self.timer = loop.call_at(now + self.after_s, self._watch_then_deadline)

    def _watch(self) -> None:
        self.watcher = asyncio.ensure_future(until_disconnect(self.receive))
        self.watcher.add_done_callback(self._on_disconnect)

    def _watch_then_deadline(self) -> None:
        self._watch()
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        self.timer = None if self.ends_at is None \
            else asyncio.get_running_loop().call_at(self.ends_at, self._expire)

    def _expire(self) -> None:
        self.timer = None
        self.expired = True
        self.task.cancel()

    def _on_disconnect(self, done: asyncio.Future) -> None:
        if not done.cancelled():
            self.task.cancel()

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if self.timer is not None:
            self.timer.cancel()
        watcher = self.watcher
        gone = False
        if watcher is not None:
            watcher.remove_done_callback(self._on_disconnect)
            gone = watcher.done() and not watcher.cancelled()
            watcher.cancel()
        cancelled = exc_type is asyncio.CancelledError
        if gone and cancelled and self.task.uncancel() == 0:
            raise ClientGone from None
        if self.expired and self.task.uncancel() == 0 and cancelled:
            raise TimeoutError from exc
        return False


class Gateway:
    """The steps every request takes (``handle``); what differs per route is its ``Route``."""

    def __init__(self, settings: ProxySettings, auth: Authenticator, forwarder: Forwarder,
                 limiter: RateLimiter, ledger: Ledger, metrics: Metrics,
                 quota: QuotaBook, salts: CacheSalts) -> None:
        self.settings = settings
        self.auth = auth
        self.forwarder = forwarder
        self.engines: Engines = forwarder.engines
        self.limiter = limiter
        self.ledger = ledger
        self.metrics = metrics
        self.quota = quota
        self.salts = salts
        self.inflight = 0

    async def __call__(self, scope, receive, send) -> None:
        record: RequestRecord = scope["state"]["record"]
        extra: list[tuple[bytes, bytes]] = []
        try:
            await self.handle(scope, receive, send, record, extra)
        except ProxyError as err:
            record.error = err.code
            headers = [(b"content-type", b"application/json"), *extra,
                       *as_header_list(err.headers)]
            await send_answer(send, record, err.status, headers,
                              err.body(api_of(scope["path"])))
        except ClientGone:
            record.status = 499
            record.error = "client_disconnected"
        except Exception:
            log.exception("unexpected failure on %s (request %s)", scope["path"],
                          record.request_id)
            if record.status == 0:
                err = ProxyError(500, "The gateway failed unexpectedly.", "internal_error")
                await send_answer(send, record, 500, [(b"content-type", b"application/json")],
                                  err.body(api_of(scope["path"])))

    async def handle(self, scope, receive, send, record: RequestRecord, extra: list) -> None:
        path, method = scope["path"], scope["method"]
        route = route_of(path, method)
        headers = dict(scope["headers"])
        batch_key = scope["state"].get("batch_key")  # a batch line: only proxy.batch sets it
        key = batch_key or await self.auth.authenticate(api_key(headers))
        record.key = key.name
        raw = await read_body(receive, self.settings.max_body_bytes,
                              headers.get(b"content-length"))
        body = parse_request(raw, route) if method == "POST" and is_json(headers) else None
        self.check_model(key, path, body)
        self.check_rate(key, await self.limiter.admit(key.name, key.rpm, key.tpm,
                                                      time.monotonic()), extra)
        if is_models_route(path):
            await self.answer_models(path, key, record, send, extra)
            return
        model = body.get("model") if body is not None else None
        engine = self.engines.at_hand(model) or await self.engines.engine_for(
            model, affinity(key.name, body))
        record.engine = engine.name
        record.model = model or ""
        self.metrics.engine_requests.labels(engine.name, record.model).inc()
        tenant = Tenant(key.name, key.weight, key.max_concurrent, batch_key is not None)
        sequences = route.sequences(body) if route.generates and body is not None else 1
        if sequences > 1:
            self.check_sequences(engine, tenant, sequences)
        if body is not None and route.generates and self.settings.default_max_tokens:
            capped = self.with_default_cap(route, engine, body)
            if capped is not None:
                body, raw = capped, encode(capped)
        reservation = await self.reserve_quota(key, route, engine, body, len(raw), sequences)
        if body is not None and route.salted:  # after the reservation: the salt is no prompt
            salt = self.salts.salt_for(key.name, key.cache_group)
            raw = self.salts.salted(body, raw, salt)
            if route.usage_on_request and body.get("stream") is True:  # re-encoded from body
                body = {**body, SALT_FIELD: salt}
        if self.inflight >= self.settings.max_inflight:
            self.quota.settle(reservation, 0)
            self.metrics.refused.labels(key.name, "capacity").inc()
            raise engine_unavailable("The gateway is at capacity; retry shortly.")

        ex = Exchange(engine, tenant, method, path, scope.get("query_string", b""),
                      upstream_headers(scope["headers"], record.request_id,
                                       self.forwarder.engine_key, json_body=body is not None),
                      raw, deadlines_for(body, route.generates, self.settings),
                      record, receive, send, answer_headers=extra,
                      route=route, sequences=sequences)
        self.inflight += 1
        engine.outstanding += 1
        self.metrics.inflight.inc()
        try:
            if body is not None and body.get("stream") is True:
                record.stream = True
                if route.usage_on_request:
                    content, ex.strip_final_usage, ex.strip_chunk_usage = usage_requested(body)
                    ex.content = content or raw
                await self.stream(ex)
            else:
                await self.unary(ex)
        except QueueFull:
            self.metrics.refused.labels(key.name, "queue_full").inc()
            raise ProxyError(429, f"Too many requests waiting on key {key.name!r} "
                             f"({self.settings.max_queued_per_key} at most); retry shortly.",
                             "too_many_requests", headers={"Retry-After": "1"}) from None
        finally:
            self.inflight -= 1
            engine.outstanding -= 1
            self.metrics.inflight.dec()
            if record.admitted is not None:  # it reached the engine: it counts in usage
                self.account(record)
            self.quota.settle(reservation, record.prompt_tokens + record.completion_tokens)

    def check_model(self, key: Key, path: str, body: dict | None) -> None:
        """A key limited to some models sees every other model as missing, as OpenAI words it."""
        if key.models is None:
            return
        if path.startswith("/v1/models/"):
            model = unquote(path.removeprefix("/v1/models/"))
        elif body is not None:
            model = body.get("model")
            if model is None:
                raise invalid("you must provide a model parameter", "model")
        else:
            return
        if not key.allows_model(model):
            self.metrics.refused.labels(key.name, "model").inc()
            raise model_not_found(model)

    def check_rate(self, key: Key, decision: Decision, extra: list) -> None:
        """The key's requests and tokens per minute; its ``x-ratelimit-*`` headers either way."""
        extra.extend(decision.headers)
        if not decision.allowed:
            self.metrics.rate_limited.labels(key.name, decision.reason).inc()
            self.metrics.refused.labels(key.name, decision.reason).inc()
            retry = str(max(1, math.ceil(decision.retry_after_s)))
            raise ProxyError(429, f"Rate limit reached for {decision.reason} per minute on key "
                             f"{key.name!r}; retry after {retry}s.", "rate_limit_exceeded",
                             headers={"Retry-After": retry})

    async def answer_models(self, path: str, key: Key, record: RequestRecord, send,
                            extra: list) -> None:
        """``/v1/models`` of every engine, or one model's card: the models (and adapters) the
        key may use, answered here from what the engines listed."""
        if not any(engine.ready for engine in self.engines.all):
            await self.engines.check_all()
            if not any(engine.ready for engine in self.engines.all):
                raise engine_unavailable("The engine is not ready; the model may still be "
                                         "loading.")
        await self.engines.relist()
        content = models_answer(path, self.engines.cards(), key.models)
        record.admitted = time.time()
        self.account(record)
        await send_answer(send, record, 200, [*JSON_HEADERS, *extra], content)

    def check_sequences(self, engine: Engine, tenant: Tenant, sequences: int) -> None:
        """A request that runs several sequences at once (``n``, ``best_of``, a prompt list)
        and could never get that many engine slots is refused now, not queued for ever."""
        queue = engine.queue
        if not queue.fits(tenant, sequences):
            self.metrics.refused.labels(tenant.name, "sequences").inc()
            most = queue.capacity if tenant.max_concurrent is None \
                else min(queue.capacity, tenant.max_concurrent)
            raise invalid(f"This request asks for {sequences} sequences at once (n, best_of "
                          f"and prompts together); key {tenant.name!r} may run at most {most} "
                          "at once here. Split it into smaller requests.", None,
                          "too_many_sequences")

    async def reserve_quota(self, key: Key, route: Route, engine: Engine, body: dict | None,
                            size: int, sequences: int) -> Reservation | None:
        """Hold an upper bound of the request's tokens against the key's quota while it runs."""
        if key.quota_tokens is None or not route.generates:
            return None
        context = engine.context_length((body or {}).get("model"))
        tokens = reservation_for(route, body, size, context, sequences)
        try:
            return await self.quota.reserve(key, tokens, time.time())
        except StoreUnavailable as exc:
            raise store_error(exc) from None
        except LimitsUnavailable:
            self.metrics.refused.labels(key.name, "limits_store").inc()
            raise limits_unavailable() from None
        except QuotaExceeded as exc:
            self.metrics.refused.labels(key.name, "quota").inc()
            needed = "an unbounded number of" if tokens is None else f"up to {tokens}"
            raise ProxyError(429, f"Key {key.name!r} has {exc.left} of its {exc.quota} tokens "
                             f"left this {key.quota_period}; this request may use {needed} "
                             "tokens. Lower max_tokens or wait for the next period.",
                             "insufficient_quota",
                             headers={"Retry-After": retry_after_text(exc.retry_after_s)}
                             ) from None

    async def unary(self, ex: Exchange) -> None:
        total_s = ex.deadlines.total
        try:
            async with CancelledOnDisconnect(ex.receive, WATCH_AFTER_S, total_s), \
                    self.engine_slot(ex):
                response = await self.forwarder.call(ex)
        except TimeoutError:
            self.metrics.upstream_errors.labels("timeout").inc()
            self.metrics.upstream_aborts.labels("deadline").inc()
            raise timeout_error(f"{total_s:g}s for this request") from None
        except ClientGone:
            self.metrics.upstream_aborts.labels("client_disconnected").inc()
            raise
        if response.status_code >= 400:
            raise await self.engine_failure(ex, response)
        await self.answer_whole(ex, response)

    async def stream(self, ex: Exchange) -> None:
        outcome = StreamOutcome()
        started = time.monotonic()
        deadlines = ex.deadlines
        try:
            async with CancelledOnDisconnect(ex.receive), asyncio.timeout(
                deadlines.first_token
            ) as deadline, self.engine_slot(ex):
                response = await self.forwarder.open_stream(ex)
                try:
                    await self.relay(ex, response, deadline, outcome)
                finally:
                    await response.aclose()
        except TimeoutError:
            self.metrics.upstream_aborts.labels("deadline").inc()
            if outcome.first_chunk_at is None:
                err = timeout_error(f"no first token within {deadlines.first_token:g}s")
            else:
                err = timeout_error(f"no new token within {deadlines.idle:g}s")
            if not outcome.answered:
                raise err from None
            await self.end_stream(ex, err)
        except ClientGone:
            self.metrics.upstream_aborts.labels("client_disconnected").inc()
            raise
        finally:
            if outcome.first_chunk_at is not None:
                self.metrics.ttft.labels(ex.path).observe(outcome.first_chunk_at - started)
            note_usage(ex.record, outcome.usage)

    async def relay(self, ex: Exchange, response, deadline: asyncio.Timeout,
                    outcome: StreamOutcome) -> None:
        """Relay the engine's answer to the client: its error as it is, else event by event."""
        if response.status_code >= 400:
            await response.aread()
            raise await self.engine_failure(ex, response)
        if response.status_code != 200 or not is_event_stream(response.headers):
            # vLLM answers some routes (embeddings, pooling) in one piece whatever ``stream``
            # says: that answer goes to the client as it is, with its own content type.
            await response.aread()
            await self.answer_whole(ex, response)
            return
        send = ex.send
        await send(answer_start(ex.record, 200, [*SSE_HEADERS, *ex.answer_headers]))
        outcome.answered = True
        await self.forwarder.relay(ex, response, deadline, outcome)
        if outcome.error is not None:
            await self.end_stream(ex, outcome.error)
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def answer_whole(ex: Exchange, response) -> None:
        """An engine's answer read whole, to the client as it came, its usage noted."""
        if response.status_code == 200:
            note_usage(ex.record, from_json_body(response.content))
        await ex.answer(response.status_code, client_headers(response.headers), response.content)

    def with_default_cap(self, route: Route, engine: Engine, body: dict) -> dict | None:
        """The body with ``APPLIANCE_DEFAULT_MAX_TOKENS`` when it names no output cap."""
        if not lacks_output_cap(body, route):
            return None
        context = engine.context_length(body.get("model"))
        return with_output_cap(body, route, output_cap(self.settings.default_max_tokens, context))

    async def engine_failure(self, ex: Exchange, response) -> ProxyError:
        """The engine's error in OpenAI's shape; the engine's own words go to the log.

        A server error from an engine whose health check fails as well is the engine going
        away, not this request's fault (vLLM answers 500s while it drains for a restart): the
        client gets 503 ``engine_unavailable`` with Retry-After, and requests are refused early
        until the engine is healthy again.
        """
        log.info("engine answered %d on %s (request %s): %s", response.status_code,
                 ex.record.route, ex.record.request_id, response.content[:2000])
        if response.status_code >= 500:
            healthy, why = await self.engines.check(ex.engine)
            if not healthy:
                return engine_unavailable(f"The engine failed and its health check fails too "
                                          f"({why}); retry shortly.")
        return engine_error(response.status_code, response.content, ex.record.method,
                            ex.record.route)

    def engine_slot(self, ex: Exchange) -> Slot | Unqueued:
        """Generation waits its key's fair turn for an engine slot a sequence; other routes go
        straight. Either way the request's record notes when it reached the engine."""
        if ex.route.generates:
            return ex.engine.queue.slot(ex.tenant, ex.record, ex.sequences)
        return Unqueued(ex.record)

    async def end_stream(self, ex: Exchange, err: ProxyError) -> None:
        """Headers are gone already: the error travels as the stream's last event."""
        ex.record.error = err.code
        await ex.send({"type": "http.response.body", "body": err.sse_event(ex.route.api),
                       "more_body": False})

    def account(self, record: RequestRecord) -> None:
        """Every request sent to the engine counts once, with the tokens it reported (if any)."""
        prompt, completion = record.prompt_tokens, record.completion_tokens
        self.ledger.record(record.key, prompt, completion)
        if prompt + completion:
            self.limiter.spend_tokens(record.key, prompt + completion, time.monotonic())
            self.metrics.prompt_tokens.labels(record.key).inc(prompt)
            self.metrics.completion_tokens.labels(record.key).inc(completion)
            if record.cached_tokens:
                self.metrics.cached_prompt_tokens.labels(record.key).inc(record.cached_tokens)
