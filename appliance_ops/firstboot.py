#!/usr/bin/env python3
"""First boot of an appliance instance: settings from EC2 user data, a certificate, a first key.

appliance-firstboot.service runs this once per instance, before the engine, the proxy and NGINX
start. It is safe to run again by hand (``sudo appliance-firstboot``): settings the user data
names are applied again, every other line of the env file is kept, secrets that exist are never
regenerated, and the certificate and the admin key are made only when missing.

At boot the work is split in two: ``--skip-tls`` (appliance-firstboot.service) runs before NGINX,
and ``--tls-only`` (appliance-firstboot-tls.service) asks Let's Encrypt once NGINX serves the
ACME challenge. By hand, with neither option, it does both.

User data is plain ``KEY=VALUE`` lines (``#`` comments, optional ``export``, shell-style quotes):
``APPLIANCE_*`` settings, plus ``DOMAIN`` and ``EMAIL`` to ask Let's Encrypt for a certificate.
Values are never logged, only the names of the settings taken. A models file may follow the
settings: from the first line that opens a TOML table (``[[models]]``) on, the user data is
written to ``/etc/appliance/models.toml``. With a models file, first boot fetches its models,
asks ``appliance-engine --list-replicas`` for the plan's replicas, enables one
``appliance-engine@N`` unit a replica (and no single ``appliance-engine``), and gives the
gateway their addresses (``APPLIANCE_ENGINE_URLS``). Run again by hand after editing the file,
it re-plans; restart ``appliance-proxy`` then, so the gateway routes to the new replicas.

Standard library only: it runs with the system's Python, before anything else is configured.
Every path and command is an option (defaults from ``APPLIANCE_FIRSTBOOT_*`` variables), so the
tests run it against a fake metadata service in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import ipaddress
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

IMDS_URL = "http://169.254.169.254"
OPS_DIR = "/usr/local/lib/appliance/appliance_ops"
VENV_BIN = "/usr/local/lib/appliance/venv/bin"
ENGINE_TARGETS = ("/etc/prometheus/appliance-engines.json,"
                  "/opt/aws/amazon-cloudwatch-agent/etc/appliance-engines.json")
"""Where Prometheus and the CloudWatch agent (``observability/``) read the engines to scrape."""
TOKEN_TTL_S = 300
SETTING_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# What a user-data line may set; DOMAIN and EMAIL are stored under the APPLIANCE_ prefix.
ALIASES = {"DOMAIN": "APPLIANCE_DOMAIN", "EMAIL": "APPLIANCE_EMAIL"}
# Generated once per instance and kept across re-runs.
GENERATED = ("APPLIANCE_ENGINE_API_KEY",)
BARE_VALUE = re.compile(r"^[A-Za-z0-9_./:@,+=%-]*$")
# Where the engine's unit keeps its caches: a models file's models are fetched at first boot
# (the plan reads their shapes) into the same places the engines read them from.
ENGINE_FETCH_ENV = {"HOME": "/var/lib/appliance", "XDG_CACHE_HOME": "/var/cache/appliance",
                    "HF_HOME": "/var/cache/appliance/huggingface"}


def log(message: str) -> None:
    print(f"appliance-firstboot: {message}", file=sys.stderr, flush=True)


# --- pure policy -------------------------------------------------------------------------------


@dataclass
class UserData:
    settings: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    """Names (never values) of lines that were not taken, and why."""


def parse_user_data(text: str) -> UserData:
    """The appliance settings in user data; anything else is ignored and reported by name."""
    result = UserData()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not SETTING_NAME.match(name):
            result.ignored.append(f"line {number}: not KEY=VALUE")
            continue
        name = ALIASES.get(name, name)
        if not name.startswith("APPLIANCE_"):
            result.ignored.append(f"{name}: not an APPLIANCE_* setting")
            continue
        try:
            words = shlex.split(value, comments=True)
        except ValueError:
            result.ignored.append(f"{name}: unbalanced quotes")
            continue
        result.settings[name] = " ".join(words)
    return result


def split_user_data(text: str) -> tuple[str, str | None]:
    """The settings lines, and the models file that follows them (None when there is none)."""
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if line.lstrip().startswith("["):
            return "".join(lines[:number]), "".join(lines[number:])
    return text, None


@dataclass(frozen=True)
class Replica:
    """One engine of the models file's plan: ``appliance-engine --list-replicas``'s line."""

    index: int
    model: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def parse_replicas(listing: str) -> list[Replica]:
    """``appliance-engine --list-replicas``'s 'INDEX MODEL PORT' lines."""
    replicas = []
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) != 3 or not fields[0].isdigit() or not fields[2].isdigit():
            raise ValueError(f"not a replica line: {line!r}")
        replicas.append(Replica(int(fields[0]), fields[1], int(fields[2])))
    return replicas


