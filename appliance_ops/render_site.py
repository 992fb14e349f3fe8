#!/usr/bin/env python3
"""Render the NGINX site (nginx/appliance.conf and nginx/snippets/) into a directory.

Standard library only, so first-boot provisioning, appliance_ops/tools/enable-tls.sh and
`make run` can call it with the system python3 before any virtual environment exists.

Templates use ``${UPPER_CASE}`` placeholders; NGINX's own ``$variables`` are left alone. The
parameters used are saved next to the output (``render-params.json``) so that ``--update`` can
change one thing (the certificate, say) and keep the rest.

    render_site.py --out-dir /etc/nginx/appliance --cert ... --key ...
    render_site.py --out-dir DIR --update --server-name api.example.com
    render_site.py --out-dir DIR --standalone ...   # also DIR/nginx.conf, a main config
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import string
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

NGINX_DIR = Path(__file__).resolve().parent.parent / "nginx"
SITE_TEMPLATE = "appliance.conf"
MAIN_TEMPLATE = "standalone.conf"
SNIPPETS = "snippets"
PLAYGROUND = "playground"
PARAMS_FILE = "render-params.json"

LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){LABEL}(\.{LABEL})*$")
SIZE = re.compile(r"^[0-9]+[kKmMgG]?$")
ORIGIN = re.compile(rf"^https?://{LABEL}(\.{LABEL})*(:[0-9]{{1,5}})?$")
CORS_ENV = "APPLIANCE_CORS_ORIGINS"


class Placeholders(string.Template):
    """``${UPPER_CASE}`` only: every other ``$`` belongs to NGINX."""

    flags = re.VERBOSE  # Template's default adds IGNORECASE, which would claim ``${host}``
    pattern = r"""
        \$(?:
            (?P<escaped>(?!))|
            (?P<named>(?!))|
            \{(?P<braced>[A-Z][A-Z0-9_]*)\}|
            (?P<invalid>(?!))
        )
    """


@dataclass(frozen=True)
class SiteParams:
    """Everything that varies between a production host, `make run` and a test."""

    server_name: str = "_"
    cert: str = "/etc/appliance/tls/self-signed.crt"
    key: str = "/etc/appliance/tls/self-signed.key"
    trusted_ca: str = "/etc/ssl/certs/ca-certificates.crt"
    upstream: str = "127.0.0.1:8080"
    """The gateway's first worker; worker ``i`` listens on this port + ``i``."""
    gateway_workers: int = 1
    """The gateway's APPLIANCE_PROXY_WORKERS: one upstream server per worker."""
    listen_addr: str = ""
    http_port: int = 80
    https_port: int = 443
    webroot: str = "/var/www/appliance-acme"
    body_size: str = "16m"
    file_body_size: str = "201m"
    """``/v1/files`` uploads only: above the gateway's APPLIANCE_BATCH_MAX_FILE_BYTES (200 MB)
    and a multipart envelope, so the gateway, not NGINX, says what the limit is."""
    access_log: str = "/var/log/nginx/appliance.access.log"
    error_log: str = "/var/log/nginx/appliance.error.log"
    long_timeout_s: int = 660
    """Above the gateway's APPLIANCE_TIMEOUT_MAX_S (600) and its stream timeouts."""
    short_timeout_s: int = 15
    """Above the gateway's short-route deadline (10 s)."""
    rate_per_s: int = 50
    """Coarse, per client address: well above one client's real use, far below a flood. The
    gateway enforces the real per-key limits."""
    burst: int = 100
    conn_per_ip: int = 128
    """Concurrent requests per address (HTTP/2 streams count one each)."""
    workers: str = "auto"
    """Standalone main config only."""
    playground_dir: str = ""
    """The playground page's files; empty: the playground/ beside these templates."""
    cors_origins: str = ""
    """Browser origins allowed to call the API (``APPLIANCE_CORS_ORIGINS``), separated by
    spaces or commas, such as ``https://app.example.com``; ``*`` allows any; empty: no CORS."""


