"""appliance-proxy: serve the gateway with uvicorn (uvloop, httptools; our own access log)."""

import argparse
import logging

import uvicorn

from . import accesslog
from .app import create_app
from .settings import load_settings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings()
    parser = argparse.ArgumentParser(prog="appliance-proxy", description=__doc__)
    parser.add_argument("--host", default=settings.proxy_host)
    parser.add_argument("--port", type=int, default=settings.proxy_port)
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    accesslog.configure(settings.log_level)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, loop="uvloop",
                http="httptools", access_log=False, log_level=settings.log_level,
                server_header=False, timeout_graceful_shutdown=30,
                timeout_keep_alive=settings.proxy_keepalive_s)


if __name__ == "__main__":
    main()
