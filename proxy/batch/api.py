"""The Files and Batches APIs in OpenAI's shapes, so the ``openai`` SDK's ``client.files`` and
``client.batches`` work unchanged. Nothing here runs a line: a batch is checked, stored, and
left to the runner (``runner``).

Each key sees only its own files and batches: another key's id is answered 404, exactly as an
id that never existed, so ids reveal nothing.
"""

import asyncio
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

from starlette.requests import Request

from ..keys.auth import Authenticator, api_key
from ..keys.store import Key, StoreUnavailable
from ..observe.accesslog import RequestRecord
from ..protocol.errors import ProxyError, invalid
from ..protocol.routes import (
    BATCH,
    BATCH_CANCEL,
    BATCHES,
    FILE,
    FILE_CONTENT,
    FILES,
    Route,
    path_id,
    route_for,
)
from ..relay.exchange import answer_start, send_answer
from .jobs import (
    ACTIVE,
    COMPLETION_WINDOWS,
    FILE_PURPOSES,
    OUTPUT_PURPOSES,
    IllegalMove,
    advance,
    check_metadata,
    new_batch_id,
    new_file_id,
)
from .lines import BATCH_URLS, BadFile, count_lines
from .storage import Storage, batch_from_row, file_from_row

JSON = [(b"content-type", b"application/json")]
MULTIPART_SLACK = 64 * 1024
"""Room for a multipart upload's headers and boundaries beyond the file itself."""
MAX_PAGE = 10_000
ID_FORM = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""The form of every id the gateway gives (``jobs.new_file_id`` ...). Anything else names
nothing and never reaches the database: PostgreSQL answers a NUL in a string with an error."""


class TooLarge(Exception):
    pass


def not_found(kind: str, ident: str) -> ProxyError:
    return ProxyError(404, f"No such {kind}: {ident}", "not_found")


def bad_file(exc: BadFile) -> ProxyError:
    return invalid(f"The file cannot be run as a batch: {exc}", "file", "invalid_batch_file")


def page_size(query: dict[str, list[str]], default: int) -> int:
    raw = query.get("limit", [str(default)])[0]
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
        raise invalid(f"limit must be an integer from 1 to {MAX_PAGE}", "limit", "invalid_value")
    return int(raw)


def well_formed(ident: str | None) -> bool:
    return ident is not None and ID_FORM.fullmatch(ident) is not None


def page(items: list[dict], limit: int) -> dict:
    data = items[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}


class BatchApi:
    """ASGI: the Files and Batches routes of the route table (``served_by="batch"``)."""

    def __init__(self, auth: Authenticator, storage: Storage, *, max_file_bytes: int,
                 max_stored_bytes: int, max_in_progress: int,
                 started: Callable[[], None] = lambda: None) -> None:
        self.auth = auth
        self.storage = storage
        self.max_file_bytes = max_file_bytes
        self.max_stored_bytes = max_stored_bytes
        self.max_in_progress = max_in_progress
        self.started = started
        """Tells this worker's runner a batch was created, so it starts without a poll's wait."""

    async def __call__(self, scope, receive, send) -> None:
        record: RequestRecord = scope["state"]["record"]
        path, method = scope["path"], scope["method"]
        try:
            route = route_for(path)
            if route is None:
                raise ProxyError(404, f"Invalid URL ({method} {path}).", "not_found")
            if method not in route.methods:
                raise ProxyError(405, f"{method} is not allowed here.", "method_not_allowed",
                                 headers={"Allow": ", ".join(route.methods)})
            key = await self.auth.authenticate(api_key(dict(scope["headers"])))
            record.key = key.name
            status, headers, body = await self.answer(route, path_id(route, path), key, scope,
                                                      receive)
            if isinstance(body, Path):
                await self.send_file(send, record, headers, body)
                return
        except ProxyError as err:
            record.error = err.code
            status, body = err.status, err.body()
            headers = [*JSON, *((k.encode(), v.encode()) for k, v in err.headers.items())]
        except StoreUnavailable:
            record.error = "key_store_unavailable"
            status, headers = 503, [*JSON, (b"retry-after", b"1")]
            body = ProxyError(503, "The key store is unavailable; try again shortly.",
                              "key_store_unavailable").body()
        await send_answer(send, record, status, headers, body)

    async def answer(self, route: Route, ident: str | None, key: Key, scope,
                     receive) -> tuple[int, list, bytes]:
        method = scope["method"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if route is FILES:
            if method == "POST":
                return self.json(await self.upload(key, scope, receive))
            return self.json(await self.list_files(key, query))
        if route is FILE_CONTENT:
            stored = await self.own_file(key, ident)
            path = self.storage.path_of(stored.id)
            if not path.exists():
                raise ProxyError(404, f"The bytes of file {stored.id} are not on this "
                                 "appliance.", "not_found")
            return 200, [(b"content-type", b"application/octet-stream")], path
        if route is FILE:
            stored = await self.own_file(key, ident)
            if method == "DELETE":
                return self.json(await self.delete(key, stored.id))
            return self.json(stored.as_openai())
        if route is BATCHES:
            if method == "POST":
                body = await read_json(receive, 64 * 1024)
                return self.json(await self.create(key, body))
            return self.json(await self.list_batches(key, query))
        batch = await self.own_batch(key, ident)
        if route is BATCH_CANCEL:
            return self.json(await self.cancel(batch))
        assert route is BATCH
        return self.json(await self.shown(batch))

    @staticmethod
    def json(payload: dict) -> tuple[int, list, bytes]:
        return 200, JSON, json.dumps(payload).encode()

    # Files

    async def upload(self, key: Key, scope, receive) -> dict:
        limit = self.max_file_bytes + MULTIPART_SLACK
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            raise self.too_large()
        request = Request(scope, counted(receive, limit))
        try:
            form = await request.form(max_files=1, max_fields=8)
        except TooLarge:
            raise self.too_large() from None
        except Exception as exc:  # python-multipart's and Starlette's parse errors alike
            raise invalid(f"Send the file as multipart/form-data ({exc}).", "file") from None
        try:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose not in FILE_PURPOSES:
                raise invalid(f"purpose must be one of {', '.join(FILE_PURPOSES)}; this "
                              "appliance stores files for batches only", "purpose",
                              "invalid_value")
            if upload is None or isinstance(upload, str):
                raise invalid("Send the file in a multipart field named 'file'.", "file")
            filename = (upload.filename or "").replace("\x00", "")[:255] or "upload.jsonl"
            file_id = new_file_id()
            # Copied to its place and checked there, a line at a time, in a thread: a file of
            # hundreds of megabytes is never held in memory, nor blocks the loop.
            upload.file.seek(0)
            size = await asyncio.to_thread(self.storage.write_stream, file_id,
                                           iter(lambda: upload.file.read(1 << 20), b""))
        finally:
            await form.close()
        try:
            if size > self.max_file_bytes:
                raise self.too_large()
            try:
                lines = await asyncio.to_thread(count_lines, self.storage.lines_of(file_id),
                                                key.allows_model)
            except BadFile as exc:
                raise bad_file(exc) from None
            stored = await self.storage.call("stored_bytes", key.name)
            if stored + size > self.max_stored_bytes:
                raise invalid(f"Key {key.name!r} stores {stored} bytes of files; this one would "
                              f"pass its limit of {self.max_stored_bytes}. Delete files it no "
                              "longer needs.", "file", "storage_limit_exceeded")
            row = (file_id, key.name, purpose, filename, size, lines, time.time(),
                   self.storage.node)
            await self.storage.call("add_file", row)
        except BaseException:
            await asyncio.to_thread(self.storage.remove_bytes, file_id)
            raise
        return file_from_row(row).as_openai()

    def too_large(self) -> ProxyError:
        return ProxyError(413, f"A file may hold at most {self.max_file_bytes} bytes.",
                          "request_too_large")

    async def list_files(self, key: Key, query: dict[str, list[str]]) -> dict:
        limit = page_size(query, 10_000)
        purpose, after = query.get("purpose", [None])[0], query.get("after", [None])[0]
        if purpose not in (None, *FILE_PURPOSES, *OUTPUT_PURPOSES) or not (
                after is None or well_formed(after)):
            return page([], limit)
        rows = await self.storage.call("files", key.name, purpose, limit + 1, after)
        return page([file_from_row(row).as_openai() for row in rows], limit)

    async def own_file(self, key: Key, file_id: str | None):
        row = await self.storage.call("file", key.name, file_id) if well_formed(file_id) \
            else None
        if row is None:
            raise not_found("file", str(file_id))
        return file_from_row(row)

    async def send_file(self, send, record: RequestRecord, headers: list, path: Path) -> None:
        """A stored file, a megabyte at a time (results may be hundreds of megabytes)."""
        with open(path, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            await send(answer_start(record, 200, [*headers,
                                                  (b"content-length", str(size).encode())]))
            while chunk := await asyncio.to_thread(source.read, 1 << 20):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def delete(self, key: Key, file_id: str) -> dict:
        if await self.storage.call("file_in_use", file_id, ACTIVE):
            raise ProxyError(409, f"File {file_id} is the input of a batch still running; "
                             "cancel the batch first.", "file_in_use")
        if await self.storage.call("delete_file", key.name, file_id, time.time()):
            await asyncio.to_thread(self.storage.remove_bytes, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # Batches

    async def create(self, key: Key, body: dict) -> dict:
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        if endpoint not in BATCH_URLS:
            raise invalid(f"endpoint must be one of {', '.join(BATCH_URLS)}", "endpoint",
                          "invalid_value")
        if not isinstance(window, str) or window not in COMPLETION_WINDOWS:
            raise invalid(f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}",
                          "completion_window", "invalid_value")
        try:
            metadata = check_metadata(body.get("metadata"))
        except ValueError as exc:
            raise invalid(str(exc), "metadata", "invalid_value") from None
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise invalid("input_file_id must name a file", "input_file_id")
        stored = await self.own_file(key, file_id)
        if stored.purpose not in FILE_PURPOSES:
            raise invalid(f"File {file_id} was not uploaded for a batch", "input_file_id")
        running = await self.storage.call("active_count", key.name, ACTIVE)
        if running >= self.max_in_progress:
            raise ProxyError(429, f"Key {key.name!r} has {running} batches unfinished, as many "
                             "as it may; wait for one to end or cancel one.", "too_many_batches",
                             headers={"Retry-After": "60"})
        source = self.storage.lines_of(file_id)
        if source is None:
            raise ProxyError(404, f"The bytes of file {file_id} are not on this appliance.",
                             "not_found")
        try:  # again: the key's models may have changed since the upload
            lines = await asyncio.to_thread(count_lines, source, key.allows_model, endpoint)
        except BadFile as exc:
            raise bad_file(exc) from None
        now = time.time()
        row = {"id": new_batch_id(), "owner": key.name, "node": stored.node,
               "input_file_id": file_id, "endpoint": endpoint, "completion_window": window,
               "metadata": None if metadata is None else json.dumps(metadata),
               "status": "validating", "total": lines, "created_at": now,
               "expires_at": now + COMPLETION_WINDOWS[window]}
        await self.storage.call("add_batch", row)
        self.started()
        return await self.shown(await self.own_batch(key, row["id"]))

    async def list_batches(self, key: Key, query: dict[str, list[str]]) -> dict:
        limit = page_size(query, 20)
        after = query.get("after", [None])[0]
        if not (after is None or well_formed(after)):
            return page([], limit)
        rows = await self.storage.call("batches", key.name, limit + 1, after)
        return page([await self.shown(batch_from_row(row)) for row in rows], limit)

    async def own_batch(self, key: Key, batch_id: str | None):
        row = await self.storage.call("batch", batch_id, key.name) if well_formed(batch_id) \
            else None
        if row is None:
            raise not_found("batch", str(batch_id))
        return batch_from_row(row)

    async def shown(self, batch) -> dict:
        completed, failed = await self.storage.call("counts", batch.id)
        return batch.as_openai(completed, failed)

    async def cancel(self, batch) -> dict:
        """Cancelling: the runner takes no new line, lets those running finish, then writes
        what is done and marks it cancelled."""
        for _ in range(3):  # a runner may move it on between the read and the write
            if batch.status == "cancelling":
                break
            try:
                new = advance(batch.status, "cancel")
            except IllegalMove as exc:
                raise ProxyError(409, f"Cannot cancel batch {batch.id}: {exc}.",
                                 "batch_not_cancellable") from None
            if await self.storage.call("move", batch.id, batch.status, new, time.time()):
                self.started()
                break
            batch = batch_from_row(await self.storage.call("batch", batch.id))
        return await self.shown(batch_from_row(await self.storage.call("batch", batch.id)))


def counted(receive, limit: int):
    """``receive`` that raises TooLarge once more than ``limit`` body bytes have come."""
    seen = 0

    async def receive_counted():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise TooLarge
        return message

    return receive_counted


async def read_json(receive, limit: int) -> dict:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProxyError(499, "The client left.", "client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProxyError(413, f"The request body exceeds {limit} bytes.",
                             "request_too_large")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    try:
        body = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        raise invalid("The body must be JSON.") from None
    if not isinstance(body, dict):
        raise invalid("The body must be a JSON object.")
    return body
