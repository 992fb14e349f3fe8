"""Run the gateway's workers as children of one process, and keep them running.

systemd sees one service: ``systemctl status appliance-proxy`` lists the supervisor and its
workers in the unit's cgroup, ``restart`` stops them all (the supervisor passes SIGTERM on and
waits for each worker to drain), and a worker that dies is started again on its own port,
so NGINX's route for its keys comes back without anyone moving them to another worker.

uvicorn's own ``--workers`` cannot do this: its workers share one socket, so the kernel, not
the key, would pick the worker and every per-key limit would be multiplied by the count.

Prometheus counters of all workers are added up by prometheus-client's multiprocess mode: each
worker writes its values to memory-mapped files in one directory, and any worker's
``/metrics`` reads them all. The live board (``proxy/tenancy/liveboard.py``), through which
workers see each other's live traffic, lives there too.
"""

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .app import prepare_store
from .settings import ProxySettings
from .tenancy import liveboard

log = logging.getLogger("appliance.proxy")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
POLL_S = 0.2
RESTART_DELAY_S = 1.0
"""A worker that dies is started again after this long, so one that cannot start does not spin."""
STOP_GRACE_S = 35.0
"""Above uvicorn's own drain (30 s), below nothing: systemd's TimeoutStopSec bounds the unit."""
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A worker whose supervisor is killed outright stops too (Linux's parent-death signal)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def metrics_dir() -> tuple[Path, bool]:
    """The multiprocess directory (the operator's, emptied; else a private one) and whether it
    is ours to remove at the end."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    return Path(tempfile.mkdtemp(prefix="appliance-proxy-metrics-")), True


class Supervisor:
    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.count = settings.proxy_workers
        self.workers: list[subprocess.Popen | None] = [None] * self.count
        self.died_at: list[float] = [0.0] * self.count
        self.stopping = False

    def argv(self, index: int) -> list[str]:
        return [sys.executable, "-m", "proxy.main", "--host", self.settings.proxy_host,
                "--port", str(self.settings.proxy_port), "--worker", str(index)]

    def start(self, index: int, env: dict[str, str]) -> None:
        proc = subprocess.Popen(self.argv(index), env=env, preexec_fn=die_with_parent)
        self.workers[index] = proc
        log.info("worker %d started (pid %d, port %d)", index, proc.pid,
                 self.settings.proxy_port + index)

    def run(self) -> int:
        # The store's schema is made or upgraded once, here, not by every worker at once.
        prepare_store(self.settings)
        directory, owned = metrics_dir()
        liveboard.prepare(directory / liveboard.BOARD_FILE, self.count,
                          len(self.settings.engine_endpoints))
        env = {**os.environ, MULTIPROC_ENV: str(directory),
               "APPLIANCE_PROXY_WORKERS": str(self.count)}
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        try:
            for index in range(self.count):
                self.start(index, env)
            while not self.stopping:
                self._replace_dead(env, directory)
                time.sleep(POLL_S)
        finally:
            self._stop_all()
            if owned:
                shutil.rmtree(directory, ignore_errors=True)
        return 0

    def _stop(self, signum: int, _frame) -> None:
        self.stopping = True

    def _replace_dead(self, env: dict[str, str], directory: Path) -> None:
        from prometheus_client import multiprocess

        now = time.monotonic()
        for index, proc in enumerate(self.workers):
            if proc is not None and proc.poll() is not None:
                log.error("worker %d (pid %d) exited with %s; starting it again", index,
                          proc.pid, proc.returncode)
                multiprocess.mark_process_dead(proc.pid, str(directory))
                liveboard.clear(directory / liveboard.BOARD_FILE, index,
                                len(self.settings.engine_endpoints))
                self.workers[index] = None
                self.died_at[index] = now
            if self.workers[index] is None and now - self.died_at[index] >= RESTART_DELAY_S:
                self.start(index, env)

    def _stop_all(self) -> None:
        running = [p for p in self.workers if p is not None and p.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
