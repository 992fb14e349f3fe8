"""Per-key usage, added up in memory and written to the key store once a second.

Writing each request's usage inline would put a disk write on every request's path. Totals
that the store refuses (locked, disk full) stay in memory and are retried: serving continues,
and a metric and a log line report what is not yet saved.
"""

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

from ..keys.store import KeyStore, StoreUnavailable
from ..observe.metrics import Metrics

log = logging.getLogger("appliance.proxy")


class Ledger:
    def __init__(self, open_store: Callable[[], KeyStore], interval_s: float,
                 metrics: Metrics) -> None:
        self.open_store = open_store
        self.interval_s = interval_s
        self.metrics = metrics
        self.pending: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        self.store: KeyStore | None = None
        self.task: asyncio.Task | None = None
        self.failing = False

    def record(self, name: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._add(name, 1, prompt_tokens, completion_tokens)

    def _add(self, name: str, requests: int, prompt_tokens: int, completion_tokens: int) -> None:
        row = self.pending[name]
        row[0] += requests
        row[1] += prompt_tokens
        row[2] += completion_tokens

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Write what is left; nothing recorded is dropped on a clean shutdown."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.flush()
        if self.store is not None:
            self.store.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, defaultdict(lambda: [0, 0, 0])
        rows = [(name, *totals) for name, totals in batch.items()]
        try:
            await asyncio.to_thread(self._write, rows)
        except (StoreUnavailable, OSError) as exc:
            for row in rows:
                self._add(*row)
            self.metrics.usage_write_failures.inc()
            if not self.failing:
                log.error("usage not saved, kept in memory and retried: %s", exc)
            self.failing = True
        else:
            if self.failing:
                log.warning("usage saved again after earlier failures")
            self.failing = False
        self.metrics.usage_unsaved.set(sum(r[0] for r in self.pending.values()))

    def _write(self, rows: list[tuple[str, int, int, int]]) -> None:
        if self.store is None or not self.store.still_there():
            if self.store is not None:
                self.store.close()
            self.store = self.open_store()
        self.store.add_usage(rows)