def engine_targets(replicas: list[Replica], single_port: str) -> str:
    """Prometheus's file_sd list of the engines to scrape: each replica, labelled with its
    index and model, or the single engine when there is no models file."""
    if not replicas:
        groups = [{"targets": [f"127.0.0.1:{single_port}"]}]
    else:
        groups = [{"targets": [f"127.0.0.1:{r.port}"],
                   "labels": {"replica": str(r.index), "model": r.model}} for r in replicas]
    return json.dumps(groups, indent=2) + "\n"


def parse_env_file(text: str) -> dict[str, str]:
    """An env file this script wrote (or an operator edited in the same syntax)."""
    return parse_user_data(text).settings


def merge_settings(
    defaults: Mapping[str, str],
    existing: Mapping[str, str],
    user: Mapping[str, str],
    generated: Mapping[str, str],
) -> dict[str, str]:
    """User data wins for what it names, the file keeps the rest, the image's defaults and
    generated secrets fill the gaps (a secret, once written, is never replaced)."""
    merged = {**defaults, **existing, **user}
    for name, value in generated.items():
        if not merged.get(name):
            merged[name] = value
    return merged


def quote_value(value: str) -> str:
    """A value both systemd's EnvironmentFile and python-dotenv read back unchanged."""
    if "\n" in value or "\r" in value:
        raise ValueError("a setting cannot span lines")
    if BARE_VALUE.match(value):
        return value
    if "'" not in value and "\\" not in value:
        return f"'{value}'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def render_env(settings: Mapping[str, str]) -> str:
    lines = [
        "# Written by appliance-firstboot from EC2 user data; edit and restart the services.",
        "# Re-running appliance-firstboot keeps lines the user data does not name.",
    ]
    lines += [f"{name}={quote_value(value)}" for name, value in sorted(settings.items())]
    return "\n".join(lines) + "\n"


def wants_public_tls(settings: Mapping[str, str]) -> bool:
    return bool(settings.get("APPLIANCE_DOMAIN") and settings.get("APPLIANCE_EMAIL"))


# --- edges -------------------------------------------------------------------------------------


class Imds:
    """EC2's instance metadata service, version 2 (a session token on every read)."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._token: str | None = None

    def _token_header(self) -> dict[str, str]:
        if self._token is None:
            request = urllib.request.Request(
                f"{self.base_url}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                self._token = response.read().decode().strip()
        return {"X-aws-ec2-metadata-token": self._token}

    def get(self, path: str) -> bytes | None:
        """The document at ``path``, or None when the instance has none (404)."""
        request = urllib.request.Request(
            f"{self.base_url}/latest/{path}", headers=self._token_header()
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def decode_user_data(raw: bytes) -> str:
    """User data as text; EC2 passes it through as given, possibly gzip-compressed."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def read_metadata(imds: Imds, attempts: int, pause_s: float) -> tuple[str, str | None]:
    """User data (empty when absent or unreachable) and the instance id, if known.

    The network may come up a moment after this starts, so connection failures are retried.
    """
    for attempt in range(1, attempts + 1):
        try:
            raw = imds.get("user-data")
            instance_id = imds.get("meta-data/instance-id")
            break
        except (OSError, urllib.error.URLError) as exc:
            reason = getattr(exc, "reason", exc)
            if attempt < attempts:
                time.sleep(pause_s)
                continue
            log(
                f"no instance metadata at {imds.base_url} within {imds.timeout}s, "
                f"{attempts} attempt(s) ({reason}); "
                "using the settings already on disk and the defaults"
            )
            return "", None
    instance = instance_id.decode().strip() if instance_id else None
    if raw is None:
        log("this instance has no user data; using the defaults")
        return "", instance
    try:
        return decode_user_data(raw), instance
    except (OSError, UnicodeDecodeError, EOFError):
        log("user data is neither text nor gzip-compressed text; ignoring it")
        return "", instance