def cors_origins(params: SiteParams) -> list[str]:
    return [o for o in re.split(r"[\s,]+", params.cors_origins) if o]


def cors_origin_map(origins: list[str]) -> str:
    """The body of the Origin -> allowed-origin map: each allowed origin echoes itself."""
    if "*" in origins:
        return '    "~." $http_origin;'
    return "\n".join(f'    "{origin}" $http_origin;' for origin in origins)


def problems(params: SiteParams) -> list[str]:
    """What is wrong with ``params``, in words; empty when they can be rendered."""
    found = []
    if params.server_name != "_" and not HOSTNAME.match(params.server_name):
        found.append(f"server name {params.server_name!r} is not a host name")
    for name in ("http_port", "https_port"):
        if not 0 < getattr(params, name) < 65536:
            found.append(f"{name} {getattr(params, name)} is not a port")
    if params.http_port == params.https_port:
        found.append("http_port and https_port must differ")
    if params.listen_addr:
        try:
            ipaddress.IPv4Address(params.listen_addr)
        except ValueError:
            found.append(f"listen address {params.listen_addr!r} is not an IPv4 address")
    host, _, port = params.upstream.rpartition(":")
    if not host or not port.isdigit():
        found.append(f"upstream {params.upstream!r} is not host:port")
    elif not 1 <= params.gateway_workers <= 65536 - int(port):
        found.append(f"gateway_workers {params.gateway_workers} does not fit above port {port}")
    for name in ("body_size", "file_body_size"):
        if not SIZE.match(getattr(params, name)):
            found.append(f"{name.replace('_', ' ')} {getattr(params, name)!r} is not an NGINX "
                         "size such as 16m")
    # NGINX itself refuses burst=0.
    for name in ("long_timeout_s", "short_timeout_s", "rate_per_s", "burst", "conn_per_ip"):
        if getattr(params, name) < 1:
            found.append(f"{name} must be at least 1")
    if params.conn_per_ip > 65535:
        found.append("conn_per_ip must be at most 65535")
    for origin in cors_origins(params):
        if origin != "*" and not ORIGIN.match(origin):
            found.append(f"CORS origin {origin!r} is not scheme://host[:port] (lower case)")
    if params.short_timeout_s > params.long_timeout_s:
        found.append("short_timeout_s must not exceed long_timeout_s")
    for name in ("cert", "key", "trusted_ca", "webroot", "access_log", "error_log",
                 "playground_dir"):
        value = getattr(params, name)
        if name == "playground_dir" and not value:
            continue
        if not value.startswith("/") or re.search(r"[\s;{}'\"]", value):
            found.append(f"{name} {value!r} must be an absolute path without spaces or quotes")
    return found


def listen(addr: str, port: int) -> str:
    return f"{addr}:{port}" if addr else str(port)


def upstream_servers(params: SiteParams) -> str:
    """One ``server`` line per gateway worker, on consecutive ports."""
    host, _, port = params.upstream.rpartition(":")
    return "\n".join(f"    server {host}:{int(port) + i} max_fails=0;"
                     for i in range(params.gateway_workers))


def values(params: SiteParams, out_dir: Path) -> dict[str, str]:
    """The placeholder values for ``params`` rendered into ``out_dir``."""
    return {
        "SERVER_NAME": params.server_name,
        "REDIRECT_HOST": "$host" if params.server_name == "_" else params.server_name,
        "HTTPS_PORT_SUFFIX": "" if params.https_port == 443 else f":{params.https_port}",
        "HTTP_LISTEN": listen(params.listen_addr, params.http_port),
        "HTTPS_LISTEN": listen(params.listen_addr, params.https_port),
        "CERT": params.cert,
        "KEY": params.key,
        "TRUSTED_CA": params.trusted_ca,
        "UPSTREAM_SERVERS": upstream_servers(params),
        "WEBROOT": params.webroot,
        "BODY_SIZE": params.body_size,
        "FILE_BODY_SIZE": params.file_body_size,
        "ACCESS_LOG": params.access_log,
        "ERROR_LOG": params.error_log,
        "LONG_TIMEOUT_S": str(params.long_timeout_s),
        "SHORT_TIMEOUT_S": str(params.short_timeout_s),
        "RATE_PER_S": str(params.rate_per_s),
        "BURST": str(params.burst),
        "CONN_PER_IP": str(params.conn_per_ip),
        "WORKERS": params.workers,
        "PLAYGROUND_DIR": params.playground_dir or str(NGINX_DIR / PLAYGROUND),
        "CORS_ORIGIN_MAP": cors_origin_map(cors_origins(params)),
        "CORS_VARY": "Origin" if cors_origins(params) else "",
        "SNIPPETS_DIR": str(out_dir / SNIPPETS),
        "SITE": str(out_dir / SITE_TEMPLATE),
        "PREFIX": str(out_dir),
        # Workers of a root master would run as nobody, who cannot read private temp dirs.
        "USER_DIRECTIVE": "user root;" if os.geteuid() == 0 else "",
    }


