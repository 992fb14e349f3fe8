"""appliance_ops/tools/enable-tls.sh end to end: real certbot, real NGINX, and pebble (Debian's
ACME test server) on loopback, with pebble-challtestsrv answering DNS so `appliance.test` is
127.0.0.1.
"""

import json
import os
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.integration.nginx_stack import (
    fingerprint,
    render,
    served_certificate,
    serving,
    wait_for_certificate_change,
)
from tests.servers import ROOT, free_port, running, wait_http

ENABLE_TLS = ROOT / "appliance_ops" / "tools" / "enable-tls.sh"
DOMAIN = "appliance.test"
EMAIL = "ops@appliance.test"
# Fast and deterministic: no validation sleeps, no random nonce rejections or authz reuse.
PEBBLE_ENV = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pebble_tls(workdir: Path) -> tuple[Path, Path, Path]:
    """The Debian package ships no certificate for pebble's own HTTPS: make a CA and one."""
    ca, ca_key = workdir / "ca.pem", workdir / "ca.key"
    cert, key = workdir / "pebble.pem", workdir / "pebble.key"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *ec,
        "-days",
        "2",
        "-subj",
        "/CN=pebble test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    openssl(
        "req",
        *ec,
        "-subj",
        "/CN=localhost",
        "-keyout",
        str(key),
        "-out",
        str(workdir / "pebble.csr"),
    )
    ext = workdir / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        str(workdir / "pebble.csr"),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return ca, cert, key


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = render(tmp_path_factory.mktemp("acme-site"), f"127.0.0.1:{free_port()}")
    with serving(site):
        yield site


@pytest.fixture(scope="module")
def pebble(site, tmp_path_factory):
    """pebble validating HTTP-01 on the site's plain-HTTP port, resolving names through
    pebble-challtestsrv, which answers 127.0.0.1 for every name."""
    workdir = tmp_path_factory.mktemp("pebble")
    ca, cert, key = make_pebble_tls(workdir)
    port, management, dns = free_port(), free_port(), free_port()
    config = workdir / "pebble.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{port}",
                    "managementListenAddress": f"127.0.0.1:{management}",
                    "certificate": str(cert),
                    "privateKey": str(key),
                    "httpPort": site.http_port,
                    "tlsPort": free_port(),
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    dns_argv = [
        "pebble-challtestsrv",
        "-defaultIPv4",
        "127.0.0.1",
        "-defaultIPv6",
        "",
        "-dns01",
        f"127.0.0.1:{dns}",
        "-http01",
        "",
        "-https01",
        "",
        "-tlsalpn01",
        "",
        "-management",
        f"127.0.0.1:{free_port()}",
    ]
    pebble_argv = ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns}"]
    with (
        running(dns_argv, log=workdir / "challtestsrv.log"),
        running(pebble_argv, env=PEBBLE_ENV, log=workdir / "pebble.log") as proc,
    ):
        directory = f"https://127.0.0.1:{port}/dir"
        trust = ssl.create_default_context(cafile=str(ca))
        wait_http(directory, proc=proc, verify=trust)
        root = httpx.get(f"https://127.0.0.1:{management}/roots/0", verify=trust).text
        (workdir / "issuer-root.pem").write_text(root)
        yield {"directory": directory, "ca": ca, "root": workdir / "issuer-root.pem"}


def enable_tls(
    site, pebble, certbot_dir: Path, *args: str, nginx_args: str | None = None
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "REQUESTS_CA_BUNDLE": str(pebble["ca"]),
        "APPLIANCE_NGINX_DIR": str(site.dir),
        "APPLIANCE_NGINX_ARGS": " ".join(site.nginx_args) if nginx_args is None else nginx_args,
        "APPLIANCE_CERTBOT_DIR": str(certbot_dir),
    }
    return subprocess.run(
        [str(ENABLE_TLS), *args], env=env, capture_output=True, text=True, timeout=120
    )


def verified_certificate(port: int, root: Path, name: str = DOMAIN) -> dict:
    """Handshake as a real client would: chain to the ACME server's root, and the name."""
    context = ssl.create_default_context(cafile=str(root))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=name) as tls,
    ):
        return tls.getpeercert()


@pytest.mark.parametrize(
    "domain",
    [
        "localhost",
        "-bad.example.com",
        "exa mple.com",
        "under_score.example.com",
        "example",
        "a..example.com",
        "example.com;reboot",
        "x" * 64 + ".example.com",
    ],
)
def test_refuses_a_bad_domain(site, pebble, tmp_path, domain):
    done = enable_tls(site, pebble, tmp_path / "certbot", "--", domain, EMAIL)
    assert done.returncode == 2
    assert "not a fully qualified domain name" in done.stderr
    assert not (tmp_path / "certbot").exists()  # certbot never ran