def read_env_file(path: Path) -> dict[str, str]:
    return parse_env_file(path.read_text()) if path.exists() else {}


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file only its owner can read."""
    write_atomically(path, text, 0o600)


def write_atomically(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` at once: a reader (or a kill) sees the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def as_service_user(argv: list[str], user: str) -> list[str]:
    """Run as the services' user when root, so the files they must write stay theirs."""
    if user and os.geteuid() == 0:
        return ["runuser", "-u", user, "--", *argv]
    return argv


def cluster_firewall_rule(settings: Mapping[str, str]) -> list[str] | None:
    """The ufw rule that lets the nodes of one multi-node model reach each other, if any.

    Ray and NCCL use many ports between nodes, so a cluster opens to its own subnet
    (``APPLIANCE_CLUSTER_CIDR``) rather than port by port; a single node opens nothing.
    ValueError when the subnet is not one.
    """
    cidr = settings.get("APPLIANCE_CLUSTER_CIDR", "")
    if not cidr or settings.get("APPLIANCE_NODE_ROLE", "single") == "single":
        return None
    network = ipaddress.ip_network(cidr, strict=False)
    if not network.is_private:
        raise ValueError(f"APPLIANCE_CLUSTER_CIDR={cidr} is not a private network")
    return ["allow", "from", str(network), "comment", "appliance cluster (Ray, NCCL)"]


def open_cluster_firewall(args: argparse.Namespace, settings: Mapping[str, str]) -> None:
    try:
        rule = cluster_firewall_rule(settings)
    except ValueError as exc:
        log(f"cluster firewall not opened: {exc}")
        return
    if rule is None:
        return
    done = run([args.ufw_cmd, *rule])
    if done.returncode != 0:
        log(f"opening the firewall to the cluster failed: {done.stderr.strip()[-300:]}")
    else:
        log(f"firewall open to the cluster's subnet {rule[2]}")


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def ensure_self_signed(args: argparse.Namespace) -> None:
    if args.cert.exists() and args.cert_key.exists():
        log(f"certificate {args.cert} exists; keeping it")
        return
    done = run([args.self_signed_cmd, str(args.cert), str(args.cert_key)])
    if done.returncode != 0:
        raise RuntimeError(f"{args.self_signed_cmd} failed: {done.stderr.strip()}")
    log(f"made a self-signed certificate at {args.cert}")


def admin_key_target(
    settings: Mapping[str, str], state_dir: Path, name: str, instance_id: str | None
) -> tuple[str, str]:
    """(key store, key name) for this instance's admin key.

    In a fleet (``APPLIANCE_KEYS_URL``) every instance shares the store, so each names its
    admin key after itself rather than all racing for one name.
    """
    if settings.get("APPLIANCE_KEYS_URL"):
        return settings["APPLIANCE_KEYS_URL"], f"{name}-{instance_id or 'unknown'}"
    return settings.get("APPLIANCE_KEYS_DB") or str(state_dir / "keys.db"), name


def ensure_admin_key(
    args: argparse.Namespace, settings: Mapping[str, str], instance_id: str | None
) -> None:
    """Create the first admin key once; its secret goes to a root-only file and nowhere else."""
    if args.admin_key_file.exists() and args.admin_key_file.read_text().strip():
        log(f"admin key file {args.admin_key_file} exists; keeping it")
        return
    db, name = admin_key_target(settings, args.state_dir, args.admin_key_name, instance_id)
    argv = as_service_user([args.keys_cmd, "--db", db, "create", "--name", name],
                           args.service_user)
    done = run(argv)
    secret = done.stdout.strip()
    if done.returncode != 0 or not secret:
        raise RuntimeError(f"creating the admin key failed: {done.stderr.strip()}")
    write_private(args.admin_key_file, secret + "\n")
    log(f"created API key {name!r}; its secret is in {args.admin_key_file}")


