"""The key store: API keys, their limits and their usage. What a key is, and one interface.

Two backends implement ``KeyStore``, each the only SQL of its kind: ``sqlite`` (one file,
the single-box default) and ``postgres`` (several appliances behind one load balancer
share it). ``backends.open_store`` picks one from ``APPLIANCE_KEYS_URL`` or the file path.

Only a SHA-256 hash of each secret is stored: secrets are 256 random bits, so a fast hash is
as safe as a slow one and keeps lookups cheap. Both schemas grow by numbered steps that only
add columns and tables, so older code still reads a newer store (a rollback keeps working).
"""

import datetime
import hashlib
import json
import math
import re
import secrets
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .jobs import JobTables

SECRET_PREFIX = "sk-app-"
PERIODS = ("day", "month")
SETTINGS = ("rpm", "tpm", "expires_days", "max_concurrent", "weight", "models", "quota_tokens",
            "quota_period", "cache_group")
KEY_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,64}")


class StoreUnavailable(Exception):
    """The store cannot answer (missing, locked, unreadable): callers fail closed."""


class KeyExists(Exception):
    pass


class UnknownKey(Exception):
    pass


@dataclass(frozen=True)
class Key:
    """One key's record. ``None`` in a limit means no limit; ``models`` None means every model."""

    name: str
    hint: str
    rpm: int | None
    tpm: int | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    max_concurrent: int | None = None
    weight: float = 1.0
    models: frozenset[str] | None = None
    quota_tokens: int | None = None
    quota_period: str = "month"
    cache_group: str | None = None
    """Keys of one group share the engine's prefix cache; None: this key's cache is its own."""

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class Usage:
    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class KeyReport:
    """A key's settings, its usage since it was made, and its tokens in the current period."""

    key: Key
    total: Usage
    period: str
    period_tokens: int

    @property
    def quota_left(self) -> int | None:
        if self.key.quota_tokens is None:
            return None
        return max(0, self.key.quota_tokens - self.period_tokens)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def period_start(period: str, now: float) -> datetime.datetime:
    """The start of the UTC calendar day or month that ``now`` falls in."""
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if period == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"quota period must be one of {', '.join(PERIODS)}, not {period!r}")


def period_label(period: str, now: float) -> str:
    """The name of the period ``now`` falls in: '2026-11-24' for a day, '2026-11' for a month."""
    return period_start(period, now).strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


def period_end(period: str, now: float) -> float:
    """Epoch seconds when the period ``now`` falls in ends: when a spent quota comes back."""
    start = period_start(period, now)
    if period == "day":
        return (start + datetime.timedelta(days=1)).timestamp()
    year, month = divmod(start.month, 12)
    return start.replace(year=start.year + year, month=month + 1).timestamp()


def _count(option: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, not {value!r}")
    return value


def _positive(option: str, value: object) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{option} must be a number greater than 0, not {value!r}")
    return float(value)


def _models(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Collection):
        raise ValueError(f"models must be a collection of model names, not {value!r}")
    names = set(value)
    if not names:
        raise ValueError("models must name at least one model (None means every model)")
    for name in names:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"a model name must be non-empty text without surrounding "
                             f"spaces, not {name!r}")
    return json.dumps(sorted(names))


def _period(value: object) -> str:
    if value not in PERIODS:
        raise ValueError(f"quota period must be one of {', '.join(PERIODS)}, not {value!r}")
    return str(value)


def setting_columns(changes: Mapping[str, object], now: float) -> dict[str, object]:
    """Validated settings -> the ``keys`` columns they set; ValueError names what is wrong.

    None clears a limit (weight and quota_period always have a value). ``expires_days``
    counts from ``now``: on ``update`` it renews a key from today.
    """
    columns: dict[str, object] = {}
    for option, value in changes.items():
        if option in ("rpm", "tpm", "max_concurrent", "quota_tokens"):
            columns[option] = _count(option, value)
        elif option == "expires_days":
            columns["expires_at"] = (None if value is None
                                     else now + 86400 * _positive(option, value))
        elif option == "weight":
            columns["weight"] = _positive(option, value)
        elif option == "models":
            columns["models"] = _models(value)
        elif option == "quota_period":
            columns["quota_period"] = _period(value)
        elif option == "cache_group":
            columns["cache_group"] = None if value is None else check_group_name(value)
        else:
            raise ValueError(f"unknown key setting {option!r}; known: {', '.join(SETTINGS)}")
    return columns


