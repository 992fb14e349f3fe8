"""A fake EC2 instance metadata service, IMDSv2 only, for the spot watch's tests.

``PUT /latest/api/token`` (with ``X-aws-ec2-metadata-token-ttl-seconds``) hands out a token;
reads without a valid one get 401, as on EC2 with IMDSv2 required. ``spot/instance-action``
answers 404 until a test posts the notice to ``/fake/notice``; ``GET /fake/stats`` says what
was asked. Run it: ``python -m tests.fake_imds --port 8000``.
"""

import argparse
import json
import secrets
from typing import Any

ACTION = "/latest/meta-data/spot/instance-action"


class FakeImds:
    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.notice: dict | None = None
        self.stats = {"tokens": 0, "polls": 0, "refused": 0}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        if method == "PUT" and path == "/latest/api/token":
            if "x-aws-ec2-metadata-token-ttl-seconds" not in headers:
                await respond(send, 400, "missing TTL")
                return
            token = secrets.token_urlsafe(16)
            self.tokens.add(token)
            self.stats["tokens"] += 1
            await respond(send, 200, token)
        elif path == "/fake/notice" and method == "POST":
            self.notice = json.loads(body)
            await respond(send, 200, "ok")
        elif path == "/fake/stats":
            await respond(send, 200, json.dumps(self.stats))
        elif path.startswith("/latest/meta-data/"):
            if headers.get("x-aws-ec2-metadata-token") not in self.tokens:
                self.stats["refused"] += 1
                await respond(send, 401, "")
            elif path == ACTION:
                self.stats["polls"] += 1
                if self.notice is None:
                    await respond(send, 404, "Not Found")
                else:
                    await respond(send, 200, json.dumps(self.notice))
            else:
                await respond(send, 404, "Not Found")
        else:
            await respond(send, 404, "Not Found")


async def respond(send, status: int, text: Any) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(text).encode()})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(FakeImds(), host=args.host, port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
