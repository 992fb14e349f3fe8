"""Every knob of the gateway, read from ``APPLIANCE_*`` environment variables.

Production reads them from ``/etc/appliance/appliance.env`` (systemd's ``EnvironmentFile``
loads the same file); the process environment wins over the file, and ``APPLIANCE_ENV_FILE``
points a development stack at a file of its own, as it does for the engine.
"""

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_FILE = Path("/etc/appliance/appliance.env")


def readable_env_file() -> Path | None:
    """The env file when this user may read it; root-only files are loaded by systemd instead."""
    path = Path(os.environ.get("APPLIANCE_ENV_FILE") or ENV_FILE)
    return path if os.access(path, os.R_OK) else None


MAX_DEFAULT_WORKERS = 8
"""Eight workers relay several hundred thousand SSE events a second: past an 8-GPU box's."""


def available_cpus() -> int:
    """The cores this process may run on (a cgroup or taskset may give it fewer than the box)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_worker_count(cpus: int) -> int:
    """Half the cores (vLLM's own processes, NGINX and the tokenizers need the rest), 1 to 8."""
    return max(1, min(MAX_DEFAULT_WORKERS, cpus // 2))


PositiveFloat = Annotated[float, Field(gt=0)]


class ProxySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", extra="ignore")

    engine_url: str = "http://127.0.0.1:8000"
    """Where vLLM's OpenAI server listens; loopback only."""
    engine_urls: str = ""
    """Several engines (one a model replica, as the placement plan starts them), comma-separated;
    the gateway asks each which models it serves and routes by ``model``. Empty: ``engine_url``
    alone."""
    engine_api_key: str = ""
    """The engine's internal key (vLLM ``--api-key``), sent in place of the client's key."""
    cache_salt_secret: str = ""
    """Secret the per-key prefix-cache salts (``cache_salt``) are derived from. Empty: derived
    from ``engine_api_key``; with neither, a random one per process (caches start cold after a
    restart)."""
    keys_db: Path = Path("/var/lib/appliance/keys.db")
    """SQLite file holding API key hashes, limits and usage (when ``keys_url`` is empty)."""
    keys_url: str = ""
    """``postgresql://user:password@host/db`` puts keys, usage and quotas in PostgreSQL, shared
    by every appliance behind one load balancer; empty keeps them in ``keys_db``."""
    keys_pool_size: int = Field(8, ge=1)
    """PostgreSQL connections each gateway keeps, per pool (key lookups, usage writes)."""

    limits_url: str = ""
    """``redis://host:6379/0`` keeps rate-limit buckets and quota counters in Redis, shared by
    every gateway of a fleet; empty keeps them in this gateway's memory."""
    limits_pool_size: int = Field(16, ge=1)
    """Redis connections each gateway keeps."""
    limits_timeout_s: PositiveFloat = 0.25
    """The longest wait for Redis to connect or answer before a call counts as failed (see the
    README's fleet mode); waiting for a free pooled connection is not counted."""

    proxy_host: str = "127.0.0.1"
    proxy_port: int = Field(8080, ge=1, le=65535)
    """Worker ``i`` of ``proxy_workers`` listens on this port + ``i``."""
    proxy_workers: int | None = Field(None, ge=1)
    """Gateway processes, each its own core; NGINX routes each key to one of them
    (``proxy/workers.py``). Default: half the CPUs this process may use, 1 to 8."""
    proxy_keepalive_s: PositiveFloat = 75.0
    """How long an idle client connection is kept open. Above NGINX's upstream
    ``keepalive_timeout`` (60 s): the server must be the side that keeps idle connections
    longest, or a client may send into a connection the gateway is closing."""

    timeout_base_s: PositiveFloat = 30.0
    """Non-streaming deadline: this much for queueing and prefill ..."""
    timeout_per_token_s: float = Field(0.05, ge=0)
    """... plus this much per requested ``max_tokens`` (20 tokens/s, a loaded GPU's floor) ..."""
    timeout_max_s: PositiveFloat = 600.0
    """... never more than this; also the deadline when ``max_tokens`` is absent."""
    stream_first_token_timeout_s: PositiveFloat = 60.0
    """Streaming: the longest wait for the first chunk (queueing plus prefill)."""
    stream_idle_timeout_s: PositiveFloat = 30.0
    """Streaming: the longest gap between two chunks."""
    short_timeout_s: PositiveFloat = 10.0
    """Deadline for routes that generate nothing (``/v1/models``, tokenizer routes)."""
    default_max_tokens: int | None = Field(4096, ge=1)
    """Output cap set on a generation request that names none (``max_tokens``, or
    ``max_output_tokens`` on ``/v1/responses``), capped at the model's context; bounds its
    deadline and cost. The client's own value always wins. Empty: no default."""

    max_num_seqs: int = Field(256, ge=1)
    """The engine's batch size: ``appliance-engine`` passes this same variable to vLLM."""
    engine_concurrency: int | None = Field(None, ge=1)
    """Requests let into the engine at once; the rest wait in the gateway, one fair queue per
    key. Default ``max_num_seqs``, so the engine's own first-come queue stays empty."""
    max_queued_per_key: int = Field(128, ge=0)
    """Requests one key may have waiting for an engine slot; more get 429 ``too_many_requests``."""
    max_inflight: int | None = Field(None, ge=1)
    """Memory guard: requests inside the gateway at once, all keys together; more get 503.
    Default 4 x (``engine_concurrency`` + ``max_queued_per_key``); it must exceed what one key
    can hold, so no single key reaches it."""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Largest request body accepted (NGINX's ``client_max_body_size`` matches it)."""

    key_cache_ttl_s: float = Field(0.5, ge=0, le=1)
    """How long a looked-up key is trusted before the store is asked again (revocation latency)."""
    usage_flush_interval_s: PositiveFloat = 1.0
    """How often per-key usage is written to the key store."""

    batch_dir: Path = Path("/var/lib/appliance/batches")
    """Where the Files API keeps uploaded batch inputs and written batch results."""
    batch_max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    """Largest file one upload may hold (NGINX's ``client_max_body_size`` on ``/v1/files``)."""
    batch_max_stored_bytes_per_key: int = Field(2 * 1024 ** 3, ge=1024)
    """Bytes of files one key may keep stored at once (its batches' results included)."""
    batch_max_in_progress_per_key: int = Field(4, ge=1)
    """Batches one key may have unfinished at once; more get 429 ``too_many_batches``."""
    batch_max_slots: int | None = Field(None, ge=1)
    """Engine slots batch lines may hold at once, per worker's share of an engine (never more
    than the share), while no live traffic runs. Default: seven eighths of the share (one slot
    at least left free), so a batch fills an idle engine and live traffic that arrives still
    finds slots free."""
    batch_slots_beside_live: int = Field(0, ge=0)
    """Engine slots batch lines may hold while live traffic runs (a live request in the engine
    or waiting, or one ended less than a second ago). 0: none, batches run only while no live
    traffic does (each sequence in the engine's batch lengthens every step of the live ones:
    on a CPU engine one batch line beside a live request costs it half again its time to first
    token). On a GPU, where a few more sequences in a step cost little, a few slots here let
    a batch go on beside light live traffic."""
    batch_lease_s: PositiveFloat = 30.0
    """A running batch's lease in the database, renewed while it runs; a gateway that died
    leaves it to be taken over this long after its last renewal."""
    batch_poll_interval_s: PositiveFloat = 1.0
    """How often a gateway looks for a batch to run (and a new batch starts at once in the
    worker that created it)."""

    log_level: str = "info"

    @field_validator("default_max_tokens", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``APPLIANCE_DEFAULT_MAX_TOKENS=`` in the env file means no default."""
        return None if value == "" else value

    @property
    def engine_endpoints(self) -> list[str]:
        urls = [url.strip() for url in self.engine_urls.split(",") if url.strip()]
        return urls or [self.engine_url]

    @property
    def keys_location(self) -> str | Path:
        return self.keys_url or self.keys_db

    @model_validator(mode="after")
    def _fleet_stores(self) -> "ProxySettings":
        """Shared limits read quota accounts from the key store, which must be shared too."""
        if self.limits_url and not self.keys_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("APPLIANCE_LIMITS_URL shares limits between gateways; set "
                             "APPLIANCE_KEYS_URL to their shared postgresql:// key store too")
        if self.keys_url and not self.keys_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("APPLIANCE_KEYS_URL must be a postgresql:// URL (a file goes in "
                             "APPLIANCE_KEYS_DB)")
        if self.limits_url and not self.limits_url.startswith(("redis://", "rediss://")):
            raise ValueError("APPLIANCE_LIMITS_URL must be a redis:// or rediss:// URL")
        return self

    @model_validator(mode="after")
    def _size_admission(self) -> "ProxySettings":
        if self.engine_concurrency is None:
            self.engine_concurrency = self.max_num_seqs
        if self.proxy_workers is None:
            self.proxy_workers = default_worker_count(available_cpus())
        if self.proxy_workers > self.engine_concurrency:
            raise ValueError(
                f"APPLIANCE_PROXY_WORKERS ({self.proxy_workers}) must not exceed"
                f" APPLIANCE_ENGINE_CONCURRENCY ({self.engine_concurrency}): each worker needs"
                " at least one engine slot")
        if self.proxy_port + self.proxy_workers - 1 > 65535:
            raise ValueError("APPLIANCE_PROXY_PORT + APPLIANCE_PROXY_WORKERS - 1 is not a port")
        one_key = self.engine_concurrency + self.max_queued_per_key
        if self.max_inflight is None:
            self.max_inflight = 4 * one_key
        elif self.max_inflight <= one_key:
            raise ValueError(
                f"APPLIANCE_MAX_INFLIGHT ({self.max_inflight}) must exceed what one key can hold:"
                f" APPLIANCE_ENGINE_CONCURRENCY + APPLIANCE_MAX_QUEUED_PER_KEY = {one_key}")
        return self


def batch_slots(settings: ProxySettings) -> tuple[int, int]:
    """(at most, beside live traffic): the engine slots batch lines may hold in this process's
    share of an engine (a worker's settings carry its share as ``engine_concurrency``)."""
    share = settings.engine_concurrency or settings.max_num_seqs
    most = min(share, settings.batch_max_slots or max(1, share - max(1, share // 8)))
    return most, min(settings.batch_slots_beside_live, most)


def load_settings() -> ProxySettings:
    return ProxySettings(_env_file=readable_env_file())
