"""Token usage as the engine reports it, from a JSON body or from a stream's usage event."""

import json
import re
from dataclasses import dataclass

# vLLM writes compact JSON; only events carrying a usage object are parsed at all.
USAGE_MARK = re.compile(rb'"usage":\s*\{')


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def from_payload(payload: object) -> TokenUsage | None:
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return TokenUsage(prompt, completion)


def from_json_body(content: bytes) -> TokenUsage | None:
    if b'"usage"' not in content:
        return None
    try:
        return from_payload(json.loads(content))
    except ValueError:
        return None


def from_sse_event(event: bytes) -> tuple[TokenUsage | None, bool]:
    """Usage in one SSE event, and whether the event is the usage-only final chunk.

    The usage-only chunk (``"choices": []``) is the one the gateway strips when it asked
    for usage on the client's behalf.
    """
    if not USAGE_MARK.search(event):
        return None, False
    data = b"".join(
        line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
    )
    try:
        payload = json.loads(data)
    except ValueError:
        return None, False
    usage = from_payload(payload)
    only_usage = usage is not None and payload.get("choices") == []
    return usage, only_usage
