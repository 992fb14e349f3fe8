"""How several gateway processes share one box without multiplying any key's limits.

One Python process relays on one core. To use more, ``appliance-proxy`` runs
``APPLIANCE_PROXY_WORKERS`` of them, worker ``i`` on port ``APPLIANCE_PROXY_PORT + i``, and
NGINX sends every request of one key to the same worker (``hash $http_authorization
consistent`` over those ports, rendered by ``appliance_ops/render_site.py --gateway-workers N``).
So a key's token buckets, its quota reservations and its fair queue live in exactly one
process, as they did with one worker, and nothing on the request path crosses processes or
waits for a shared store. What does cross processes is divided once, here: the engine's slots
(``engine_concurrency``) and the memory guard (``max_inflight``) are split among the workers,
so together they never let more into vLLM than its batch holds. One thing is shared while
they run, off the request path: whether live traffic runs, so that a batch in one worker gives
way to live traffic in the others (``proxy/tenancy/liveboard.py``, written only when a
worker's live traffic starts or ends).

The price of that choice: one key alone can use at most its worker's share of the engine's
slots (``engine_concurrency / workers``), where one process would give it all of them when no
other key competes. That is why the default count stays small (half the cores, at most
``settings.MAX_DEFAULT_WORKERS``) and why a single busy tenant is better served by fewer workers.
"""

from .settings import ProxySettings


def share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of ``total``: equal parts, the first ones taking the remainder."""
    base, extra = divmod(total, workers)
    return base + (1 if index < extra else 0)


def worker_settings(settings: ProxySettings, index: int) -> ProxySettings:
    """The settings worker ``index`` serves with: its own port, its share of what is global."""
    count = settings.proxy_workers
    if not 0 <= index < count:
        raise ValueError(f"worker {index} out of range for {count} workers")
    if count == 1:
        return settings
    slots = share(settings.engine_concurrency, count, index)
    guard = max(share(settings.max_inflight, count, index),
                slots + settings.max_queued_per_key + 1)
    return settings.model_copy(update={"proxy_port": settings.proxy_port + index,
                                       "engine_concurrency": slots, "max_inflight": guard})


def ports(settings: ProxySettings) -> list[int]:
    return [settings.proxy_port + i for i in range(settings.proxy_workers)]
