"""The image test's pure helpers: where the egress proxy connects, which Debian mirror the host
uses, and what Packer's template tells the provisioning."""

import pytest

from tests.image.egress import target
from tests.image.provision import provisioner_env, provisioner_scripts, source_paths
from tests.image.rootfs import SUITE, host_debian_mirror


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"CONNECT pypi.example:443 HTTP/1.1", ("pypi.example", 443, True)),
        (b"GET http://deb.example/debian/dists/x HTTP/1.1", ("deb.example", 80, False)),
        (b"GET http://deb.example:8080/a HTTP/1.1", ("deb.example", 8080, False)),
    ],
)
def test_egress_target(line, expected):
    assert target(line) == expected


def test_mirror_from_deb822_sources(tmp_path):
    sources = tmp_path / "debian.sources"
    sources.write_text(
        f"Types: deb\nURIs: http://mirror.example/debian\nSuites: {SUITE} {SUITE}-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
        f"Suites: {SUITE}-security\n"
    )
    assert host_debian_mirror([sources]) == "http://mirror.example/debian"


def test_mirror_from_a_sources_list(tmp_path):
    listed = tmp_path / "sources.list"
    listed.write_text(
        f"# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian {SUITE} main"
        " contrib\n"
    )
    assert host_debian_mirror([listed]) == "http://mirror.example/debian"


def test_no_mirror_for_the_suite_is_an_error(tmp_path):
    listed = tmp_path / "sources.list"
    listed.write_text("deb http://mirror.example/debian sid main\n")
    with pytest.raises(RuntimeError):
        host_debian_mirror([listed])


def test_provisioning_follows_the_template():
    scripts = provisioner_scripts()
    assert scripts[0] == "ami/10-packages.sh" and scripts[-1] == "ami/99-cleanup.sh"
    assert scripts == sorted(scripts)
    assert {"ami", "proxy", "server", "systemd", "pyproject.toml"} <= set(source_paths())
    env = provisioner_env()
    assert env["FLAVOR"] == "cpu" and env["VLLM_VERSION"] and env["PREBAKE_MODEL"] == ""
