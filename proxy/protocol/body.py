"""The few request fields the gateway acts on, checked for type; everything else passes through.

Returns the parsed body so the forwarder can read ``stream`` and ``max_tokens``; the bytes sent
upstream stay the client's own unless the gateway must change them (``usage_requested``,
``with_output_cap``).
"""

import json

from .errors import invalid
from .routes import RESPONSES, Route

TYPE, VALUE = "invalid_type", "invalid_value"
SEQUENCE_FIELDS = ("n", "best_of")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and all(_is_int(x) for x in value)


def _valid_prompt(value: object) -> bool:
    if isinstance(value, str) or _is_token_list(value):
        return True
    return isinstance(value, list) and all(isinstance(x, str) or _is_token_list(x) for x in value)


def _valid_input_items(value: object) -> bool:
    """The Responses API's ``input``: a string, or a list of items (objects or strings)."""
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(x, dict | str) for x in value))


def parse_request(raw: bytes, route: Route | None = None) -> dict:
    """Parse a JSON request body and check the fields the gateway relies on."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    if "model" in body and not isinstance(body["model"], str):
        raise invalid("'model' must be a string.", "model", TYPE)
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(name)
        if value is not None and not _is_int(value):
            raise invalid(f"'{name}' must be a positive integer.", name, TYPE)
        if value is not None and value < 1:
            raise invalid(f"'{name}' must be a positive integer.", name, VALUE)
    for name in SEQUENCE_FIELDS:
        value = body.get(name)
        if value is not None and not _is_int(value):
            raise invalid(f"'{name}' must be a positive integer.", name, TYPE)
        if value is not None and value < 1:
            raise invalid(f"'{name}' must be a positive integer.", name, VALUE)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise invalid("'stream' must be a boolean.", "stream", TYPE)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object.", "stream_options", TYPE)
    if "messages" in body and not (
        isinstance(body["messages"], list) and all(isinstance(m, dict) for m in body["messages"])
    ):
        raise invalid("'messages' must be a list of message objects.", "messages", TYPE)
    if "prompt" in body and not _valid_prompt(body["prompt"]):
        raise invalid("'prompt' must be a string, a list of strings, or token ids.", "prompt",
                      TYPE)
    if route is RESPONSES and "input" in body and not _valid_input_items(body["input"]):
        raise invalid("'input' must be a string or a list of input items.", "input", TYPE)
    return body


def usage_requested(body: dict) -> tuple[bytes | None, bool, bool]:
    """Ask a stream for usage on every chunk, noting what the client must not see of it.

    Returns the body to send (None: the client's own bytes will do), whether to drop the final
    usage-only chunk, and whether to cut the running usage out of every other chunk.
    """
    options = body.get("stream_options") or {}
    wants_final = bool(options.get("include_usage"))
    if wants_final and options.get("continuous_usage_stats"):
        return None, False, False
    options = {**options, "include_usage": True, "continuous_usage_stats": True}
    content = json.dumps({**body, "stream_options": options}, ensure_ascii=False).encode()
    return content, not wants_final, True


def lacks_output_cap(body: dict, route: Route) -> bool:
    """A generation request that names no output cap: it may run to the end of the context,
    so neither its deadline nor its cost is bounded."""
    fields = route.cap_fields
    return bool(fields) and all(body.get(name) is None for name in fields)


def with_output_cap(body: dict, route: Route, cap: int) -> dict | None:
    """The body with an output cap of ``cap`` tokens when the client set none, else None:
    the client's own value always wins."""
    if not lacks_output_cap(body, route):
        return None
    return {**body, route.cap_fields[-1]: cap}


def output_cap(default: int, context: int | None) -> int:
    """The default cap, never above the model's context: vLLM refuses an output cap larger
    than the whole context (one that only overflows with the prompt it shortens itself)."""
    return min(default, context) if context else default


def encode(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()
