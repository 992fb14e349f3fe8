"""Pure: an error the engine answered -> the same error in OpenAI's shape and vocabulary.

vLLM answers errors as ``{"error": {"type": "BadRequestError", "code": 400, ...}}``, its
request validation as ``"type": "Bad Request"`` with a pydantic dump for a message, and
unknown routes as FastAPI's ``{"detail": "Not Found"}``. SDKs and agent frameworks read
OpenAI's ``type`` and ``code`` strings, so every engine error is rewritten here, keeping
the engine's message where it helps. Only error answers pass through this module.
"""

import json
import re
from http import HTTPStatus

from .errors import ProxyError

VALIDATION_ENTRY = re.compile(r"'type': '(?P<type>[^']*)', 'loc': '(?P<loc>[^']*)', "
                              r"'msg': '(?P<msg>[^']*)'")
PARAMETER_SUFFIX = re.compile(r"\(parameter=(?P<param>[\w.]+)")
CONTEXT_TOO_LONG = re.compile(r"maximum context length|context length is|exceeds the "
                              r"max(imum)? model length|longer than the maximum model length",
                              re.IGNORECASE)
MODEL_MISSING = re.compile(r"model `?[^`\s]*`? does not exist", re.IGNORECASE)
# The field that carries a request's input, per route: where a too-long input is reported.
INPUT_FIELD = {"/v1/chat/completions": "messages", "/v1/completions": "prompt",
               "/v1/responses": "input", "/v1/embeddings": "input"}
CODE_BY_STATUS = {401: "invalid_api_key", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 413: "request_too_large",
                  429: "rate_limit_exceeded", 503: "engine_unavailable", 504: "timeout"}


def engine_error(status: int, content: bytes, method: str, path: str) -> ProxyError:
    """The error the client gets for the engine's error answer."""
    message, param, code = read_engine_error(content)
    if status in (401, 403):
        # The engine refused the gateway's own internal key: the client's key is not at fault.
        return ProxyError(502, "The engine refused the gateway's credentials.",
                          "engine_auth_failed")
    if status == 404 and message in ("Not Found", ""):
        return ProxyError(404, f"Invalid URL ({method} {path}): the engine serves no such "
                          "route for this model.", "not_found")
    validation = VALIDATION_ENTRY.search(message)
    if validation is not None:
        param = _field(validation["loc"])
        message = f"Invalid '{param}': {validation['msg']}."
        code = validation_code(validation["type"])
    elif CONTEXT_TOO_LONG.search(message):
        param, code = INPUT_FIELD.get(path, param), "context_length_exceeded"
    elif status == 404 and MODEL_MISSING.search(message):
        # OpenAI's own words for it: a 404 of type invalid_request_error.
        return ProxyError(404, message, "model_not_found", "model", kind="invalid_request_error")
    else:
        suffix = PARAMETER_SUFFIX.search(message)
        if param is None and suffix is not None:
            param = suffix["param"]
        if code is None:
            code = CODE_BY_STATUS.get(status) or ("invalid_value" if param else None)
            code = code or ("internal_error" if status >= 500 else "invalid_request")
    if not message:
        message = _phrase(status)
    return ProxyError(status, message, code, param and _field(param))


STREAM_ERROR = b'data: {"error"'


def stream_errors(events: bytes) -> bytes:
    """Error events the engine writes into a stream it has begun (vLLM's own shape, its
    status in ``code``), rewritten the same way; other events are left as they are."""
    rewritten = []
    for event in events.split(b"\n\n"):
        if event.startswith(STREAM_ERROR):
            payload = event[len(b"data: "):]
            event = b"data: " + engine_error(_status_in(payload), payload, "POST", "").body()
        rewritten.append(event)
    return b"\n\n".join(rewritten)


def _status_in(payload: bytes) -> int:
    try:
        code = json.loads(payload)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return 500
    return code if isinstance(code, int) and 400 <= code < 600 else 500


def read_engine_error(content: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) from whatever error shape the engine used; code only when it
    is already a string in OpenAI's style (vLLM's are HTTP status numbers)."""
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return content.decode("utf-8", "replace").strip()[:1000], None, None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict):
        return "", None, None
    detail = body.get("detail")
    if isinstance(detail, str):
        return detail, None, None
    if isinstance(detail, list):  # FastAPI's own request validation
        entries = [d for d in detail if isinstance(d, dict)]
        text = "; ".join(f"'type': '{d.get('type')}', 'loc': "
                         f"'{'.'.join(str(x) for x in d.get('loc', ()))}', 'msg': '{d.get('msg')}'"
                         for d in entries)
        return text, None, None
    message = body.get("message")
    param = body.get("param")
    code = body.get("code")
    return (message if isinstance(message, str) else "",
            param if isinstance(param, str) and param else None,
            code if isinstance(code, str) and code and not code.isdigit() else None)


def validation_code(pydantic_type: str) -> str:
    """OpenAI's codes for a field that is missing, of the wrong type, or out of range."""
    if pydantic_type == "missing":
        return "missing_required_parameter"
    if pydantic_type.endswith(("_type", "_parsing")) or pydantic_type.startswith("is_"):
        return "invalid_type"
    return "invalid_value"


def _field(loc: str) -> str:
    return loc.removeprefix("body.")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase + "."
    except ValueError:
        return f"The engine answered {status}."