def size_gateway(args: argparse.Namespace, settings: dict[str, str]) -> None:
    """Fix the gateway's worker count in the env file and give NGINX one upstream per worker.

    The count's default depends on this instance's cores, so it is resolved here, once, by
    ``appliance-proxy`` itself, and the same number goes to both; they must agree (a worker
    NGINX does not know idles, a port NGINX knows and no worker serves answers 502).
    """
    if not settings.get("APPLIANCE_PROXY_WORKERS"):
        done = subprocess.run([args.proxy_cmd, "--print-workers"], capture_output=True,
                              text=True, check=False, env={**os.environ, **settings})
        if done.returncode != 0 or not done.stdout.strip().isdigit():
            log(f"could not size the gateway ({done.stderr.strip()[-300:]}); one worker")
            settings["APPLIANCE_PROXY_WORKERS"] = "1"
        else:
            settings["APPLIANCE_PROXY_WORKERS"] = done.stdout.strip()
    workers = settings["APPLIANCE_PROXY_WORKERS"]
    if not (args.site_dir / "render-params.json").exists():
        log(f"no NGINX site in {args.site_dir}; gateway workers: {workers}")
        return
    done = run([args.render_site_cmd, "--out-dir", str(args.site_dir), "--update",
                "--gateway-workers", workers])
    if done.returncode != 0:
        log(f"rendering the NGINX site for {workers} gateway workers failed:"
            f" {done.stderr.strip()[-300:]}")
        return
    log(f"gateway workers: {workers}; NGINX routes each key to one of them")


def place_engines(args: argparse.Namespace, settings: dict[str, str]) -> list[Replica]:
    """With a models file: one ``appliance-engine@N`` a replica of its plan, the single engine
    off, and the gateway told where the replicas listen. Without one, nothing changes (and
    no replica is returned)."""
    if not args.models_file.is_file():
        return []
    done = subprocess.run(as_service_user([args.engine_cmd, "--list-replicas", "--fetch"],
                                          args.service_user),
                          capture_output=True, text=True, check=False,
                          env={**os.environ, **ENGINE_FETCH_ENV, **settings,
                               "APPLIANCE_MODELS_FILE": str(args.models_file)})
    try:
        replicas = parse_replicas(done.stdout) if done.returncode == 0 else []
    except ValueError as exc:
        raise RuntimeError(f"appliance-engine --list-replicas: {exc}") from None
    if not replicas:
        raise RuntimeError(f"the models file's plan does not start ({done.stderr.strip()[-600:]});"
                           f" see: {args.engine_cmd} --plan")
    urls = [replica.url for replica in replicas]
    settings["APPLIANCE_ENGINE_URLS"] = ",".join(urls)
    previous = args.state_dir / "engine-replicas"
    before = int(previous.read_text()) if previous.is_file() else 0
    systemctl = [args.systemctl_cmd]
    run([*systemctl, "disable", "--now", "--no-block", "appliance-engine.service"])
    stale = [f"appliance-engine@{i}.service" for i in range(len(urls), before)]
    if stale:
        run([*systemctl, "disable", "--now", "--no-block", *stale])
    wanted = [f"appliance-engine@{i}.service" for i in range(len(urls))]
    enabled = run([*systemctl, "enable", "--now", "--no-block", *wanted])
    if enabled.returncode != 0:
        raise RuntimeError(f"enabling the engine replicas failed: {enabled.stderr.strip()[-300:]}")
    args.state_dir.mkdir(parents=True, exist_ok=True)
    previous.write_text(f"{len(urls)}\n")
    log(f"models file: {len(urls)} engine replica(s), appliance-engine@0 to @{len(urls) - 1}")
    return replicas


def write_engine_targets(args: argparse.Namespace, replicas: list[Replica],
                         settings: Mapping[str, str]) -> None:
    """Tell the installed scrapers (Prometheus, the CloudWatch agent: each target file whose
    directory exists) which engines to scrape; both re-read the file when it changes."""
    text = engine_targets(replicas, settings.get("APPLIANCE_ENGINE_PORT", "8000"))
    for path in args.engine_targets:
        if path.parent.is_dir():
            write_atomically(path, text, 0o644)
            log(f"engines to scrape: {max(1, len(replicas))}, in {path}")


