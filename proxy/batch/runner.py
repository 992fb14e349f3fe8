"""The batch runner: each gateway worker runs batches in the background, through its own
``Gateway`` at background priority, and keeps every line's result in the database as it ends.

Where it runs. In the gateway process itself (a task started in the app's lifespan), not a
process of its own: a line must take the same path as a live request (the key's allowed
models, TPM, quota reservation, usage billed to the key, deadlines, fair admission), and the
cleanest way to guarantee that is to *be* a request: each line is an in-process ASGI call into
the same ``Gateway``, with the key already known (``scope["state"]["batch_key"]``, which only
this runner sets) and its tenant marked background, so it waits in a lane below every key's
live traffic (``tenancy.admission``). No second copy of the checks exists to drift.

One batch runs in one place at a time. With several workers (or several appliances on one
PostgreSQL store) every runner polls the database and takes a batch by a lease: a row's
``lease_holder``/``lease_until``, set in one transaction only where the lease is free or ran
out, renewed every third of ``APPLIANCE_BATCH_LEASE_S`` while the batch runs. A runner that
dies (kill -9, a crash, a lost box) stops renewing, and another takes the batch over once the
lease runs out. A lease, rather than assigning batches to worker 0: workers restart on their
own, and a lease needs no coordinator. A runner takes only batches whose input file is on its
own host's disk (``node``).

Nothing lost, no result repeated. A line is done when its result row commits
(``record_results``: an INSERT under the primary key (batch, line), a no-op if the row is
there; lines that end together share a transaction, ``Saver``), and a resumed batch runs only
the lines without a row. At any moment of a kill -9:

* a line with a committed row is never run again, and its committed result is the one in the
  output: finished work is neither lost nor repeated;
* a line without a row (not started, waiting its turn, or at the engine) is run again once the
  batch is resumed: nothing is lost. A line at the engine when the gateway died is aborted
  there (vLLM cancels a request whose client vanished) and generated once, on the resume. The
  one exception is a line whose answer the engine had finished but the gateway had not yet
  saved: its generation is done twice and its output line still written once. That window is
  the answer's way back and one commit; lines that end together share the commit
  (``Saver``), so it is milliseconds, and at most ``APPLIANCE_BATCH_MAX_SLOTS`` lines are in
  it. Exactly-once at the engine would need the engine to remember request ids across a
  client's death, which vLLM does not; the e2e test counts repeats by name in vLLM's request
  log (it kills the gateway the moment it sees a line saved, when lines ending together are
  the most likely to be in flight).

A batch's status moves by compare-and-set; output and error files have ids derived from the
batch's, so finalizing twice (a kill between the file and the status) rewrites the same files.

Lines a gateway could not run (its engine away, a rate limit, a turn not given within the
line's deadline, the gateway draining) are not results: they are tried again after the wait
the answer names. Draining (spot notice, ``/drain``, shutdown) stops taking new lines, lets
running ones finish, and releases the lease: every finished line is already in the database.
A batch past its completion window expires with the lines done so far in its output, and the
lines never run in its error file (``batch_expired``).
"""

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..keys.jobs import LineResult
from ..keys.store import Key, StoreUnavailable, UnknownKey
from ..observe import accesslog
from ..observe.accesslog import RequestRecord
from ..observe.metrics import Metrics
from .jobs import ACTIVE, Batch, advance, output_file_id
from .lines import BadFile, Line, each_line, error_line, jsonl, line_id, result_line, succeeded
from .storage import Storage, batch_from_row

log = logging.getLogger("appliance.batch")
MAX_RUNNING_BATCHES = 8
"""Batches one worker runs at once; between them, fair admission shares its slots by key."""
RETRY_CODES = frozenset({"rate_limit_exceeded", "too_many_requests", "engine_unavailable",
                         "key_store_unavailable", "limits_store_unavailable"})
KEY_TTL_S = 1.0
LINES_PER_SLOT = 2
"""Lines of a batch in flight per batch slot: while one line's result is being saved, or the
line waits its background turn, another holds the engine slot (the fair queue, not this
count, bounds what reaches the engine)."""
RESULTS_PAGE = 1000
"""Result rows read from the database at a time while a batch's files are written."""


@dataclass
class Answer:
    status: int = 0
    headers: list | None = None
    body: bytes = b""


