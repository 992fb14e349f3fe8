"""Token usage as the engine reports it, from a JSON body or from a stream's events.

Streams are asked for vLLM's ``continuous_usage_stats``: every chunk then carries the running
count, so a client that hangs up mid-stream is billed for what the engine generated up to the
last chunk it was sent, not for nothing. A chunk's usage object is found and cut out by bytes
(it is flat but for one nested ``*_details`` level), so what the client gets is byte for byte
what vLLM sends a client that did not ask for it, and no chunk is parsed whole.
"""

import json
import re
from dataclasses import dataclass

CHUNK_USAGE = re.compile(rb',\s*"usage":\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
# Chat and completions count prompt/completion tokens; the Responses API input/output tokens.
PROMPT_TOKENS = re.compile(rb'"(?:prompt|input)_tokens":\s*(\d+)')
COMPLETION_TOKENS = re.compile(rb'"(?:completion|output)_tokens":\s*(\d+)')
NO_CHOICES = re.compile(rb'"choices":\s*\[\s*\]')


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def from_payload(payload: object) -> TokenUsage | None:
    """Usage in a chat or completion answer, or in a Responses API answer or event (there the
    response sits under ``response`` in events and counts ``input``/``output`` tokens)."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict) and isinstance(payload.get("response"), dict):
        usage = payload["response"].get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    completion = usage.get("completion_tokens") or usage.get("output_tokens") or 0
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


def _count(pattern: re.Pattern, usage: bytes) -> int:
    found = pattern.search(usage)
    return int(found.group(1)) if found else 0


def take_running_usage(events: bytes, strip: bool) -> tuple[bytes, TokenUsage | None]:
    """Several events' running counts at once, none of them the final usage-only chunk: the
    last count is the stream's so far, and every count is cut out when ``strip``. Two passes
    over the bytes instead of a loop over the events: this is on every chunk of every stream."""
    counts = CHUNK_USAGE.findall(events)
    if not counts:
        return events, None
    usage = TokenUsage(_count(PROMPT_TOKENS, counts[-1]), _count(COMPLETION_TOKENS, counts[-1]))
    return (CHUNK_USAGE.sub(b"", events) if strip else events), usage


def take_usage(event: bytes, strip_running: bool) -> tuple[bytes, TokenUsage | None, bool]:
    """One SSE event's usage: the event (its running usage cut out when ``strip_running``),
    the usage found, and whether the event is the final usage-only chunk (``"choices": []``).
    """
    found = CHUNK_USAGE.search(event)
    if found is None:
        return event, None, False
    usage_bytes = found.group(1)
    usage = TokenUsage(_count(PROMPT_TOKENS, usage_bytes), _count(COMPLETION_TOKENS, usage_bytes))
    only_usage = NO_CHOICES.search(event) is not None
    if strip_running and not only_usage:
        event = event[:found.start()] + event[found.end():]
    return event, usage, only_usage
