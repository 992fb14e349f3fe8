"""Pure: the one table of the routes the gateway serves, and what differs between them.

Every request is looked up here once. What a route's ``Route`` says is all the gateway knows
of it: which methods it takes, whether it runs the model (and so waits its key's fair turn,
gets deadlines sized to its output cap, holds a quota reservation), how its cost is bounded,
how many sequences it asks the engine for, whether its prefix cache is salted per key, how
its stream reports usage, and whose error shape its answers take. A route vLLM serves that is
not in the table is refused (404 in its API's shape), never forwarded ungoverned: the next
route vLLM adds cannot become a way around a key's limits.
"""

from collections.abc import Callable
from typing import Literal, NamedTuple

Api = Literal["openai", "anthropic"]
Server = Literal["engine", "batch"]
StreamUsage = Literal["openai", "anthropic"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: object) -> int:
    return value if _is_int(value) and value > 0 else 1


def one(body: dict) -> int:
    return 1


def choices(body: dict) -> int:
    """Chat: ``n`` choices, each its own sequence in the engine's batch."""
    n = body.get("n")
    return 1 if n is None else _positive(n)


def prompt_count(prompt: object) -> int:
    """A list of strings or of token lists is several prompts; a token list is one."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return len(prompt)
    return 1


def completion_sequences(body: dict) -> int:
    """Completions: every prompt of a list, each with ``max(n, best_of)`` sequences (vLLM
    generates ``best_of`` and returns the best ``n``)."""
    per_prompt = max(_positive(body.get("n")), _positive(body.get("best_of")))
    return prompt_count(body.get("prompt")) * per_prompt


class Route(NamedTuple):
    path: str
    methods: tuple[str, ...] = ("POST",)
    generates: bool = False
    """The model runs: fair admission, deadlines from the output cap, a quota reservation."""
    api: Api = "openai"
    """Whose error shape the route's answers take (``errors.ProxyError.body``)."""
    cap_fields: tuple[str, ...] = ()
    """Where the request names its output cap, the newer name first."""
    default_completion: int | None = 0
    """Tokens one sequence may generate when no cap is named; None: to the end of the context."""
    sequences: Callable[[dict], int] = one
    """How many sequences the body asks the engine to run at once."""
    usage_on_request: bool = False
    """Streams report usage only when asked (``stream_options.include_usage``)."""
    stream_usage: StreamUsage = "openai"
    """How a stream reports usage: OpenAI's running ``usage`` or Anthropic's message events."""
    salted: bool = False
    """The prefix cache is kept apart per key: the gateway sets ``cache_salt``."""
    served_by: Server = "engine"
    """Who answers: the engine (through the gateway's steps) or the gateway's own Files and
    Batches APIs (``proxy/batch/``), which run nothing themselves."""


CHAT = Route("/v1/chat/completions", generates=True,
             cap_fields=("max_completion_tokens", "max_tokens"), default_completion=None,
             sequences=choices, usage_on_request=True, salted=True)
COMPLETIONS = Route("/v1/completions", generates=True, cap_fields=("max_tokens",),
                    default_completion=16, sequences=completion_sequences,
                    usage_on_request=True, salted=True)
RESPONSES = Route("/v1/responses", generates=True, cap_fields=("max_output_tokens",),
                  default_completion=None, salted=True)
MESSAGES = Route("/v1/messages", generates=True, api="anthropic", cap_fields=("max_tokens",),
                 default_completion=None, stream_usage="anthropic", salted=True)
COUNT_TOKENS = Route("/v1/messages/count_tokens", api="anthropic")
MODELS = Route("/v1/models", methods=("GET",))
MODEL = Route("/v1/models/{id}", methods=("GET",))
# Pooling and speech routes run the model once over their input: they wait their turn and get
# the longer deadline; their cost is bounded by the input's size alone.
POOLING = tuple(Route(path, generates=True) for path in (
    "/v1/embeddings", "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/rerank",
    "/v1/score", "/pooling", "/classify", "/score", "/rerank"))
TOKENIZERS = (Route("/tokenize"), Route("/detokenize"))
# The Files and Batches APIs: stored jobs whose lines run through the generation routes above.
FILES = Route("/v1/files", methods=("GET", "POST"), served_by="batch")
FILE = Route("/v1/files/{id}", methods=("GET", "DELETE"), served_by="batch")
FILE_CONTENT = Route("/v1/files/{id}/content", methods=("GET",), served_by="batch")
BATCHES = Route("/v1/batches", methods=("GET", "POST"), served_by="batch")
BATCH = Route("/v1/batches/{id}", methods=("GET",), served_by="batch")
BATCH_CANCEL = Route("/v1/batches/{id}/cancel", served_by="batch")
WITH_ID = (FILE, FILE_CONTENT, BATCH, BATCH_CANCEL)

ROUTES: dict[str, Route] = {r.path: r for r in (CHAT, COMPLETIONS, RESPONSES, MESSAGES,
                                                COUNT_TOKENS, MODELS, *POOLING, *TOKENIZERS,
                                                FILES, BATCHES)}
GENERATION_PATHS = frozenset(path for path, route in ROUTES.items() if route.generates)
MODEL_PREFIX = "/v1/models/"
ANTHROPIC_PREFIX = "/v1/messages"


def route_for(path: str) -> Route | None:
    """The route serving ``path``, or None: the gateway serves no such route."""
    route = ROUTES.get(path)
    if route is None and path.startswith(MODEL_PREFIX) and len(path) > len(MODEL_PREFIX):
        return MODEL
    if route is None:
        for candidate in WITH_ID:
            if path_id(candidate, path) is not None:
                return candidate
    return route


def path_id(route: Route, path: str) -> str | None:
    """The ``{id}`` of ``path`` under ``route``'s template (one segment), or None."""
    head, _, tail = route.path.partition("{id}")
    if not (path.startswith(head) and path.endswith(tail)) or len(path) <= len(head + tail):
        return None
    found = path[len(head):len(path) - len(tail)]
    return found if found and "/" not in found else None


def is_gateway_path(path: str) -> bool:
    """Paths the gateway answers (known routes, and unknown ones under ``/v1/`` with a 404 of
    the API's own shape); the rest are the appliance's own pages (health, metrics, docs)."""
    return path.startswith("/v1/") or path in ROUTES


def api_of(path: str) -> Api:
    """The error shape for a path, known or not: Anthropic's under ``/v1/messages``."""
    route = ROUTES.get(path)
    if route is not None:
        return route.api
    return "anthropic" if path.startswith(ANTHROPIC_PREFIX) else "openai"