def maybe_enable_tls(args: argparse.Namespace, settings: Mapping[str, str]) -> bool:
    """Ask for a Let's Encrypt certificate when configured; False when that failed."""
    if not wants_public_tls(settings):
        log("no DOMAIN and EMAIL in user data; serving the self-signed certificate")
        return True
    domain, email = settings["APPLIANCE_DOMAIN"], settings["APPLIANCE_EMAIL"]
    done = run([args.enable_tls_cmd, domain, email])
    if done.returncode != 0:
        # DNS may not point here yet: keep serving the self-signed certificate.
        log(
            f"enable-tls for {domain} failed ({done.stderr.strip()[-500:]}); "
            f"serving the self-signed certificate; retry with: {args.enable_tls_cmd} "
            f"{domain} {email}"
        )
        return False
    log(f"Let's Encrypt certificate installed for {domain}")
    return True


def apply_cors(args: argparse.Namespace, settings: Mapping[str, str]) -> None:
    """Re-render the NGINX site with the env file's APPLIANCE_CORS_ORIGINS (browser origins
    allowed to call the API; NGINX answers their preflights). NGINX starts after first boot,
    so it loads the new site as it starts."""
    origins = settings.get("APPLIANCE_CORS_ORIGINS", "")
    if not (args.site_dir / "render-params.json").is_file():
        log(f"no rendered NGINX site in {args.site_dir}; CORS origins not applied")
        return
    done = run([args.render_site_cmd, "--out-dir", str(args.site_dir), "--update",
                "--cors-origins", origins])
    if done.returncode != 0:
        log(f"APPLIANCE_CORS_ORIGINS not applied: {done.stderr.strip()[-500:]}")
    elif origins:
        log(f"NGINX site allows browser origins: {origins}")


