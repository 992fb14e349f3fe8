"""`nginx -t` accepts every rendered variant of the site, and the site works inside Debian's
own nginx.conf layout (an http block that includes it), not only our standalone one."""

import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.nginx_stack import NGINX, render

VARIANTS = {
    "loopback-defaults": {},
    "domain": {"server_name": "api.example.com"},
    "standard-ports-all-addresses": {"listen_addr": "", "http_port": 80, "https_port": 443},
    "small-timeouts": {"short_timeout_s": 1, "long_timeout_s": 3},
    "tight-limits": {"rate_per_s": 1, "burst": 1, "conn_per_ip": 1, "body_size": "1m"},
    # The production defaults, which the other variants raise so tests are not throttled.
    "production-limits": {"rate_per_s": 50, "burst": 100, "conn_per_ip": 128},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_nginx_accepts_every_rendered_variant(variant, tmp_path):
    site = render(tmp_path, "127.0.0.1:8080", **VARIANTS[variant])
    done = subprocess.run([NGINX, *site.nginx_args, "-t"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "[emerg]" not in done.stderr


def test_site_fits_inside_debians_main_config(tmp_path):
    """Production includes the site from Debian's own nginx.conf, whose http block already sets
    ssl_protocols, gzip and logs: none of that may clash with the site. Debian's file is used
    as installed, with only its site include and pid moved to this test's directory."""
    site = render(tmp_path, "127.0.0.1:8080")
    debian = Path("/etc/nginx/nginx.conf").read_text()
    assert "include /etc/nginx/sites-enabled/*;" in debian
    debian = debian.replace(
        "include /etc/nginx/sites-enabled/*;", f"include {site.dir}/appliance.conf;"
    )
    debian = re.sub(r"^pid .*;$", f"pid {tmp_path}/debian.pid;", debian, flags=re.M)
    main = tmp_path / "debian-nginx.conf"
    main.write_text(debian)
    done = subprocess.run(
        [NGINX, "-p", str(tmp_path), "-c", str(main), "-t"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
