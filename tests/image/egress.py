"""The build instance's way out while it is provisioned: an HTTP proxy on the host, reached from
the container's own network namespace through a Unix socket, so apt inside can fetch packages
while the container's network stays private (nothing is routed, nothing on the host changes).

    python -m tests.image.egress proxy --unix PATH          (host network namespace)
    nsenter -t PID -n python -m tests.image.egress relay --port 3128 --unix PATH
"""

import argparse
import asyncio
import contextlib


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


async def splice(a: tuple, b: tuple) -> None:
    await asyncio.gather(pipe(a[0], b[1]), pipe(b[0], a[1]))


def target(request_line: bytes) -> tuple[str, int, bool]:
    """``CONNECT host:443`` or ``GET http://host[:port]/path``: where to, and if it tunnels."""
    method, uri, _ = request_line.decode("latin-1").split(" ", 2)
    if method == "CONNECT":
        host, _, port = uri.rpartition(":")
        return host, int(port), True
    rest = uri.split("://", 1)[1]
    authority = rest.split("/", 1)[0]
    host, _, port = authority.partition(":")
    return host, int(port or 80), False


async def handle_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Absolute-form requests go through unchanged: servers must accept them (RFC 9112 3.2.2)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        host, port, tunnel = target(head.split(b"\r\n", 1)[0])
        upstream = await asyncio.open_connection(host, port)
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
        writer.close()
        return
    if tunnel:
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    else:
        upstream[1].write(head)
    await splice((reader, writer), upstream)


async def proxy(unix: str) -> None:
    server = await asyncio.start_unix_server(handle_proxy, unix)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


async def relay(port: int, unix: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await splice((reader, writer), await asyncio.open_unix_connection(unix))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["proxy", "relay"])
    parser.add_argument("--unix", required=True)
    parser.add_argument("--port", type=int, default=3128)
    args = parser.parse_args()
    asyncio.run(proxy(args.unix) if args.role == "proxy" else relay(args.port, args.unix))


if __name__ == "__main__":
    main()
