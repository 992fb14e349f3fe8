"""How long a request may take, from what it asks for. Pure: no I/O, no clock."""

from typing import NamedTuple, Protocol


class DeadlineSettings(Protocol):
    """The settings deadlines are made of (``ProxySettings`` has them; policy does not import
    the process's settings, which stand above it)."""

    short_timeout_s: float
    stream_first_token_timeout_s: float
    stream_idle_timeout_s: float
    timeout_base_s: float
    timeout_per_token_s: float
    timeout_max_s: float


class Deadlines(NamedTuple):
    """Seconds: a plain request has a ``total``; a stream a ``first_token`` and an ``idle``."""

    total: float | None = None
    first_token: float | None = None
    idle: float | None = None


def requested_tokens(body: dict) -> int | None:
    """The completion length asked for (``max_completion_tokens`` is chat's newer name,
    ``max_output_tokens`` the Responses API's)."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def deadlines_for(body: dict | None, generates: bool, settings: DeadlineSettings) -> Deadlines:
    """A deadline that grows with the work asked: long generations live, stuck ones are cut.

    Streams get no total: a healthy stream may run as long as it keeps producing.
    """
    if not generates:
        return Deadlines(total=settings.short_timeout_s)
    body = body or {}
    if body.get("stream") is True:
        return Deadlines(first_token=settings.stream_first_token_timeout_s,
                         idle=settings.stream_idle_timeout_s)
    tokens = requested_tokens(body)
    if tokens is None:
        return Deadlines(total=settings.timeout_max_s)
    total = settings.timeout_base_s + settings.timeout_per_token_s * tokens
    return Deadlines(total=min(total, settings.timeout_max_s))
