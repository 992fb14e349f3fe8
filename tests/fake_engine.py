"""A small OpenAI-compatible engine for fast proxy tests, fault injection and benchmarks.

It speaks the slice of vLLM's API the gateway relies on, cheaply (pure ASGI), and obeys a
``"fake"`` object in the request body so a test can ask for slow, stalled, failing or
crashing answers:

    {"fake": {"first_delay": 0.5, "interval": 0.01, "stall_after": 3, "crash_after": 3,
              "delay": 2.0, "status": 500}}

``GET /fake/stats`` reports what it saw: disconnects, completions, the last request's
headers and body. ``POST /fake/unhealthy`` fails its health check until ``DELETE``. It is
never the only test of a behaviour the real vLLM shows.

Run it: ``python -m tests.fake_engine --port 8000 [--api-key K] [--ready-after S]``.
"""

import argparse
import asyncio
import json
import time
from typing import Any

MODEL = "fake-model"
CONTEXT_TOKENS = 4096


class Stats:
    def __init__(self) -> None:
        self.disconnects = 0
        self.completed = 0
        self.started = 0
        self.in_progress = 0
        self.generated = 0
        """Completion tokens answered or streamed, as vLLM's generation_tokens_total counts."""
        self.last_headers: dict[str, str] = {}
        self.last_body: Any = None
        self.by_user: dict[str, int] = {}
        """Plain answers completed per request ``user``: a test counts each request it tagged."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "disconnects": self.disconnects,
            "completed": self.completed,
            "started": self.started,
            "in_progress": self.in_progress,
            "generated": self.generated,
            "last_headers": self.last_headers,
            "last_body": self.last_body,
            "by_user": self.by_user,
        }


class FakeEngine:
    def __init__(self, api_key: str = "", ready_after: float = 0.0) -> None:
        self.api_key = api_key
        self.ready_at = time.monotonic() + ready_after
        self.unhealthy = False
        self.stats = Stats()
        self.adapters: list[str] = []
        """Adapters loaded at runtime (``/fake/adapters``), listed with the model as parent."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if path == "/health":
            ready = time.monotonic() >= self.ready_at and not self.unhealthy
            await respond(send, 200 if ready else 503, {} if ready else error("loading", 503))
            return
        if path == "/fake/unhealthy":
            self.unhealthy = method == "POST"
            await respond(send, 200, {})
            return
        if path == "/fake/adapters" and method == "POST":
            self.adapters = json.loads(await read_body(receive) or b"[]")
            await respond(send, 200, {})
            return
        if path == "/fake/stats":
            await respond(send, 200, self.stats.as_dict())
            return
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            await respond(send, 401, error("Unauthorized", 401))
            return
        self.stats.last_headers = headers
        if path == "/v1/models" and method == "GET":
            await respond(send, 200, models_body(self.adapters))
            return
        body = await read_body(receive)
        try:
            request = json.loads(body) if body else {}
        except ValueError:
            await respond(send, 400, error("invalid JSON", 400))
            return
        if not isinstance(request, dict) or not isinstance(request.get("fake") or {}, dict):
            await respond(send, 400, error("the body must be a JSON object", 400))
            return
        self.stats.last_body = request
        if path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
            await self.generate(path, request, receive, send)
        elif path == "/v1/embeddings" and method == "POST":
            await respond(send, 200, embeddings_body(request))
        elif path == "/v1/messages" and method == "POST":
            await self.message(request, receive, send)
        elif path == "/v1/messages/count_tokens" and method == "POST":
            await respond(send, 200, {"input_tokens": count_prompt_tokens(request)})
        else:
            await respond(send, 404, error(f"no route {path}", 404))

    async def generate(self, path: str, request: dict, receive, send) -> None:
        fake = request.get("fake") or {}
        chat = path.endswith("chat/completions")
        if "status" in fake:
            await respond(send, fake["status"], error("injected failure", fake["status"]))
            return
        n = request.get("max_tokens") or 16
        if not isinstance(n, int) or n > CONTEXT_TOKENS:
            await respond(send, 400, error(f"max_tokens must be at most {CONTEXT_TOKENS}", 400))
            return
        prompt_tokens = count_prompt_tokens(request)
        if not request.get("stream"):
            if fake.get("delay"):
                disconnected = asyncio.ensure_future(wait_disconnect(receive))
                done, _ = await asyncio.wait({disconnected}, timeout=fake["delay"])
                if done:
                    self.stats.disconnects += 1
                    return
                disconnected.cancel()
            self.stats.completed += 1
            self.stats.generated += n
            if isinstance(request.get("user"), str):
                users = self.stats.by_user
                users[request["user"]] = users.get(request["user"], 0) + 1
            await respond(send, 200, completion_body(chat, n, prompt_tokens))
            return
        await self.stream(chat, n, prompt_tokens, request, fake, receive, send)

    async def stream(self, chat, n, prompt_tokens, request, fake, receive, send) -> None:
        stats = self.stats
        stats.started += 1
        stats.in_progress += 1
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(set_on_disconnect(receive, gone))
        options = request.get("stream_options") or {}
        include_usage = options.get("include_usage")
        # As vLLM: with continuous_usage_stats every chunk carries the running count.
        running = prompt_tokens if include_usage and options.get("continuous_usage_stats") \
            else None
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
                }
            )
            for i in range(n):
                pause = fake.get("first_delay", 0) if i == 0 else fake.get("interval", 0)
                if i == fake.get("stall_after", -1):
                    pause = 3600
                if i == fake.get("crash_after", -1):
                    raise ConnectionAbortedError("injected crash")
                if (pause and await wait_or_gone(gone, pause)) or gone.is_set():
                    stats.disconnects += 1
                    return
                event = sse(chunk_body(chat, i, running))
                await send({"type": "http.response.body", "body": event, "more_body": True})
                stats.generated += 1
            tail = sse(usage_chunk(chat, n, prompt_tokens)) if include_usage else b""
            tail += b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            stats.completed += 1
        finally:
            stats.in_progress -= 1
            watcher.cancel()


    async def message(self, request: dict, receive, send) -> None:
        """Anthropic's Messages as vLLM answers them: usage at the start and in the closing
        ``message_delta``, none on the content deltas between."""
        fake = request.get("fake") or {}
        n = request.get("max_tokens") or 16
        if not isinstance(n, int) or n > CONTEXT_TOKENS:
            await respond(send, 400, {"type": "error", "error": {
                "type": "invalid_request_error", "message": "max_tokens is out of range"}})
            return
        prompt_tokens = count_prompt_tokens(request)
        usage = {"input_tokens": prompt_tokens, "output_tokens": n}
        message = {"id": "msg-fake", "type": "message", "role": "assistant", "model": MODEL,
                   "content": [{"type": "text", "text": " ".join(f"tok{i}" for i in range(n))}],
                   "stop_reason": "max_tokens", "stop_sequence": None, "usage": usage}
        if not request.get("stream"):
            self.stats.completed += 1
            self.stats.generated += n
            await respond(send, 200, message)
            return
        stats, gone = self.stats, asyncio.Event()
        stats.started += 1
        stats.in_progress += 1
        watcher = asyncio.ensure_future(set_on_disconnect(receive, gone))
        start = {**message, "content": [], "stop_reason": None,
                 "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            head = event("message_start", {"type": "message_start", "message": start}) + event(
                "content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}})
            await send({"type": "http.response.body", "body": head, "more_body": True})
            for i in range(n):
                pause = fake.get("first_delay", 0) if i == 0 else fake.get("interval", 0)
                if (pause and await wait_or_gone(gone, pause)) or gone.is_set():
                    stats.disconnects += 1
                    return
                delta = event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                      "delta": {"type": "text_delta",
                                                                "text": f" tok{i}"}})
                await send({"type": "http.response.body", "body": delta, "more_body": True})
                stats.generated += 1
            tail = (event("content_block_stop", {"type": "content_block_stop", "index": 0})
                    + event("message_delta", {"type": "message_delta", "usage": usage,
                                              "delta": {"stop_reason": "max_tokens"}})
                    + event("message_stop", {"type": "message_stop"}))
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            stats.completed += 1
        finally:
            stats.in_progress -= 1
            watcher.cancel()