def check_key_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name):
        raise ValueError(f"a key name is 1 to 64 characters without spaces, not {name!r}")
    return name


def check_group_name(name: object) -> str:
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
        raise ValueError(f"a cache group is 1 to 64 characters without spaces, not {name!r}")
    return name


KEY_FIELDS = ("name", "hint", "rpm", "tpm", "created_at", "expires_at", "revoked_at",
              "max_concurrent", "weight", "models", "quota_tokens", "quota_period",
              "cache_group")
KEY_COLUMNS = ", ".join(KEY_FIELDS)
CACHE_GROUP_COLUMN = "cache_group text"
"""Added by each backend's schema step 3 (SQLite) / 2 (PostgreSQL): only adds a column."""


def key_from_row(row: Iterable) -> Key:
    """A ``KEY_FIELDS`` row, as either backend returns it, -> Key."""
    *head, models, quota_tokens, quota_period, cache_group = row
    allowed = None if models is None else frozenset(json.loads(models))
    return Key(*head, models=allowed, quota_tokens=quota_tokens, quota_period=quota_period,
               cache_group=cache_group)


def report_from_row(row: tuple, day: str, month: str) -> KeyReport:
    """``KEY_FIELDS`` + (requests, prompt, completion, period tokens) -> KeyReport."""
    key = key_from_row(row[:len(KEY_FIELDS)])
    requests, prompt, completion, period_tokens = row[len(KEY_FIELDS):]
    return KeyReport(key, Usage(key.name, requests, prompt, completion),
                     day if key.quota_period == "day" else month, period_tokens)


def reports_query(name: str | None, now: float, mark: str) -> tuple[str, tuple, str, str]:
    """The one query behind ``reports`` for both backends (``mark``: the driver's placeholder),
    its arguments, and the day and month it reads quota use for."""
    day, month = period_label("day", now), period_label("month", now)
    query = (
        f"SELECT {', '.join('k.' + field for field in KEY_FIELDS)},"
        " COALESCE(u.requests, 0), COALESCE(u.prompt_tokens, 0),"
        " COALESCE(u.completion_tokens, 0),"
        " COALESCE(p.prompt_tokens + p.completion_tokens, 0)"
        " FROM keys k LEFT JOIN usage u ON u.name = k.name"
        " LEFT JOIN period_usage p ON p.name = k.name"
        f" AND p.period = CASE k.quota_period WHEN 'day' THEN {mark} ELSE {mark} END"
    )
    args: tuple = (day, month)
    if name is not None:
        query += f" WHERE k.name = {mark}"
        args = (*args, name)
    return query + " ORDER BY k.created_at", args, day, month


class KeyStore(Protocol):
    """What the gateway and ``appliance-keys`` ask of a key store, whichever backend holds it.

    Every method blocks (the gateway runs them in threads); a store that cannot answer raises
    StoreUnavailable, and callers fail closed.
    """

    def close(self) -> None: ...

    def jobs(self) -> "JobTables":
        """The Batches API's tables in the same database (``jobs``)."""
        ...

    def still_there(self) -> bool:
        """False once the store went away under the open handle (reopen it)."""
        ...

    def create(self, name: str, rpm: int | None = None, tpm: int | None = None,
               expires_days: float | None = None, **settings: object) -> str: ...

    def update(self, name: str, **changes: object) -> Key: ...

    def revoke(self, name: str) -> None: ...

    def get(self, name: str) -> Key: ...

    def all_keys(self) -> list[Key]: ...

    def lookup(self, secret: str) -> Key | None: ...

    def add_usage(self, totals: Iterable[tuple[str, int, int, int]]) -> None: ...

    def period_usage(self, name: str, period: str) -> int: ...

    def usage(self, name: str | None = None) -> list[Usage]: ...

    def report(self, name: str, now: float | None = None) -> KeyReport: ...

    def reports(self, name: str | None = None, now: float | None = None) -> list[KeyReport]: ...
