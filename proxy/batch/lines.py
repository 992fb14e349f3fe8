"""Pure: a batch input file's lines, checked, and the output and error lines a batch writes.

An input file is JSON Lines in OpenAI's batch format, one request a line:

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Every line is checked on upload and again when a batch is created (the key's allowed models
may have changed since): a bad file is refused whole, with a 400 that names the first bad line
and why, so nothing of a batch is run that the key could not have sent live. What is checked
here is what a line must be to be run at all; what depends on the moment (rate limits, quota,
the engine) is checked as the line runs, by the gateway itself.
"""

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..protocol.routes import ROUTES

MAX_LINES = 50_000
"""OpenAI's limit on requests in one batch."""
BATCH_URLS = tuple(path for path, route in ROUTES.items()
                   if route.generates and route.api == "openai" and "/audio/" not in path)
"""Generation routes a batch line may name: JSON bodies only (audio routes are multipart)."""


class BadFile(ValueError):
    """A batch input file that cannot be run; the message names the line and the reason."""

    def __init__(self, line: int | None, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(reason if line is None else f"line {line}: {reason}")


@dataclass(frozen=True)
class Line:
    number: int
    """1-based, as an editor counts lines."""
    custom_id: str
    url: str
    body: dict


def parse_lines(data: bytes | Iterable[bytes], allows_model: Callable[[str], bool],
                endpoint: str | None = None, max_lines: int = MAX_LINES) -> list[Line]:
    """Every request line of a file, checked; BadFile for the first line that is not fit."""
    return list(each_line(data, allows_model, endpoint, max_lines))


def each_line(data: bytes | Iterable[bytes], allows_model: Callable[[str], bool],
              endpoint: str | None = None, max_lines: int = MAX_LINES) -> Iterator[Line]:
    """The request lines of a file (its bytes, or its lines as an open file gives them), one
    at a time, so a large file is never held whole; BadFile for the first line not fit.

    ``endpoint``: a batch's, which every line's ``url`` must equal (None on upload: any route
    a batch may run). Blank lines are skipped, but counted, so numbers match an editor's.
    """
    seen: dict[str, int] = {}
    raw_lines = data.split(b"\n") if isinstance(data, bytes) else data
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadFile(number, "not UTF-8 text") from None
        if not text.strip():
            continue
        line = check_line(number, text, allows_model, endpoint)
        if line.custom_id in seen:
            raise BadFile(number, f"custom_id {line.custom_id!r} repeats line "
                                  f"{seen[line.custom_id]}; each must be unique")
        seen[line.custom_id] = number
        if len(seen) > max_lines:
            raise BadFile(number, f"a batch holds at most {max_lines} requests")
        yield line
    if not seen:
        raise BadFile(None, "the file holds no requests")


def count_lines(data: bytes | Iterable[bytes], allows_model: Callable[[str], bool],
                endpoint: str | None = None) -> int:
    """How many request lines a file holds, every one checked, none kept."""
    return sum(1 for _ in each_line(data, allows_model, endpoint))


def check_line(number: int, raw: str, allows_model: Callable[[str], bool],
               endpoint: str | None) -> Line:
    try:
        request = json.loads(raw)
    except ValueError as exc:
        raise BadFile(number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(request, dict):
        raise BadFile(number, "a request line must be a JSON object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadFile(number, "custom_id must be a non-empty string")
    if request.get("method") != "POST":
        raise BadFile(number, f"method must be \"POST\", not {request.get('method')!r}")
    url = request.get("url")
    if url not in BATCH_URLS:
        raise BadFile(number, f"url {url!r} is not a route a batch may run; one of "
                              f"{', '.join(BATCH_URLS)}")
    if endpoint is not None and url != endpoint:
        raise BadFile(number, f"url {url!r} differs from the batch's endpoint {endpoint!r}")
    body = request.get("body")
    if not isinstance(body, dict):
        raise BadFile(number, "body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadFile(number, "body.model must name a model")
    if not allows_model(model):
        raise BadFile(number, f"the model {model!r} does not exist or this key may not use it")
    if body.get("stream") is True:
        raise BadFile(number, "a batch request cannot stream (body.stream must not be true)")
    return Line(number, custom_id, url, body)


def result_line(line_id: str, custom_id: str, status_code: int, request_id: str,
                body: object) -> dict:
    """A request that reached the gateway: its answer, success or error, as OpenAI writes it."""
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body},
            "error": None}


def error_line(line_id: str, custom_id: str, code: str, message: str) -> dict:
    """A request that never ran (the batch expired or was cancelled first)."""
    return {"id": line_id, "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def line_id(batch_id: str, number: int) -> str:
    """A line's id, the same whenever it is written: ``batch_req_<batch>_<line>``."""
    return f"batch_req_{batch_id.removeprefix('batch_')}_{number}"


def succeeded(status_code: int) -> bool:
    """Which file a result goes to: 2xx to the output file, the rest to the error file."""
    return 200 <= status_code < 300


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(row, separators=(",", ":")).encode() + b"\n" for row in rows)
