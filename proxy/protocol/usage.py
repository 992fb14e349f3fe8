"""Token usage as the engine reports it, from a JSON body or from a stream's events.

Streams are asked for vLLM's ``continuous_usage_stats``: every chunk then carries the running
count, so a client that hangs up mid-stream is billed for what the engine generated up to the
last chunk it was sent, not for nothing. A chunk's usage object is found and cut out by bytes
(it is flat but for one nested ``*_details`` level), so what the client gets is byte for byte
what vLLM sends a client that did not ask for it, and no chunk is parsed whole; a whole answer
is read the same way.
"""

import re
from typing import NamedTuple

USAGE_KEY = b'"usage"'
# Flat but for one nested level (``*_details``); unrolled, so runs of plain bytes are one step.
USAGE_OBJECT = re.compile(rb'"usage":\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')
# Chat and completions count prompt/completion tokens; the Responses API input/output tokens.
PROMPT_TOKENS = re.compile(rb'"(?:prompt|input)_tokens":\s*(\d+)')
COMPLETION_TOKENS = re.compile(rb'"(?:completion|output)_tokens":\s*(\d+)')
NO_CHOICES = re.compile(rb'"choices":\s*\[\s*\]')
# Prompt tokens served from the prefix cache: OpenAI's ``prompt_tokens_details`` (vLLM with
# --enable-prompt-tokens-details), Anthropic's ``cache_read_input_tokens``. Anthropic counts
# cached and cache-written tokens apart from ``input_tokens``; the prompt is all three.
CACHED_TOKENS = re.compile(rb'"(?:cached_tokens|cache_read_input_tokens)":\s*(\d+)')
CACHE_WRITTEN = re.compile(rb'"cache_creation_input_tokens":\s*(\d+)')
ANTHROPIC_CACHE = b'"cache_'


class TokenUsage(NamedTuple):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Of the prompt tokens, those the engine's prefix cache already held."""

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def last_usage(content: bytes) -> re.Match | None:
    """The last ``"usage": {...}`` in ``content``, found from the end (a search from the start
    tried a match at every comma of an event). Never one inside a string: quotes there are
    escaped, so only a key reads ``"usage"``; and an answer's own usage comes after its choices.
    """
    at = content.rfind(USAGE_KEY)
    return None if at < 0 else USAGE_OBJECT.match(content, at)


def from_json_body(content: bytes) -> TokenUsage | None:
    """A whole answer's usage (chat, completions, embeddings, the Responses API), read like a
    stream's, from its bytes: not parsing the whole answer saves a sizeable share of a small
    request's CPU."""
    found = last_usage(content)
    return None if found is None else usage_of(found.group(1))


def usage_of(usage: bytes) -> TokenUsage:
    """The counts in one usage object's bytes (absent counts are 0), OpenAI's or Anthropic's."""
    prompt = PROMPT_TOKENS.search(usage)
    completion = COMPLETION_TOKENS.search(usage)
    prompt_tokens = int(prompt.group(1)) if prompt else 0
    completion_tokens = int(completion.group(1)) if completion else 0
    if b"cache" not in usage:
        return TokenUsage(prompt_tokens, completion_tokens)
    cached = CACHED_TOKENS.search(usage)
    cached_tokens = int(cached.group(1)) if cached else 0
    if ANTHROPIC_CACHE in usage:
        written = CACHE_WRITTEN.search(usage)
        prompt_tokens += cached_tokens + (int(written.group(1)) if written else 0)
    return TokenUsage(prompt_tokens, completion_tokens, cached_tokens)


def take_usage(event: bytes, strip_running: bool) -> tuple[bytes, TokenUsage | None, bool]:
    """One SSE event's usage: the event (its running usage cut out when ``strip_running``),
    the usage found, and whether the event is the final usage-only chunk (``"choices": []``).
    """
    event, usage, only_usage = cut_usage(event, strip_running)
    return event, None if usage is None else usage_of(usage), only_usage


def cut_usage(event: bytes, strip_running: bool) -> tuple[bytes, bytes | None, bool]:
    """``take_usage`` with the usage object's bytes, unread: a stream reads only its last
    one (``usage_of``), reading every chunk's was a sixth of an event's CPU. The usage is a
    chunk's last key, after a comma; the cut takes the comma with it.
    """
    found = last_usage(event)
    if found is None:
        return event, None, False
    start = found.start()
    comma = event.rfind(b",", 0, start)
    if comma < 0 or (comma + 1 < start and event[comma + 1:start].strip()):
        return event, None, False
    choices = event.find(b'"choices"')
    only_usage = choices >= 0 and NO_CHOICES.match(event, choices) is not None
    if strip_running and not only_usage:
        event = event[:comma] + event[found.end():]
    return event, found.group(1), only_usage
