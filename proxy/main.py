"""appliance-proxy: serve the gateway with uvicorn (uvloop, httptools; our own access log).

With one worker this process serves. With more it supervises: each worker is a child process
running this same command with ``--worker INDEX`` (``proxy/supervisor.py``).
"""

import argparse
import gc
import logging
import os
from pathlib import Path

import uvicorn

from .app import create_app
from .coalesce import HttpProtocol
from .observe import accesslog
from .settings import ProxySettings, load_settings
from .supervisor import MULTIPROC_ENV, Supervisor
from .tenancy.liveboard import BOARD_FILE, LiveBoard
from .workers import ports, worker_settings


def live_board(settings: ProxySettings, worker: int | None) -> LiveBoard | None:
    """Worker ``worker``'s seat on the board its supervisor made; none for a lone gateway."""
    directory = os.environ.get(MULTIPROC_ENV)
    if worker is None or settings.proxy_workers == 1 or not directory:
        return None
    return LiveBoard(Path(directory) / BOARD_FILE, settings.proxy_workers,
                     len(settings.engine_endpoints), worker)


def serve(settings: ProxySettings, worker: int | None, siblings: tuple[int, ...] = ()) -> None:
    """uvicorn without its X-Forwarded-For rewriting (an address parse on every request): the
    only use of the client's address, the loopback check of /metrics, reads NGINX's X-Real-IP."""
    accesslog.configure(settings.log_level, worker)
    app = create_app(settings, siblings, live_board(settings, worker))
    # What start-up made (modules, FastAPI's routes, pydantic's models) lives as long as the
    # process: frozen, the collector stops walking it on every full collection. A request
    # leaves little cyclic garbage (a cancelled task, an exception's frames), so the youngest
    # generation is collected every 10,000 allocations rather than 700: a few percent of a
    # small request's CPU was the collector.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
    uvicorn.run(app, host=settings.proxy_host, port=settings.proxy_port,
                loop="uvloop", http=HttpProtocol, access_log=False, proxy_headers=False,
                log_level=settings.log_level, server_header=False,
                timeout_graceful_shutdown=30, timeout_keep_alive=settings.proxy_keepalive_s)


def main(argv: list[str] | None = None) -> None:
    settings = load_settings()
    parser = argparse.ArgumentParser(prog="appliance-proxy", description=__doc__)
    parser.add_argument("--host", default=settings.proxy_host)
    parser.add_argument("--port", type=int, default=settings.proxy_port)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--print-workers", action="store_true",
                        help="print the number of workers these settings give, and exit")
    args = parser.parse_args(argv)
    settings = settings.model_copy(update={"proxy_host": args.host, "proxy_port": args.port})
    if args.print_workers:
        print(settings.proxy_workers)
        return
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.worker is not None:
        own = worker_settings(settings, args.worker)
        siblings = tuple(p for p in ports(settings) if p != own.proxy_port)
        serve(own, args.worker, siblings)
        return
    count = settings.proxy_workers
    listening = ", ".join(f"{settings.proxy_host}:{p}" for p in ports(settings))
    print(f"appliance-proxy: {count} worker{'s' if count > 1 else ''}"
          f" (APPLIANCE_PROXY_WORKERS) on {listening};"
          f" {settings.engine_concurrency} engine slots shared among them", flush=True)
    if count == 1:
        serve(settings, None)
    else:
        raise SystemExit(Supervisor(settings).run())


if __name__ == "__main__":
    main()
