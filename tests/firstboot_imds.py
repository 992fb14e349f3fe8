"""A fake EC2 instance metadata service (IMDSv2): a session token first, then reads that must
carry it. The firstboot tests run it in a thread; the image test runs it as a process in the
container's network namespace.

    python -m tests.firstboot_imds --port 9169 --user-data FILE
"""

import argparse
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN = "imds-session-token"


@dataclass
class Imds:
    url: str
    user_data: str | None
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, the token header) of every request."""


@contextlib.contextmanager
def fake_imds(
    user_data: str | bytes | None,
    instance_id: str = "i-0123456789abcdef0",
    port: int = 0,
    host: str = "127.0.0.1",
) -> Iterator[Imds]:
    """PUT /latest/api/token, then GETs that must carry the token, as IMDSv2 requires."""
    state = Imds("", user_data)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code: int, body: str | bytes = "") -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self):
            state.seen.append(("PUT", self.path, None))
            if self.path == "/latest/api/token" and self.headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"
            ):
                self.reply(200, TOKEN)
            else:
                self.reply(400)

        def do_GET(self):
            state.seen.append(("GET", self.path, self.headers.get("X-aws-ec2-metadata-token")))
            if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                self.reply(401)
            elif self.path == "/latest/user-data":
                self.reply(404) if state.user_data is None else self.reply(200, state.user_data)
            elif self.path == "/latest/meta-data/instance-id":
                self.reply(200, instance_id)
            else:
                self.reply(404)

    server = ThreadingHTTPServer((host, port), Handler)
    state.url = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user-data", type=Path, required=True)
    parser.add_argument("--instance-id", default="i-0123456789abcdef0")
    args = parser.parse_args()
    with fake_imds(args.user_data.read_bytes(), args.instance_id, args.port, args.host) as imds:
        print(imds.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