class Saver:
    """Lines' results into the database, those that end together in one transaction.

    Lines started together end together (one engine step finishes them all); saving each in a
    transaction of its own queued them behind one another, each a thread hop, while their
    answers were held only in memory. A line's ``save`` returns once its row is committed;
    rows that come while a transaction runs go in the next one. The saver has a connection of
    its own (``Storage.twin``): results never wait behind the API's reads or the runner's
    polls.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.pending: list[tuple[LineResult, asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def save(self, result: LineResult) -> None:
        saved = asyncio.get_running_loop().create_future()
        self.pending.append((result, saved))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._write())
        await saved

    async def _write(self) -> None:
        while self.pending:
            rows, self.pending = self.pending, []
            try:
                await self.storage.call("record_results", [result for result, _ in rows])
            except Exception as exc:  # each line's task reports it (``Runner._note_failure``)
                for _, saved in rows:
                    if not saved.done():
                        saved.set_exception(exc)
                continue
            for _, saved in rows:
                if not saved.done():
                    saved.set_result(None)


class Stop(Exception):
    """This runner must stop taking lines of a batch (see ``Runner.why_stop``)."""


class Runner:
    def __init__(self, storage: Storage, gateway, *, slots: int, lease_s: float,
                 poll_s: float, metrics: Metrics, draining: Callable[[], bool],
                 slots_in_use: Callable[[], int] = lambda: 0) -> None:
        self.storage = storage
        self.gateway = gateway
        """The ASGI app every line is sent to: the gateway's own request path."""
        self.slots = slots
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.metrics = metrics
        self.draining = draining
        self.slots_in_use = slots_in_use
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.running: dict[str, asyncio.Task] = {}
        self.cancelled: set[str] = set()
        self.lost: set[str] = set()
        self.stopping = False
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.keys: dict[str, tuple[Key | None, float]] = {}
        self.saver = Saver(storage.twin())

    def start(self) -> None:
        self.task = asyncio.create_task(self._poll())

    def wake(self) -> None:
        """A batch was created or cancelled here: look now rather than at the next poll."""
        self.wakeup.set()

    async def stop(self) -> None:
        """Take no new line; let those running finish; release the leases (the drain)."""
        self.stopping = True
        self.wake()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        await asyncio.gather(*self.running.values(), return_exceptions=True)
        self.saver.storage.close()

    def should_pause(self) -> bool:
        return self.stopping or self.draining()

    async def _poll(self) -> None:
        while not self.stopping:
            self.wakeup.clear()  # before looking: a wake while it looks is not lost
            try:
                await self._take_batches()
                self.metrics.batch_lines_queued.set(
                    await self.storage.call("pending_lines", self.storage.node, ACTIVE))
            except StoreUnavailable as exc:
                log.warning("batch runner: the key store failed (%s); trying again", exc)
            except Exception:
                log.exception("batch runner: unexpected failure; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), self.poll_s)

    async def _take_batches(self) -> None:
        if self.should_pause():
            return
        for batch_id in list(self.running):  # a cancel here is noticed without the next renew
            if batch_id not in self.cancelled:
                await self._note_cancel(batch_id)
        while len(self.running) < MAX_RUNNING_BATCHES:
            row = await self.storage.call("claim", self.storage.node, self.holder, time.time(),
                                          self.lease_s, ACTIVE, tuple(self.running))
            if row is None:
                return
            batch = batch_from_row(row)
            self.running[batch.id] = asyncio.create_task(self._hold(batch))

    async def _hold(self, batch: Batch) -> None:
        renewing = asyncio.create_task(self._renew(batch.id))
        try:
            await self._run(batch)
        except Stop:
            pass
        except Exception:
            log.exception("batch %s: unexpected failure; it resumes from its last line", batch.id)
        finally:
            renewing.cancel()
            with contextlib.suppress(Exception):
                if batch.id not in self.lost:
                    await self.storage.call("release", batch.id, self.holder)
            self.running.pop(batch.id, None)
            self.cancelled.discard(batch.id)
            self.lost.discard(batch.id)

    async def _renew(self, batch_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if not await self.storage.call("renew", batch_id, self.holder, time.time(),
                                               self.lease_s):
                    log.warning("batch %s: its lease was taken over; stopping here", batch_id)
                    self.lost.add(batch_id)
                    return
                await self._note_cancel(batch_id)
            except StoreUnavailable as exc:
                log.warning("batch %s: lease not renewed (%s)", batch_id, exc)

    async def _note_cancel(self, batch_id: str) -> None:
        """A cancel may come through any worker: the database says whether one came."""
        row = await self.storage.call("batch", batch_id)
        if row is not None and batch_from_row(row).status == "cancelling":
            self.cancelled.add(batch_id)

    def why_stop(self, batch: Batch) -> str | None:
        """Why no further line of ``batch`` may start now, or None."""
        if batch.id in self.lost:
            return "lost"
        if batch.id in self.cancelled:
            return "cancel"
        if time.time() >= batch.expires_at:
            return "expire"
        if self.should_pause():
            return "pause"
        return None

    # One batch

    async def _run(self, batch: Batch) -> None:
        if batch.status == "validating":
            batch = await self._move(batch, "start")
        if batch.status == "cancelling":
            await self._finalize(batch, "cancelling", "cancelled", None)
        elif batch.status == "in_progress":
            try:
                await self._run_lines(batch)
            except BadFile as exc:  # its input file is gone or damaged: nothing can run
                error = {"code": "invalid_input_file", "message": str(exc), "param": None,
                         "line": exc.line}
                await self.storage.call("move", batch.id, batch.status, "failed", time.time(),
                                        errors=[error])
                return
            why = self.why_stop(batch)
            if why == "cancel":
                await self._finalize(batch, "cancelling", "cancelled", None)
            elif why == "expire":
                await self._finalize(batch, "in_progress", "expired", "batch_expired")
            elif why is None and len(await self.storage.call("done_lines", batch.id)) == \
                    batch.total:
                batch = await self._move(batch, "all_done")
            else:
                return  # drained, taken over, or a line's result not committed: resumed later
        if batch.status == "finalizing":
            await self._finalize(batch, "finalizing", "completed", None)

    async def _move(self, batch: Batch, event: str) -> Batch:
        """One status move, or Stop when another runner or a cancel moved it first."""
        new = advance(batch.status, event)
        moved = await self.storage.call("move", batch.id, batch.status, new, time.time())
        row = await self.storage.call("batch", batch.id)
        if row is None:
            raise Stop
        batch = batch_from_row(row)
        if not moved and batch.status == "cancelling":
            self.cancelled.add(batch.id)
        elif not moved:
            raise Stop
        return batch

    def _lines(self, batch: Batch) -> Iterator[Line]:
        """The batch's lines, read from its input file as they are asked for (a large file is
        never held whole); BadFile when the file is gone or no longer what was checked."""
        source = self.storage.lines_of(batch.input_file_id)
        if source is None:
            raise BadFile(None, f"its input file {batch.input_file_id} is gone")
        return each_line(source, lambda model: True, batch.endpoint)

    async def _run_lines(self, batch: Batch) -> None:
        done = await self.storage.call("done_lines", batch.id)
        free = asyncio.Semaphore(self.slots * LINES_PER_SLOT)
        tasks: set[asyncio.Task] = set()
        try:
            for line in self._lines(batch):
                if line.number in done:
                    continue
                await free.acquire()
                if self.why_stop(batch) is not None:
                    free.release()
                    break
                task = asyncio.create_task(self._line(batch, line))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), free.release(),
                                                  self._note_failure(batch, t)))
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _note_failure(batch: Batch, task: asyncio.Task) -> None:
        """A line whose result could not be committed stays pending: it runs again when the
        batch is next taken (after this run ends)."""
        if not task.cancelled() and task.exception() is not None:
            log.error("batch %s: a line's result was not saved (%r); it will run again",
                      batch.id, task.exception())

    async def _line(self, batch: Batch, line: Line) -> None:
        """Run one line until it has a result (or the batch must stop), and commit it."""
        while True:
            key = await self._key(batch.owner)
            if key is None:
                answer = Answer(401, [], json.dumps({"error": {
                    "message": f"API key {batch.owner!r} is revoked or expired.",
                    "type": "authentication_error", "param": None,
                    "code": "invalid_api_key"}}).encode())
                record = RequestRecord(line_id(batch.id, line.number), "POST", line.url, 0.0)
            else:
                record, answer = await self._call(batch, line, key)
            retry_s = self._retry_after(record, answer)
            if retry_s is None:
                break
            if self.why_stop(batch) is not None:
                return
            await asyncio.sleep(retry_s)
        try:
            body = json.loads(answer.body)
        except ValueError:
            body = answer.body.decode("utf-8", "replace")
        result = result_line(line_id(batch.id, line.number), line.custom_id, answer.status,
                             record.request_id, body)
        await self.saver.save(LineResult(
            batch.id, line.number, line.custom_id, answer.status, jsonl([result])[:-1].decode(),
            record.prompt_tokens, record.completion_tokens, time.time()))
        self.metrics.batch_lines.labels("done" if succeeded(answer.status) else "failed").inc()

    async def _call(self, batch: Batch, line: Line, key: Key) -> tuple[RequestRecord, Answer]:
        """The line as a request into the gateway, in-process, with its key already known."""
        content = json.dumps(line.body).encode()
        record = RequestRecord(line_id(batch.id, line.number), "POST", line.url,
                               time.monotonic(), arrived=time.time())
        record.key = key.name
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": line.url,
                 "raw_path": line.url.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(content)).encode())],
                 "client": ("127.0.0.1", 0), "server": None,
                 "state": {"record": record, "batch_key": key}}
        sent = False
        never = asyncio.Event()

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": content, "more_body": False}
            await never.wait()  # the runner never hangs up on its own request
            return {"type": "http.disconnect"}

        answer = Answer()
        chunks: list[bytes] = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer.status, answer.headers = message["status"], message.get("headers", [])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        self.metrics.batch_lines_running.inc()
        try:
            await self.gateway(scope, receive, send)
        finally:
            self.metrics.batch_lines_running.dec()
            self.metrics.batch_slots_in_use.set(self.slots_in_use())
            accesslog.write(record, time.monotonic() - record.started)
        answer.body = b"".join(chunks)
        if answer.status == 0:
            answer.status = 500
        return record, answer

    def _retry_after(self, record: RequestRecord, answer: Answer) -> float | None:
        """Seconds to wait before running the line again, or None: its answer is its result.

        Retried: what says nothing of the line itself (a rate limit, the engine or a store
        away, the gateway draining), and a line whose deadline passed before it was ever let
        into the engine (it waited its background turn behind live traffic: it ran nowhere).
        """
        if answer.status == 504 and record.admitted is None:
            return self.poll_s
        if answer.status not in (429, 503) or record.error not in RETRY_CODES:
            return None
        for name, value in answer.headers or ():
            if name.lower() == b"retry-after" and value.isdigit():
                return max(self.poll_s, min(60.0, float(value)))
        return self.poll_s

    async def _key(self, name: str) -> Key | None:
        """The batch's key as the store has it now (a revoked key's batch stops being run)."""
        cached = self.keys.get(name)
        if cached is not None and time.monotonic() - cached[1] < KEY_TTL_S:
            return cached[0]
        try:
            key: Key | None = await self.storage.key(name)
        except UnknownKey:
            key = None
        if key is not None and not key.usable(time.time()):
            key = None
        self.keys[name] = (key, time.monotonic())
        return key

    async def _finalize(self, batch: Batch, old: str, new: str,
                        unrun_code: str | None) -> None:
        """Write the output and error files from the committed results, then move the status
        and name the files in one transaction. Files first: a kill between the two leaves the
        status where it was, and the next runner writes the same files again."""
        ok, failed = await self.storage.call("counts", batch.id)
        unrun = batch.total - ok - failed if unrun_code is not None else 0
        names: dict[str, str | None] = {"output": None, "errors": None}
        for kind, rows in (("output", ok), ("errors", failed + unrun)):
            if not rows:
                continue
            file_id = output_file_id(batch.id, kind == "errors")
            size, written = await asyncio.to_thread(
                self._write_results, batch, file_id, kind == "errors", unrun_code)
            await self.storage.call("add_file", (
                file_id, batch.owner, "batch_output", f"{batch.id}_{kind}.jsonl", size,
                written, time.time(), self.storage.node))
            names[kind] = file_id
        await self.storage.call("move", batch.id, old, new, time.time(),
                                output_file_id=names["output"], error_file_id=names["errors"])

    def _write_results(self, batch: Batch, file_id: str, errors: bool,
                       unrun_code: str | None) -> tuple[int, int]:
        """(bytes, lines) of one result file, written from the database a page at a time (a
        large batch's results are never held at once), then, in the error file of a batch that
        ended early, a line for each line never run. Runs in a thread."""
        written = 0

        def chunks() -> Iterator[bytes]:
            nonlocal written
            after = 0
            while page := self.storage.sync("results_page", batch.id, errors, after,
                                            RESULTS_PAGE):
                written += len(page)
                yield b"".join(result.encode() + b"\n" for _, result in page)
                after = page[-1][0]
            if errors and unrun_code is not None:
                done = self.storage.sync("done_lines", batch.id)
                with contextlib.suppress(BadFile):  # no input left: no lines to name
                    for line in self._lines(batch):
                        if line.number not in done:
                            written += 1
                            yield jsonl([error_line(
                                line_id(batch.id, line.number), line.custom_id, unrun_code,
                                "The batch ended before this request ran.")])

        return self.storage.write_stream(file_id, chunks()), written
