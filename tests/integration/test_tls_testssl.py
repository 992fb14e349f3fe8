"""testssl.sh (Debian's package) finds no weak protocol, no weak cipher and no vulnerability.

Certificate findings are left out: the first-boot certificate is self-signed on purpose. The
scan runs offline: NXCONNECT and --nodns keep testssl from looking anything up.
"""

import json
import os
import subprocess

import pytest

from tests.integration.nginx_stack import render, serving
from tests.servers import free_port

BAD = {"LOW", "MEDIUM", "HIGH", "CRITICAL"}


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("testssl")
    site = render(workdir, f"127.0.0.1:{free_port()}")
    report = workdir / "testssl.json"
    with serving(site):
        done = subprocess.run(
            [
                "testssl",
                "--ip",
                "127.0.0.1",
                "--nodns",
                "none",
                "--color",
                "0",
                "--warnings",
                "off",
                "--quiet",
                "-p",
                "-s",
                "-U",
                "--jsonfile",
                str(report),
                f"127.0.0.1:{site.https_port}",
            ],
            env={**os.environ, "NXCONNECT": "127.0.0.1:0"},
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert report.exists(), done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(report.read_text())


def test_testssl_ran_every_check(findings):
    ids = {f["id"] for f in findings}
    assert {"SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"} <= ids
    assert {"heartbleed", "ROBOT", "LUCKY13", "BEAST", "SWEET32"} <= ids


def test_testssl_finds_nothing_weak(findings):
    bad = [
        f"{f['severity']} {f['id']}: {f['finding']}"
        for f in findings
        if f["severity"] in BAD and not f["id"].startswith("cert")
    ]
    assert bad == []


def test_only_tls12_and_tls13_are_offered(findings):
    offered = {
        f["id"]
        for f in findings
        if f["id"] in {"SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"}
        and f["finding"].startswith("offered")
    }
    assert offered == {"TLS1_2", "TLS1_3"}
