"""Errors the gateway itself produces, always in OpenAI's shape.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

``type`` is always one of OpenAI's own: the SDKs and agent frameworks branch on it. Errors the
engine produces are put in the same shape by ``engine_errors``.
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
# Challenge sent with every 401 (RFC 6750): the scheme the API expects.
BEARER_CHALLENGE = 'Bearer realm="inference-appliance"'


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return ERROR_TYPES.get(status, "invalid_request_error")


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

    def payload(self) -> dict:
        return error_payload(self.message, self.kind or error_type(self.status), self.param,
                             self.code)

    def body(self) -> bytes:
        return json.dumps(self.payload()).encode()

    def sse_event(self) -> bytes:
        """The same error as the final event of a stream whose headers are already sent."""
        return b"event: error\ndata: " + self.body() + b"\n\ndata: [DONE]\n\n"


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
