"""appliance_ops/tools/make-self-signed.sh: the first-boot certificate, made once and kept."""

import os
import stat
import subprocess
from pathlib import Path

from tests.servers import ROOT

SCRIPT = ROOT / "appliance_ops" / "tools" / "make-self-signed.sh"


def make(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def x509(cert: Path, *options: str) -> str:
    return subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", *options],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_makes_a_p256_certificate_for_the_name_and_loopback(tmp_path):
    cert, key = tmp_path / "tls" / "c.crt", tmp_path / "tls" / "c.key"
    done = make(cert, key, "appliance.example.com")
    assert done.returncode == 0, done.stderr
    text = x509(cert, "-text")
    assert "Subject: CN = appliance.example.com" in text
    assert "DNS:appliance.example.com, DNS:localhost, IP Address:127.0.0.1" in text
    assert "NIST CURVE: P-256" in text
    assert "TLS Web Server Authentication" in text
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    public_key = subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-pubout"], capture_output=True, text=True
    ).stdout
    assert (
        public_key
        == subprocess.run(
            ["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"],
            capture_output=True,
            text=True,
        ).stdout
    )


def test_keeps_an_existing_certificate_unless_forced(tmp_path):
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    make(cert, key, "one.example.com")
    first = x509(cert, "-fingerprint")
    again = make(cert, key, "one.example.com")
    assert again.returncode == 0 and "keeping" in again.stdout
    assert x509(cert, "-fingerprint") == first
    forced = make("--force", cert, key, "one.example.com")
    assert forced.returncode == 0
    assert x509(cert, "-fingerprint") != first


def test_refuses_a_name_that_is_not_a_host_name(tmp_path):
    done = make(tmp_path / "c.crt", tmp_path / "c.key", "bad/CN=evil")
    assert done.returncode == 2
    assert not (tmp_path / "c.crt").exists()


def test_usage_without_paths(tmp_path):
    assert make().returncode == 2