def render_text(template: str, mapping: dict[str, str]) -> str:
    """Fill ``template``; an unknown placeholder is an error, not an empty string."""
    return Placeholders(template).substitute(mapping)


def rendered_files(
    params: SiteParams, out_dir: Path, standalone: bool, templates: Path = NGINX_DIR
) -> dict[Path, str]:
    """Output path -> rendered text, without touching the output directory."""
    mapping = values(params, out_dir)
    names = [SITE_TEMPLATE] + [
        f"{SNIPPETS}/{p.name}" for p in sorted((templates / SNIPPETS).glob("*.conf"))
    ]
    if standalone:
        names.append(MAIN_TEMPLATE)
    out = {}
    for name in names:
        target = out_dir / ("nginx.conf" if name == MAIN_TEMPLATE else name)
        out[target] = render_text((templates / name).read_text(), mapping)
    return out


def write_atomically(path: Path, text: str) -> None:
    """A reloading NGINX never reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def render_site(params: SiteParams, out_dir: Path, standalone: bool = False) -> list[Path]:
    out_dir = out_dir.resolve()
    files = rendered_files(params, out_dir, standalone)
    if standalone:
        (out_dir / "tmp").mkdir(parents=True, exist_ok=True)
        for log in (params.access_log, params.error_log):
            Path(log).parent.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        write_atomically(path, text)
    write_atomically(out_dir / PARAMS_FILE, json.dumps(dataclasses.asdict(params), indent=2) + "\n")
    return list(files)


def load_params(out_dir: Path) -> SiteParams:
    saved = json.loads((out_dir / PARAMS_FILE).read_text())
    known = {f.name for f in fields(SiteParams)}
    return SiteParams(**{k: v for k, v in saved.items() if k in known})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument(
        "--update",
        action="store_true",
        help=f"start from the parameters saved in OUT_DIR/{PARAMS_FILE}",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="also write OUT_DIR/nginx.conf, a main config for its own master",
    )
    parser.add_argument(
        "--show", metavar="PARAM", help="print one saved parameter of OUT_DIR and exit"
    )
    for field in fields(SiteParams):
        kind = int if field.type in (int, "int") else str
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=kind,
            default=None,
            help=f"default: {field.default}",
        )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.show or args.update) and not (args.out_dir / PARAMS_FILE).exists():
        print(f"render_site: nothing rendered in {args.out_dir} yet", file=sys.stderr)
        return 2
    if args.show:
        print(getattr(load_params(args.out_dir), args.show.replace("-", "_")))
        return 0
    base = load_params(args.out_dir) if args.update else SiteParams()
    given = {
        f.name: getattr(args, f.name)
        for f in fields(SiteParams)
        if getattr(args, f.name) is not None
    }
    if "cors_origins" not in given and CORS_ENV in os.environ:
        given["cors_origins"] = os.environ[CORS_ENV]
    params = dataclasses.replace(base, **given)
    wrong = problems(params)
    if wrong:
        for line in wrong:
            print(f"render_site: {line}", file=sys.stderr)
        return 2
    for path in render_site(params, args.out_dir, standalone=args.standalone):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
