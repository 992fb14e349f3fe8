"""Errors the gateway itself produces, always in OpenAI's shape.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Errors the engine produces are relayed as the engine gave them, never rewritten here.
"""

import json
from dataclasses import dataclass, field

# The ``type`` OpenAI uses for each status the gateway answers with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


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
        kind = self.kind or ERROR_TYPES.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param,
                      "code": self.code}
        }

    def body(self) -> bytes:
        return json.dumps(self.payload()).encode()

    def sse_event(self) -> bytes:
        """The same error as the final event of a stream whose headers are already sent."""
        return b"event: error\ndata: " + self.body() + b"\n\ndata: [DONE]\n\n"


def invalid(message: str, param: str | None = None) -> ProxyError:
    return ProxyError(400, message, "invalid_request", param)


def unauthorized(message: str) -> ProxyError:
    return ProxyError(401, message, "invalid_api_key")


def engine_unavailable(message: str) -> ProxyError:
    return ProxyError(503, message, "engine_unavailable", headers={"Retry-After": "5"})


def model_not_found(model: str) -> ProxyError:
    """OpenAI's words: the same answer whether the model is missing or only not this key's."""
    return ProxyError(404, f"The model `{model}` does not exist or you do not have access to it.",
                      "model_not_found", "model", kind="invalid_request_error")