def env_default(name: str, default: str) -> str:
    return os.environ.get(f"APPLIANCE_FIRSTBOOT_{name}", default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imds-url", default=env_default("IMDS_URL", IMDS_URL))
    p.add_argument("--imds-timeout", type=float, default=float(env_default("IMDS_TIMEOUT", "2")))
    p.add_argument("--imds-attempts", type=int, default=int(env_default("IMDS_ATTEMPTS", "5")))
    p.add_argument("--imds-pause", type=float, default=float(env_default("IMDS_PAUSE", "2")))
    p.add_argument(
        "--env-file",
        type=Path,
        default=Path(env_default("ENV_FILE", "/etc/appliance/appliance.env")),
    )
    p.add_argument(
        "--admin-key-file",
        type=Path,
        default=Path(env_default("ADMIN_KEY_FILE", "/etc/appliance/admin-key")),
    )
    p.add_argument("--admin-key-name", default=env_default("ADMIN_KEY_NAME", "admin"))
    p.add_argument(
        "--state-dir", type=Path, default=Path(env_default("STATE_DIR", "/var/lib/appliance"))
    )
    p.add_argument(
        "--cert", type=Path, default=Path(env_default("CERT", "/etc/appliance/tls/self-signed.crt"))
    )
    p.add_argument(
        "--cert-key",
        type=Path,
        default=Path(env_default("CERT_KEY", "/etc/appliance/tls/self-signed.key")),
    )
    p.add_argument(
        "--defaults-file",
        type=Path,
        default=Path(env_default("DEFAULTS_FILE", "/etc/appliance/image-defaults.env")),
        help="settings the image was built with (a pre-baked model); lowest precedence",
    )
    p.add_argument("--ufw-cmd", default=env_default("UFW_CMD", "ufw"))
    p.add_argument(
        "--self-signed-cmd",
        default=env_default("SELF_SIGNED_CMD", f"{OPS_DIR}/tools/make-self-signed.sh"),
    )
    p.add_argument(
        "--enable-tls-cmd", default=env_default("ENABLE_TLS_CMD", f"{OPS_DIR}/tools/enable-tls.sh")
    )
    p.add_argument(
        "--site-dir", type=Path, default=Path(env_default("SITE_DIR", "/etc/nginx/appliance"))
    )
    p.add_argument(
        "--render-site-cmd", default=env_default("RENDER_SITE_CMD", f"{OPS_DIR}/render_site.py")
    )
    # The virtualenv's command itself: /usr/local/sbin/appliance-keys switches user on its own.
    p.add_argument("--keys-cmd", default=env_default("KEYS_CMD", f"{VENV_BIN}/appliance-keys"))
    p.add_argument("--proxy-cmd", default=env_default("PROXY_CMD", f"{VENV_BIN}/appliance-proxy"))
    p.add_argument("--engine-cmd",
                   default=env_default("ENGINE_CMD", f"{VENV_BIN}/appliance-engine"))
    p.add_argument("--systemctl-cmd", default=env_default("SYSTEMCTL_CMD", "systemctl"))
    p.add_argument(
        "--models-file",
        type=Path,
        default=Path(env_default("MODELS_FILE", "/etc/appliance/models.toml")),
        help="where a models file in user data is written, and read to place the engines",
    )
    p.add_argument(
        "--engine-targets",
        type=lambda text: [Path(part) for part in text.split(",") if part],
        default=[Path(part) for part in env_default("ENGINE_TARGETS", ENGINE_TARGETS).split(",")],
        help="comma-separated file_sd target files listing the engines to scrape; each is "
        "written when its directory exists (the scraper is installed)",
    )
    p.add_argument(
        "--service-user",
        default=env_default("SERVICE_USER", "appliance"),
        help="run appliance-keys as this user when root ('' to not switch)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--skip-tls",
        action="store_true",
        help="leave Let's Encrypt to a later --tls-only run (the boot units do this: NGINX "
        "must serve the ACME challenge, and it starts after first boot)",
    )
    mode.add_argument(
        "--tls-only",
        action="store_true",
        help="only request the Let's Encrypt certificate the env file's DOMAIN/EMAIL name",
    )
    return p.parse_args(argv)


def public_tls(args: argparse.Namespace) -> int:
    """``--tls-only``: after NGINX is up (certbot's HTTP-01 challenge goes through it)."""
    settings = read_env_file(args.env_file)
    if maybe_enable_tls(args, settings):
        args.state_dir.mkdir(parents=True, exist_ok=True)
        (args.state_dir / "firstboot-tls.done").write_text("done\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tls_only:
        return public_tls(args)
    imds = Imds(args.imds_url, args.imds_timeout)
    user_data, instance_id = read_metadata(imds, args.imds_attempts, args.imds_pause)
    user_data, models_text = split_user_data(user_data)
    parsed = parse_user_data(user_data)
    if models_text is not None:
        args.models_file.parent.mkdir(parents=True, exist_ok=True)
        args.models_file.write_text(models_text)
        args.models_file.chmod(0o644)
        log(f"models file from user data: {args.models_file}")
    for reason in parsed.ignored:
        log(f"user data ignored: {reason}")
    if parsed.settings:
        log(f"settings from user data: {', '.join(sorted(parsed.settings))}")

    defaults = read_env_file(args.defaults_file)
    existing = read_env_file(args.env_file)
    generated = {name: secrets.token_urlsafe(32) for name in GENERATED}
    settings = merge_settings(defaults, existing, parsed.settings, generated)
    size_gateway(args, settings)
    try:
        replicas = place_engines(args, settings)
    except RuntimeError as exc:
        log(str(exc))
        write_private(args.env_file, render_env(settings))
        return 1
    write_private(args.env_file, render_env(settings))
    log(f"wrote {args.env_file} ({len(settings)} settings, mode 0600)")
    write_engine_targets(args, replicas, settings)

    apply_cors(args, settings)
    try:
        ensure_self_signed(args)
        ensure_admin_key(args, settings, instance_id)
        open_cluster_firewall(args, settings)
    except RuntimeError as exc:
        log(str(exc))
        return 1
    if args.skip_tls:
        if wants_public_tls(settings):
            log("Let's Encrypt is requested once NGINX runs (appliance-firstboot-tls.service)")
    else:
        maybe_enable_tls(args, settings)

    args.state_dir.mkdir(parents=True, exist_ok=True)
    (args.state_dir / "firstboot.done").write_text(f"{instance_id or 'unknown'}\n")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