@pytest.mark.parametrize("email", ["nobody", "a@b", "x@@example.com", "", "a b@example.com"])
def test_refuses_a_bad_email(site, pebble, tmp_path, email):
    done = enable_tls(site, pebble, tmp_path / "certbot", DOMAIN, email)
    assert done.returncode == 2
    assert "not an email address" in done.stderr


def test_refuses_a_plain_http_acme_server(site, pebble, tmp_path):
    done = enable_tls(
        site, pebble, tmp_path / "certbot", "--server", "http://127.0.0.1:1/dir", DOMAIN, EMAIL
    )
    assert done.returncode == 2


def test_keeps_the_self_signed_site_when_issuance_fails(site, pebble, tmp_path):
    before = served_certificate(site.https_port)
    conf = (site.dir / "appliance.conf").read_text()
    dead = f"https://127.0.0.1:{free_port()}/dir"
    done = enable_tls(site, pebble, tmp_path / "certbot", "--server", dead, DOMAIN, EMAIL)
    assert done.returncode == 1
    assert "keeps its current certificate" in done.stderr
    assert (site.dir / "appliance.conf").read_text() == conf
    assert served_certificate(site.https_port) == before
    response = httpx.get(site.https + "/nowhere", verify=site.trust())
    assert response.status_code == 404


def test_restores_the_site_when_nginx_rejects_the_new_configuration(site, pebble, tmp_path):
    """Issuance works but `nginx -t` fails (here: it is pointed at a missing main config):
    the rendered site goes back to what it was and nothing is reloaded."""
    before = served_certificate(site.https_port)
    files = {p: p.read_bytes() for p in site.dir.rglob("*") if p.suffix in (".conf", ".json")}
    broken = f"-p {site.dir} -c {tmp_path}/missing.conf"
    done = enable_tls(
        site,
        pebble,
        tmp_path / "certbot",
        "--server",
        pebble["directory"],
        DOMAIN,
        EMAIL,
        nginx_args=broken,
    )
    assert done.returncode == 1
    assert "nginx rejected the configuration" in done.stderr
    assert (tmp_path / "certbot" / "config" / "live" / DOMAIN / "fullchain.pem").exists()
    assert {p: p.read_bytes() for p in files} == files
    assert served_certificate(site.https_port) == before


def test_issues_serves_and_renews_with_a_reload(site, pebble, tmp_path):
    certbot_dir = tmp_path / "certbot"
    self_signed = served_certificate(site.https_port)

    done = enable_tls(site, pebble, certbot_dir, "--server", pebble["directory"], DOMAIN, EMAIL)
    assert done.returncode == 0, done.stdout + done.stderr

    # NGINX now serves the ACME certificate, valid for the name, under the ACME root.
    issued = wait_for_certificate_change(site.https_port, self_signed, DOMAIN)
    live = certbot_dir / "config" / "live" / DOMAIN
    assert fingerprint(issued) == fingerprint(
        ssl.PEM_cert_to_DER_cert((live / "cert.pem").read_text())
    )
    peer = verified_certificate(site.https_port, pebble["root"])
    assert ("DNS", DOMAIN) in peer["subjectAltName"]
    conf = (site.dir / "appliance.conf").read_text()
    assert f"server_name {DOMAIN};" in conf
    assert f"ssl_certificate {live}/fullchain.pem;" in conf
    redirect = httpx.get(site.http + "/v1/models")
    assert redirect.headers["location"] == f"https://{DOMAIN}:{site.https_port}/v1/models"

    # Running it again changes nothing: the certificate is not yet due.
    again = enable_tls(site, pebble, certbot_dir, "--server", pebble["directory"], DOMAIN, EMAIL)
    assert again.returncode == 0, again.stderr
    assert served_certificate(site.https_port, DOMAIN) == issued

    # A renewal, as certbot's timer runs it (forced, so it happens now), runs the deploy hook
    # enable-tls.sh installed, and NGINX serves the new certificate without a restart.
    hook = certbot_dir / "config" / "renewal-hooks" / "deploy" / "appliance-nginx-reload"
    assert os.access(hook, os.X_OK)
    renew = subprocess.run(
        [
            "certbot",
            "renew",
            "--force-renewal",
            "--no-random-sleep-on-renew",
            "--non-interactive",
            "--config-dir",
            str(certbot_dir / "config"),
            "--work-dir",
            str(certbot_dir / "work"),
            "--logs-dir",
            str(certbot_dir / "logs"),
        ],
        env={**os.environ, "REQUESTS_CA_BUNDLE": str(pebble["ca"])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert renew.returncode == 0, renew.stdout + renew.stderr
    log = (certbot_dir / "logs" / "letsencrypt.log").read_text()
    assert f"Running deploy-hook command: {hook}" in log
    assert "ran with error output" not in log
    renewed = wait_for_certificate_change(site.https_port, issued, DOMAIN)
    assert fingerprint(renewed) == fingerprint(
        ssl.PEM_cert_to_DER_cert((live / "cert.pem").read_text())
    )
    verified_certificate(site.https_port, pebble["root"])
