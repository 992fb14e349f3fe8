"""Errors the gateway itself produces, in the shape of the API the client speaks.

    OpenAI:    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
    Anthropic: {"type": "error", "error": {"type": ..., "message": ...}}

``type`` is always one of that API's own: the SDKs map it (and the status) to their exception
classes, and agent frameworks branch on it. Errors the engine produces are put in the same
shape by ``engine_errors``; which shape a route takes is the route table's ``api``.
"""

import json
from dataclasses import dataclass, field

# The ``type`` OpenAI uses for each status; any other 4xx is an invalid request, any 5xx a
# server error.
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
# Anthropic's ``type`` for each status; any other 4xx is an invalid request, any 5xx an
# ``api_error``. 503 (the engine is away) is Anthropic's "overloaded": retry shortly.
ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# Challenge sent with every 401 (RFC 6750): the scheme the API expects.
BEARER_CHALLENGE = 'Bearer realm="inference-appliance"'


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return ERROR_TYPES.get(status, "invalid_request_error")


def anthropic_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    if status in ANTHROPIC_TYPES:
        return ANTHROPIC_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_payload(message: str, kind: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ProxyError(Exception):
    """Raised anywhere below the app; turned into one JSON error response."""

    status: int
    message: str
    code: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    kind: str | None = None
    """OpenAI's ``type`` where it is not the status's usual one (``model_not_found`` is a 404
    ``invalid_request_error``)."""

    def payload(self, api: str = "openai") -> dict:
        if api == "anthropic":
            return {"type": "error",
                    "error": {"type": anthropic_type(self.status), "message": self.message}}
        return error_payload(self.message, self.kind or error_type(self.status), self.param,
                             self.code)

    def body(self, api: str = "openai") -> bytes:
        return json.dumps(self.payload(api)).encode()

    def sse_event(self, api: str = "openai") -> bytes:
        """The same error as the final event of a stream whose headers are already sent
        (Anthropic's streams end with the error event; OpenAI's with ``[DONE]`` after it)."""
        event = b"event: error\ndata: " + self.body(api) + b"\n\n"
        return event if api == "anthropic" else event + b"data: [DONE]\n\n"


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ProxyError:
    """A request the gateway refuses; ``code`` as OpenAI's: ``invalid_type`` for a field of the
    wrong type, ``invalid_value`` for one out of range, ``invalid_request`` for the rest."""
    return ProxyError(400, message, code, param)


def unauthorized(message: str) -> ProxyError:
    return ProxyError(401, message, "invalid_api_key",
                      headers={"WWW-Authenticate": BEARER_CHALLENGE})


def engine_unavailable(message: str) -> ProxyError:
    return ProxyError(503, message, "engine_unavailable", headers={"Retry-After": "5"})


def limits_unavailable() -> ProxyError:
    return ProxyError(503, "The shared limits store is unavailable, and this key has a quota; "
                      "try again shortly.", "limits_store_unavailable",
                      headers={"Retry-After": "1"})


def model_not_found(model: str) -> ProxyError:
    """OpenAI's words: the same answer whether the model is missing or only not this key's."""
    return ProxyError(404, f"The model `{model}` does not exist or you do not have access to it.",
                      "model_not_found", "model", kind="invalid_request_error")