def event(name: str, payload: dict) -> bytes:
    return f"event: {name}\n".encode() + sse(payload)


async def read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def set_on_disconnect(receive, gone: asyncio.Event) -> None:
    await wait_disconnect(receive)
    gone.set()


async def wait_or_gone(gone: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(gone.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def respond(send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def error(message: str, status: int) -> dict:
    kind = "invalid_request_error" if status < 500 else "internal_server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def count_prompt_tokens(request: dict) -> int:
    if isinstance(request.get("messages"), list):
        text = " ".join(str(m.get("content", "")) for m in request["messages"]
                        if isinstance(m, dict))
    else:
        text = str(request.get("prompt", ""))
    return max(1, len(text.split()))


def models_body(adapters: list[str] = ()) -> dict:
    # As vLLM writes it, with the model's directory on the server in "root".
    entry = {"id": MODEL, "object": "model", "created": 0, "owned_by": "fake",
             "root": "/srv/models/fake-model", "parent": None, "max_model_len": CONTEXT_TOKENS}
    loaded = [{**entry, "id": name, "root": f"/srv/adapters/{name}", "parent": MODEL}
              for name in adapters]
    return {"object": "list", "data": [entry, *loaded]}


def completion_body(chat: bool, n: int, prompt_tokens: int) -> dict:
    text = " ".join(f"tok{i}" for i in range(n))
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n,
        "total_tokens": prompt_tokens + n,
    }
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                "model": MODEL, "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": text, "finish_reason": "length"}
    return {"id": "cmpl-fake", "object": "text_completion", "created": 0,
            "model": MODEL, "choices": [choice], "usage": usage}


def chunk_body(chat: bool, i: int, prompt_tokens: int | None = None) -> dict:
    """Chunk ``i``; given ``prompt_tokens``, with the running usage as vLLM's last key."""
    if chat:
        delta = {"content": f" tok{i}"} if i else {"role": "assistant", "content": "tok0"}
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                "model": MODEL, "choices": [choice]}
    else:
        choice = {"index": 0, "text": f" tok{i}", "finish_reason": None}
        body = {"id": "cmpl-fake", "object": "text_completion", "created": 0,
                "model": MODEL, "choices": [choice]}
    if prompt_tokens is not None:
        body["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + i + 1,
                         "completion_tokens": i + 1}
    return body


def usage_chunk(chat: bool, n: int, prompt_tokens: int) -> dict:
    kind = "chat.completion.chunk" if chat else "text_completion"
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
             "total_tokens": prompt_tokens + n}
    return {"id": "fake", "object": kind, "created": 0, "model": MODEL, "choices": [],
            "usage": usage}


def embeddings_body(request: dict) -> dict:
    inputs = request.get("input", "")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = [{"object": "embedding", "index": i, "embedding": [0.0, 0.5, 1.0]}
            for i, _ in enumerate(inputs)]
    tokens = sum(max(1, len(str(x).split())) for x in inputs)
    return {"object": "list", "data": data, "model": MODEL,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def main() -> None:
    global MODEL
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--model", default=MODEL, help="the served model name")
    args = parser.parse_args()
    MODEL = args.model
    app = FakeEngine(api_key=args.api_key, ready_after=args.ready_after)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                loop="uvloop", http="httptools", access_log=False)


if __name__ == "__main__":
    main()
