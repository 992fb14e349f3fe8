"""The image test's base: a Debian root file system made by debootstrap, cached between runs.

The cache is keyed on ``ami/`` and this file, so a change to what the image is made of builds a
new one. Packages are fetched in a plain chroot (downloading runs no package scripts) and
configured in a container with a network namespace of its own, so no package script can reach
the host's network or firewall. What the base holds is only a head start: the provisioners'
``apt-get install`` adds anything missing through the build proxy.
"""

import hashlib
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.servers import ROOT

SUITE = "bookworm"
"""Debian 12: the cpu flavour's base image (its lock is for Python 3.11)."""
BOOT_PACKAGES = ("systemd", "systemd-sysv", "dbus")
PRESEED_PACKAGES = (
    # ami/10-packages.sh's list, so that its install finds them in place ...
    "nginx", "certbot", "ufw", "logrotate", "curl", "ca-certificates", "openssl", "jq",
    "python3", "python3-venv", "python3-dev", "build-essential", "pciutils", "libnuma1",
    # ... ami/65-observability.sh's with -var prometheus=true ...
    "prometheus", "prometheus-blackbox-exporter",
    # ... and what an EC2 Debian image has that the provisioners use.
    "iproute2", "procps", "sudo",
)  # fmt: skip
CACHE = ROOT / ".image"
NSPAWN = ("systemd-nspawn", "--private-network", "--register=no", "--keep-unit")
"""No systemd on the host: nothing to register with, no scope to ask for."""


def cache_key() -> str:
    digest = hashlib.sha256(repr((SUITE, BOOT_PACKAGES, PRESEED_PACKAGES)).encode())
    for path in sorted((ROOT / "ami").rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def host_debian_mirror(sources: list[Path]) -> str:
    """The Debian mirror this host's apt uses for ``SUITE`` (CI can reach it; nothing is
    hard-coded)."""
    for path in sources:
        text = path.read_text()
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
        for line in text.splitlines():
            fields = re.sub(r"\[[^]]*\]", "", line).split()  # without [options]
            if len(fields) >= 3 and fields[0] == "deb" and fields[2] == SUITE:
                return fields[1]
    raise RuntimeError(f"no Debian {SUITE} source in {[str(p) for p in sources]}")


def apt_sources() -> list[Path]:
    listed = [Path("/etc/apt/sources.list")]
    listed += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    listed += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    return [p for p in listed if p.is_file()]


def run(argv: list[str], **kwargs) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)


def build(dest: Path) -> None:
    sources = apt_sources()
    mirror = host_debian_mirror(sources)
    work = dest.with_name(dest.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    run(["debootstrap", "--variant=minbase", f"--include={','.join(BOOT_PACKAGES)}",
         SUITE, str(work), mirror])  # fmt: skip
    # The host's apt sources that name Debian (security updates included), as on a real image.
    (work / "etc/apt/sources.list").unlink(missing_ok=True)
    for path in sources:
        if "debian" in path.read_text() and SUITE in path.read_text():
            shutil.copy(path, work / "etc/apt/sources.list.d" / path.name)
    apt = ["apt-get", "-y", "-q", "--no-install-recommends"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
    run(["chroot", str(work), "apt-get", "-q", "update"], env=env)
    run(["chroot", str(work), *apt, "--download-only", "install", *PRESEED_PACKAGES], env=env)
    policy = work / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    run([*NSPAWN, "--quiet", "-D", str(work), "--setenv=DEBIAN_FRONTEND=noninteractive",
         *apt, "install", *PRESEED_PACKAGES])  # fmt: skip
    policy.unlink()
    run(["chroot", str(work), "apt-get", "clean"], env=env)
    (work / "etc/hostname").write_text("appliance\n")
    work.rename(dest)


def base_root() -> tuple[Path, float]:
    """The cached base for the current ``ami/`` (built when missing) and the seconds it took."""
    dest = CACHE / f"base-{cache_key()}"
    started = time.monotonic()
    if not dest.is_dir():
        CACHE.mkdir(exist_ok=True)
        for stale in CACHE.glob("base-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build(dest)
    return dest, time.monotonic() - started


def fresh_copy(base: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", "--reflink=auto", str(base), str(dest)])


def discard(path: Path) -> None:
    """Move a previous run out of the way and delete it in the background: a provisioned root
    is gigabytes of small files, and the new run need not wait for them."""
    if not path.exists():
        return
    trash = CACHE / f"trash-{time.time_ns()}"
    path.rename(trash)
    subprocess.Popen(["rm", "-rf", str(trash)], start_new_session=True)
