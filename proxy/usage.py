"""Token usage as the engine reports it, from a JSON body or from a stream's events.

Streams are asked for vLLM's ``continuous_usage_stats``: every chunk then carries the running
count, so a client that hangs up mid-stream is billed for what the engine generated up to the
last chunk it was sent, not for nothing. A chunk's usage object is found and cut out by bytes
(it is flat but for one nested ``*_details`` level), so what the client gets is byte for byte
what vLLM sends a client that did not ask for it, and no chunk is parsed whole; a whole answer
is read the same way.
"""

import re
from dataclasses import dataclass

USAGE_OBJECT = re.compile(rb'"usage":\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
CHUNK_USAGE = re.compile(rb',\s*' + USAGE_OBJECT.pattern)
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


def from_json_body(content: bytes) -> TokenUsage | None:
    """A whole answer's usage (chat, completions, embeddings, the Responses API), read like a
    stream's: the last ``"usage"`` key, never inside a string (quotes there are escaped), is the
    answer's own, after its choices or output. Not parsing the whole answer saves a sizeable
    share of a small request's CPU."""
    at = content.rfind(b'"usage"')
    if at < 0:
        return None
    found = USAGE_OBJECT.match(content, at)
    return None if found is None else _usage_in(found.group(1))


def _usage_in(usage: bytes) -> TokenUsage:
    """The counts in one usage object's bytes (absent counts are 0)."""
    prompt = PROMPT_TOKENS.search(usage)
    completion = COMPLETION_TOKENS.search(usage)
    return TokenUsage(int(prompt.group(1)) if prompt else 0,
                      int(completion.group(1)) if completion else 0)


def take_usage(event: bytes, strip_running: bool) -> tuple[bytes, TokenUsage | None, bool]:
    """One SSE event's usage: the event (its running usage cut out when ``strip_running``),
    the usage found, and whether the event is the final usage-only chunk (``"choices": []``).
    """
    found = CHUNK_USAGE.search(event)
    if found is None:
        return event, None, False
    usage = _usage_in(found.group(1))
    only_usage = NO_CHOICES.search(event) is not None
    if strip_running and not only_usage:
        event = event[:found.start()] + event[found.end():]
    return event, usage, only_usage
