"""What the HTTPS port negotiates, checked with the real `openssl s_client`.

OpenSSL 3's client refuses TLS 1.0/1.1 on its own at the default security level; the legacy
probes lower it (``@SECLEVEL=0``) so a failure proves the server is the one refusing.
"""

import re
import subprocess
import time

import pytest

from tests.integration.nginx_stack import render, serving
from tests.servers import free_port

LEGACY = "DEFAULT:@SECLEVEL=0"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = render(tmp_path_factory.mktemp("tls"), f"127.0.0.1:{free_port()}")
    with serving(site):
        yield site


def s_client(port: int, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            *options,
        ],
        input="",
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=20,
    )


def negotiated(done: subprocess.CompletedProcess) -> tuple[str, str] | None:
    """(protocol, cipher) of a completed handshake, from s_client's "New, ..." line."""
    match = re.search(r"^New, (TLSv1(?:\.\d)?), Cipher is (\S+)$", done.stdout, re.M)
    if done.returncode != 0 or not match or match.group(2) == "(NONE)":
        return None
    return match.group(1), match.group(2)


def handshake_ok(done: subprocess.CompletedProcess) -> bool:
    return negotiated(done) is not None


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_legacy_protocols_are_refused_by_the_server(site, version):
    done = s_client(site.https_port, version, "-cipher", LEGACY)
    assert not handshake_ok(done), done.stdout
    # The client did offer the protocol: the refusal came from the server's side.
    assert "no protocols available" not in done.stderr


def test_legacy_probe_would_work_against_a_server_that_allowed_it(site):
    """The probe itself is sound: OpenSSL can still speak TLS 1.0 with these options
    (`openssl s_server` accepts it), so the failure above is NGINX's choice."""
    port = free_port()
    server = subprocess.Popen(
        [
            "openssl",
            "s_server",
            "-accept",
            f"127.0.0.1:{port}",
            "-cert",
            str(site.cert),
            "-key",
            str(site.cert.with_suffix(".key")),
            "-tls1",
            "-cipher",
            LEGACY,
            "-www",
            "-naccept",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            done = s_client(port, "-tls1", "-cipher", LEGACY)
            if "Connection refused" not in done.stderr:
                break
            time.sleep(0.1)
        assert negotiated(done) is not None, done.stderr
        assert negotiated(done)[0] == "TLSv1.0"
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize(("version", "name"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_modern_protocols_are_accepted(site, version, name):
    done = s_client(site.https_port, version)
    assert negotiated(done) is not None, done.stdout + done.stderr
    assert negotiated(done)[0] == name


def test_tls12_negotiates_forward_secret_aead_only(site):
    done = s_client(site.https_port, "-tls1_2")
    protocol, cipher = negotiated(done)
    assert protocol == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)


@pytest.mark.parametrize(
    "cipher",
    [
        "ECDHE-ECDSA-AES128-SHA",
        "ECDHE-ECDSA-AES256-SHA384",
        "AES128-GCM-SHA256",
        "DHE-RSA-AES128-GCM-SHA256",
    ],
)
def test_cbc_and_non_ecdhe_suites_are_refused(site, cipher):
    assert not handshake_ok(s_client(site.https_port, "-tls1_2", "-cipher", cipher))


def test_no_session_tickets(site):
    done = s_client(site.https_port, "-tls1_2")
    assert handshake_ok(done)
    assert "TLS session ticket:" not in done.stdout


def test_http2_is_offered_by_alpn(site):
    done = s_client(site.https_port, "-alpn", "h2,http/1.1")
    assert "ALPN protocol: h2" in done.stdout
