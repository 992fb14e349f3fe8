"""Prometheus collectors for the gateway, in a registry of its own.

Labels carry key names, never secrets or hashes; ``/metrics`` is served to loopback only.
With several workers (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor) each worker writes
its values to shared files and ``render`` adds them up, so any worker answers for the whole
gateway: counters and histograms summed over every worker that ever ran, gauges over the live
ones (``livesum``: a dead worker's queue is gone with it).
"""

import os
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from ..keys.store import KeyReport

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Remembered:
    """A labelled collector whose children are found in a dict of its own: prometheus-client's
    ``labels()`` checks the values and takes a lock on every call, a microsecond each, several
    times a request. Children are never dropped, there or here."""

    __slots__ = ("children", "collector")

    def __init__(self, collector: Counter | Gauge | Histogram) -> None:
        self.collector = collector
        self.children: dict[tuple[str, ...], Counter | Gauge | Histogram] = {}

    def labels(self, *values: str):
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.collector.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=r, multiprocess_mode="livesum")

        def counter(name: str, doc: str, labels: list[str]) -> Remembered:
            return Remembered(Counter(name, doc, labels, registry=r))

        def histogram(name: str, doc: str, labels: list[str]) -> Remembered:
            return Remembered(Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=r))

        self.requests = counter("appliance_requests_total", "Requests answered.",
                                ["route", "status", "key"])
        self.latency = histogram("appliance_request_duration_seconds",
                                 "Time from request to the last byte of the answer.", ["route"])
        self.ttft = histogram("appliance_time_to_first_token_seconds",
                              "Time from request to the first streamed chunk.", ["route"])
        self.prompt_tokens = counter("appliance_prompt_tokens_total",
                                     "Prompt tokens the engine reported.", ["key"])
        self.completion_tokens = counter("appliance_completion_tokens_total",
                                         "Completion tokens the engine reported.", ["key"])
        self.cached_prompt_tokens = counter(
            "appliance_prompt_cached_tokens_total",
            "Prompt tokens the engine's prefix cache already held (its cache is per key or"
            " cache group).", ["key"])
        self.engine_requests = counter(
            "appliance_engine_requests_total",
            "Requests sent to each engine, by the model asked for.", ["engine", "model"])
        self.inflight = gauge("appliance_requests_in_flight",
                              "Requests forwarded to the engine and not yet finished.")
        self.upstream_errors = counter("appliance_upstream_errors_total",
                                       "Engine failures seen by the gateway.", ["kind"])
        self.upstream_aborts = counter("appliance_upstream_aborts_total",
                                       "Engine requests closed early (client gone, deadline).",
                                       ["reason"])
        self.rate_limited = counter("appliance_rate_limited_total",
                                    "Requests refused by a per-key limit.", ["key", "limit"])
        self.refused = counter("appliance_requests_refused_total",
                               "Requests the gateway refused before the engine, by reason"
                               " (requests, tokens, queue_full, capacity, quota, model).",
                               ["key", "reason"])
        self.queue_depth = Remembered(gauge(
            "appliance_queue_depth", "Requests waiting in the gateway for an engine slot, per key.",
            ("key",)))
        self.queue_wait = histogram("appliance_queue_wait_seconds",
                                    "Time a request waited in the gateway for an engine slot.",
                                    ["key"])
        self.engine_slots = gauge("appliance_engine_slots",
                                  "Requests the gateway lets into the engine at once.")
        self.engine_slots_in_use = gauge("appliance_engine_slots_in_use",
                                         "Engine slots held by requests now.")
        self.workers = gauge("appliance_proxy_workers", "Gateway worker processes serving.")
        self.usage_write_failures = Counter("appliance_usage_write_failures_total",
                                            "Usage flushes the key store refused (kept in memory).",
                                            registry=r)
        self.last_generation = Gauge("appliance_last_generation_timestamp_seconds",
                                     "When the last generation request was answered with"
                                     " success (the gateway's start until then): idle stop"
                                     " reads it.", registry=r, multiprocess_mode="max")
        self.last_generation.set_to_current_time()
        self.draining = Gauge("appliance_draining",
                              "1 while the gateway drains for a shutdown (spot interruption).",
                              registry=r, multiprocess_mode="livemax")
        self.usage_unsaved = gauge("appliance_usage_unsaved_requests",
                                   "Requests whose usage is not yet written to the key store.")
        self.workers.set(1)

        self.limits_shared = Gauge("appliance_limits_shared",
                                   "1 while rate limits and quotas are shared through the limits"
                                   " store (APPLIANCE_LIMITS_URL); 0 while this gateway keeps"
                                   " its own (none set, or the store unreachable).", registry=r)
        self.limits_store_errors = Counter("appliance_limits_store_errors_total",
                                           "Calls to the limits store that failed.", registry=r)

        self.batch_lines_queued = Gauge("appliance_batch_lines_queued",
                                        "Lines of this appliance's unfinished batches that have"
                                        " no result yet (idle stop counts them as work).",
                                        registry=r, multiprocess_mode="livemax")
        self.batch_lines_running = gauge("appliance_batch_lines_running",
                                         "Batch lines inside the gateway now (waiting for their"
                                         " background turn or at the engine).")
        self.batch_lines = counter("appliance_batch_lines_total",
                                   "Batch lines finished, by outcome: done (2xx) or failed.",
                                   ["outcome"])
        self.batch_slots_in_use = gauge("appliance_batch_slots_in_use",
                                        "Engine slots batch lines hold now (at most"
                                        " APPLIANCE_BATCH_MAX_SLOTS per engine and worker).")

    def render(self) -> bytes:
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=directory)
        return generate_latest(merged)


class QuotaFamilies:
    """Each usable key's token quota and what is left of it in the current period.

    Read from the key store at scrape time (usage reaches it every
    ``APPLIANCE_USAGE_FLUSH_INTERVAL_S``), so every worker, and every gateway of a fleet on one
    store, reports the same figures, and a key nobody uses still shows how much it has left.
    """

    def __init__(self, reports: Iterable[KeyReport], now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.reports = [r for r in reports if r.key.quota_tokens is not None
                        and r.key.usable(now)]

    def collect(self) -> list[GaugeMetricFamily]:
        quota = GaugeMetricFamily("appliance_key_quota_tokens",
                                  "Tokens a key may use per quota period (day or month, UTC).",
                                  labels=["key", "period"])
        left = GaugeMetricFamily("appliance_key_quota_remaining_tokens",
                                 "Tokens a key has left of its quota this period, as of the last"
                                 " usage flush to the key store.", labels=["key", "period"])
        for report in self.reports:
            labels = [report.key.name, report.key.quota_period]
            quota.add_metric(labels, report.key.quota_tokens)
            left.add_metric(labels, report.quota_left)
        return [quota, left]

    def render(self) -> bytes:
        return generate_latest(self)
