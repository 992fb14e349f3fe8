"""A real NGINX serving the rendered appliance site on free loopback ports (tests, benchmarks).

The site is rendered by the real appliance_ops/render_site.py with a certificate from the real
appliance_ops/tools/make-self-signed.sh, exactly as first boot does, but into a temporary
directory and with its own NGINX master (own prefix, pid file and logs).
"""

import contextlib
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.servers import ROOT, free_port, running

RENDER = ROOT / "appliance_ops" / "render_site.py"
SELF_SIGNED = ROOT / "appliance_ops" / "tools" / "make-self-signed.sh"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# The one set of security headers every response must carry (nginx/snippets/security-headers.conf).
SECURITY_HEADERS = {
    "strict-transport-security": "max-age=63072000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": (
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}


@dataclass
class Site:
    dir: Path
    http_port: int
    https_port: int
    cert: Path
    webroot: Path
    access_log: Path
    error_log: Path

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def trust(self) -> ssl.SSLContext:
        """A client context that trusts this site's self-signed certificate."""
        return ssl.create_default_context(cafile=str(self.cert))

    @property
    def conf(self) -> Path:
        return self.dir / "nginx.conf"

    @property
    def nginx_args(self) -> list[str]:
        """What `nginx -t` and `nginx -s reload` need to find this master."""
        return ["-p", str(self.dir), "-c", str(self.conf)]

    def log_entries(self) -> list[dict]:
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        return [json.loads(line) for line in lines]


def make_self_signed(cert: Path, key: Path, name: str = "localhost") -> None:
    subprocess.run([str(SELF_SIGNED), str(cert), str(key), name], check=True, capture_output=True)


def render(workdir: Path, upstream: str, **params: object) -> Site:
    """Render a standalone site under ``workdir``; ``params`` are render_site.py options."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = workdir / "tls" / "self-signed.crt", workdir / "tls" / "self-signed.key"
    if not cert.exists():
        make_self_signed(cert, key)
    http_port, https_port = free_port(), free_port()
    options: dict[str, object] = {
        "cert": cert,
        "key": key,
        "upstream": upstream,
        "listen_addr": "127.0.0.1",
        "http_port": http_port,
        "https_port": https_port,
        "webroot": workdir / "acme",
        "access_log": workdir / "logs" / "access.log",
        "error_log": workdir / "logs" / "error.log",
        "rate_per_s": 1000,
        "burst": 1000,
        "conn_per_ip": 1000,
        "workers": "1",
    } | params
    argv = [sys.executable, str(RENDER), "--out-dir", str(workdir / "site"), "--standalone"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    subprocess.run(argv, check=True, capture_output=True)
    (workdir / "acme").mkdir(exist_ok=True)
    return Site(
        workdir / "site",
        int(options["http_port"]),
        int(options["https_port"]),
        Path(str(options["cert"])),
        Path(str(options["webroot"])),
        Path(str(options["access_log"])),
        Path(str(options["error_log"])),
    )


def nginx_test(site: Site) -> subprocess.CompletedProcess:
    return subprocess.run([NGINX, *site.nginx_args, "-t"], capture_output=True, text=True)


@contextlib.contextmanager
def serving(site: Site) -> Iterator[subprocess.Popen]:
    """Run NGINX in the foreground on ``site`` until the block ends."""
    argv = [NGINX, *site.nginx_args, "-g", "daemon off;"]
    log = site.dir / "nginx.stderr"
    with running(argv, ready_url=site.http + "/", ready_ok=(301,), log=log) as proc:
        yield proc


RELOAD_SETTLED_HANDSHAKES = 10


def served_certificate(port: int, server_name: str = "localhost") -> bytes:
    """The DER leaf certificate NGINX presents on ``port`` (not verified)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def wait_for_certificate_change(
    port: int, old: bytes, server_name: str, timeout: float = 15.0
) -> bytes:
    """Poll until NGINX serves a certificate other than ``old`` on every new connection.

    A reload is asynchronous: for a moment old workers still accept connections with the old
    certificate beside the new workers, so one new answer is not yet the end of the reload.
    """
    deadline = time.monotonic() + timeout
    settled = 0
    while time.monotonic() < deadline:
        current = served_certificate(port, server_name)
        settled = settled + 1 if current != old else 0
        if settled == RELOAD_SETTLED_HANDSHAKES:
            return current
        time.sleep(0.05)
    raise TimeoutError(f"port {port} still serves the old certificate after {timeout}s")
