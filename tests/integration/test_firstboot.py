"""appliance-firstboot against a fake EC2 metadata service (IMDSv2) on loopback.

Everything else is real: the certificate comes from appliance_ops/tools/make-self-signed.sh,
the admin key from the real appliance-keys into a real key store, and the NGINX site the image
serves is rendered with that certificate and checked by `nginx -t`.
"""

import gzip
import json
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from dotenv import dotenv_values

from proxy.settings import available_cpus, default_worker_count
from tests.e2e.engine_stack import ENGINE_BIN, make_tiny_model
from tests.firstboot_imds import TOKEN, fake_imds
from tests.servers import ROOT, VENV_BIN, free_port

SCRIPT = ROOT / "appliance_ops" / "firstboot.py"
@dataclass
class Host:
    """The paths first boot writes, all inside a temporary directory."""

    root: Path

    @property
    def env_file(self) -> Path:
        return self.root / "etc" / "appliance.env"

    @property
    def admin_key(self) -> Path:
        return self.root / "etc" / "admin-key"

    @property
    def cert(self) -> Path:
        return self.root / "etc" / "tls" / "self-signed.crt"

    @property
    def cert_key(self) -> Path:
        return self.root / "etc" / "tls" / "self-signed.key"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def site(self) -> Path:
        return self.root / "nginx"

    @property
    def defaults(self) -> Path:
        return self.root / "etc" / "image-defaults.env"

    def command(
        self, imds_url: str, enable_tls: str = "/bin/false", timeout: float = 2.0, attempts: int = 1
    ) -> list[str]:
        return [
            sys.executable,
            str(SCRIPT),
            "--imds-url",
            imds_url,
            "--imds-timeout",
            str(timeout),
            "--imds-attempts",
            str(attempts),
            "--imds-pause",
            "0.2",
            "--env-file",
            str(self.env_file),
            "--admin-key-file",
            str(self.admin_key),
            "--state-dir",
            str(self.state),
            "--cert",
            str(self.cert),
            "--cert-key",
            str(self.cert_key),
            "--defaults-file",
            str(self.defaults),
            "--self-signed-cmd",
            str(ROOT / "appliance_ops" / "tools" / "make-self-signed.sh"),
            "--enable-tls-cmd",
            enable_tls,
            "--keys-cmd",
            str(VENV_BIN / "appliance-keys"),
            "--site-dir",
            str(self.root / "nginx"),
            "--render-site-cmd",
            str(ROOT / "appliance_ops" / "render_site.py"),
            "--service-user",
            "",
            "--proxy-cmd",
            str(VENV_BIN / "appliance-proxy"),
            "--models-file",
            str(self.models_file),
            "--systemctl-cmd",
            str(self.systemctl),
            "--engine-cmd",
            str(ENGINE_BIN / "appliance-engine"),
            "--engine-targets",
            f"{self.prometheus_targets},{self.root / 'no-cloudwatch' / 'appliance-engines.json'}",
        ]

    @property
    def prometheus_targets(self) -> Path:
        """Prometheus's engine list; its directory exists, as when Prometheus is installed (the
        CloudWatch agent's does not: it is not)."""
        path = self.root / "prometheus" / "appliance-engines.json"
        path.parent.mkdir(exist_ok=True)
        return path

    @property
    def models_file(self) -> Path:
        return self.root / "etc" / "models.toml"

    @property
    def systemctl(self) -> Path:
        """A stand-in for systemctl (no systemd runs this host): it records its arguments."""
        path = self.root / "systemctl"
        if not path.exists():
            path.write_text(f"#!/bin/sh\necho \"$*\" >> {self.root / 'systemctl.calls'}\n")
            path.chmod(0o755)
        return path

    def systemctl_calls(self) -> list[str]:
        calls = self.root / "systemctl.calls"
        return calls.read_text().splitlines() if calls.exists() else []

    def firstboot(self, imds_url: str, *flags: str, **options) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.command(imds_url, **options), *flags], capture_output=True, text=True, timeout=60
        )

    def keys(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "appliance-keys"), "--db", str(self.state / "keys.db"), *args],
            capture_output=True,
            text=True,
            check=True,
        )


@pytest.fixture
def host(tmp_path) -> Host:
    return Host(tmp_path)


USER_DATA = """\
# appliance settings
APPLIANCE_MODEL=Qwen/Qwen2.5-0.5B-Instruct
APPLIANCE_MAX_INFLIGHT=32
APPLIANCE_HF_TOKEN=hf_secret_value_never_logged
NOT_OURS=should-be-ignored
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_boot_writes_settings_certificate_and_admin_key(host):
    with fake_imds(USER_DATA) as imds:
        done = host.firstboot(imds.url)
    assert done.returncode == 0, done.stderr
    logs = done.stdout + done.stderr

    env = dotenv_values(host.env_file)
    assert env["APPLIANCE_MODEL"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert env["APPLIANCE_MAX_INFLIGHT"] == "32"
    assert "NOT_OURS" not in env
    assert len(env["APPLIANCE_ENGINE_API_KEY"]) >= 32
    assert mode(host.env_file) == 0o600

    secret = host.admin_key.read_text().strip()
    assert mode(host.admin_key) == 0o600
    assert "admin" in host.keys("list").stdout
    for value in (secret, env["APPLIANCE_ENGINE_API_KEY"], "hf_secret_value_never_logged"):
        assert value not in logs
    assert "APPLIANCE_HF_TOKEN" in logs  # names of settings are logged, values never
    assert "NOT_OURS" in logs

    subprocess.run(
        ["openssl", "x509", "-in", str(host.cert), "-noout", "-checkend", "86400"],
        check=True,
        capture_output=True,
    )
    assert mode(host.cert_key) == 0o600
    assert (host.state / "firstboot.done").read_text().strip() == "i-0123456789abcdef0"

    # IMDSv2: a token first, and every read carries it.
    assert imds.seen[0][:2] == ("PUT", "/latest/api/token")
    gets = [token for method, _, token in imds.seen if method == "GET"]
    assert gets and all(token == TOKEN for token in gets)


def test_rerun_keeps_secrets_and_operator_edits_and_applies_user_data(host):
    with fake_imds(USER_DATA) as imds:
        assert host.firstboot(imds.url).returncode == 0
        first_env = dotenv_values(host.env_file)
        first_key = host.admin_key.read_text()
        first_cert = host.cert.read_bytes()
        with host.env_file.open("a") as f:
            f.write("APPLIANCE_LOG_LEVEL=debug\n")
        imds.user_data = "APPLIANCE_MODEL=another/model\n"
        done = host.firstboot(imds.url)
    assert done.returncode == 0, done.stderr
    env = dotenv_values(host.env_file)
    assert env["APPLIANCE_MODEL"] == "another/model"
    assert env["APPLIANCE_MAX_INFLIGHT"] == "32"
    assert env["APPLIANCE_LOG_LEVEL"] == "debug"
    assert env["APPLIANCE_ENGINE_API_KEY"] == first_env["APPLIANCE_ENGINE_API_KEY"]
    assert host.admin_key.read_text() == first_key
    assert host.cert.read_bytes() == first_cert
    assert host.keys("list").stdout.count("admin") == 1


def test_image_defaults_apply_unless_user_data_overrides(host):
    host.defaults.parent.mkdir(parents=True)
    host.defaults.write_text("APPLIANCE_MODEL=baked/model\nAPPLIANCE_DEVICE=gpu\n")
    with fake_imds("APPLIANCE_DEVICE=auto\n") as imds:
        assert host.firstboot(imds.url).returncode == 0
    env = dotenv_values(host.env_file)
    assert env["APPLIANCE_MODEL"] == "baked/model"
    assert env["APPLIANCE_DEVICE"] == "auto"


def test_instance_without_user_data_gets_defaults(host):
    with fake_imds(None) as imds:
        done = host.firstboot(imds.url)
    assert done.returncode == 0, done.stderr
    assert "no user data" in done.stderr
    # What first boot generates or resolves for this box, nothing else.
    assert set(dotenv_values(host.env_file)) == {"APPLIANCE_ENGINE_API_KEY",
                                                 "APPLIANCE_PROXY_WORKERS"}
    assert host.admin_key.exists()


def test_unreachable_metadata_service_is_logged_and_not_fatal(host):
    done = host.firstboot(f"http://127.0.0.1:{free_port()}", attempts=3)
    assert done.returncode == 0, done.stderr
    assert "no instance metadata" in done.stderr and "3 attempt(s)" in done.stderr
    assert (host.state / "firstboot.done").read_text().strip() == "unknown"


def test_silent_metadata_service_times_out(host):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        done = host.firstboot(url, timeout=0.5)
    assert done.returncode == 0, done.stderr
    assert "no instance metadata" in done.stderr and "within 0.5s" in done.stderr


def recorder(tmp_path: Path, exit_code: int) -> tuple[Path, Path]:
    """An enable-tls stand-in that records its arguments (the real one needs an ACME server,
    and is tested with pebble by its own tests)."""
    record = tmp_path / "enable-tls.args"
    script = tmp_path / "enable-tls"
    script.write_text(
        f'#!/bin/sh\necho "$@" > {record}\necho "acme says no" >&2\nexit {exit_code}\n'
    )
    script.chmod(0o755)
    return script, record


def test_domain_and_email_run_enable_tls(host, tmp_path):
    script, record = recorder(tmp_path, 0)
    with fake_imds("DOMAIN=api.example.com\nEMAIL=ops@example.com\n") as imds:
        done = host.firstboot(imds.url, enable_tls=str(script))
    assert done.returncode == 0, done.stderr
    assert record.read_text().split() == ["api.example.com", "ops@example.com"]
    env = dotenv_values(host.env_file)
    assert env["APPLIANCE_DOMAIN"] == "api.example.com"


def test_failed_enable_tls_keeps_self_signed_and_says_how_to_retry(host, tmp_path):
    script, _ = recorder(tmp_path, 1)
    with fake_imds("DOMAIN=api.example.com\nEMAIL=ops@example.com\n") as imds:
        done = host.firstboot(imds.url, enable_tls=str(script))
    assert done.returncode == 0
    assert "acme says no" in done.stderr and "retry with" in done.stderr
    assert host.cert.exists()


def test_domain_without_email_does_not_request_a_certificate(host, tmp_path):
    script, record = recorder(tmp_path, 0)
    with fake_imds("DOMAIN=api.example.com\n") as imds:
        assert host.firstboot(imds.url, enable_tls=str(script)).returncode == 0
    assert not record.exists()


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs Debian's nginx")
def test_image_site_accepts_the_first_boot_certificate(host):
    """The site as ami/50-site.sh renders it, with the certificate first boot made."""
    with fake_imds(None) as imds:
        assert host.firstboot(imds.url).returncode == 0
    site = host.root / "nginx"
    logs = host.root / "log"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "appliance_ops" / "render_site.py"),
            "--out-dir",
            str(site),
            "--standalone",
            "--cert",
            str(host.cert),
            "--key",
            str(host.cert_key),
            "--http-port",
            str(free_port()),
            "--https-port",
            str(free_port()),
            "--listen-addr",
            "127.0.0.1",
            "--webroot",
            str(host.root / "acme"),
            "--access-log",
            str(logs / "access.log"),
            "--error-log",
            str(logs / "error.log"),
        ],
        check=True,
        capture_output=True,
    )
    test = subprocess.run(
        [
            "nginx",
            "-t",
            "-p",
            str(site),
            "-c",
            str(site / "nginx.conf"),
            "-e",
            str(logs / "error.log"),
        ],
        capture_output=True,
        text=True,
    )
    assert test.returncode == 0, test.stderr
    assert "test is successful" in test.stderr


def test_metadata_service_that_comes_up_late_is_waited_for(host):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        host.command(url, attempts=50), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.0)
    with fake_imds("APPLIANCE_MODEL=late/model\n", port=port):
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert dotenv_values(host.env_file)["APPLIANCE_MODEL"] == "late/model"


def test_gzip_compressed_user_data_is_read(host):
    with fake_imds(gzip.compress(b"APPLIANCE_MODEL=zipped/model\n")) as imds:
        done = host.firstboot(imds.url)
    assert done.returncode == 0, done.stderr
    assert dotenv_values(host.env_file)["APPLIANCE_MODEL"] == "zipped/model"


def test_binary_user_data_is_ignored_not_fatal(host):
    with fake_imds(b"\xff\xfe\x00binary") as imds:
        done = host.firstboot(imds.url)
    assert done.returncode == 0, done.stderr
    assert "neither text nor gzip" in done.stderr
    assert host.admin_key.exists()


def test_boot_splits_tls_until_nginx_runs(host, tmp_path):
    """The boot unit skips Let's Encrypt (NGINX is not up yet); the TLS unit does it after."""
    script, record = recorder(tmp_path, 0)
    with fake_imds("DOMAIN=api.example.com\nEMAIL=ops@example.com\n") as imds:
        done = host.firstboot(imds.url, "--skip-tls", enable_tls=str(script))
    assert done.returncode == 0, done.stderr
    assert not record.exists()
    assert "appliance-firstboot-tls.service" in done.stderr

    later = host.firstboot("http://127.0.0.1:9", "--tls-only", enable_tls=str(script))
    assert later.returncode == 0, later.stderr
    assert record.read_text().split() == ["api.example.com", "ops@example.com"]
    assert (host.state / "firstboot-tls.done").exists()


def test_failed_tls_only_run_is_retried_at_next_boot(host, tmp_path):
    script, _ = recorder(tmp_path, 1)
    with fake_imds("DOMAIN=api.example.com\nEMAIL=ops@example.com\n") as imds:
        assert host.firstboot(imds.url, "--skip-tls").returncode == 0
    later = host.firstboot("http://127.0.0.1:9", "--tls-only", enable_tls=str(script))
    assert later.returncode == 0
    assert "retry with" in later.stderr
    assert not (host.state / "firstboot-tls.done").exists()


def test_cors_origins_from_user_data_reach_the_nginx_site(host):
    site = host.root / "nginx"
    subprocess.run([sys.executable, str(ROOT / "appliance_ops" / "render_site.py"), "--out-dir",
                    str(site)], check=True, capture_output=True, env={"PATH": "/usr/bin:/bin"})
    with fake_imds("APPLIANCE_CORS_ORIGINS=https://app.example.com\n") as imds:
        done = host.firstboot(imds.url)
    assert done.returncode == 0, done.stderr
    params = json.loads((site / "render-params.json").read_text())
    assert params["cors_origins"] == "https://app.example.com"
    assert '"https://app.example.com" $http_origin;' in (site / "appliance.conf").read_text()
    assert "allows browser origins" in done.stderr + done.stdout


def upstream_ports(site: Path) -> list[int]:
    text = (site / "appliance.conf").read_text()
    return [int(p) for p in re.findall(r"^\s*server 127\.0\.0\.1:(\d+) max_fails=0;$", text,
                                        re.MULTILINE)]


@pytest.mark.parametrize("user_data", [None, "APPLIANCE_PROXY_WORKERS=3\n"])
def test_gateway_workers_are_fixed_once_and_nginx_gets_one_upstream_each(host, user_data):
    """The env file and the NGINX site name the same count: this box's default, or the user's."""
    subprocess.run([sys.executable, str(ROOT / "appliance_ops" / "render_site.py"), "--out-dir",
                    str(host.site)], check=True, capture_output=True)
    assert upstream_ports(host.site) == [8080]
    with fake_imds(user_data) as imds:
        done = host.firstboot(imds.url)
    assert done.returncode == 0, done.stderr
    expected = 3 if user_data else default_worker_count(available_cpus())
    assert dotenv_values(host.env_file)["APPLIANCE_PROXY_WORKERS"] == str(expected)
    assert upstream_ports(host.site) == [8080 + i for i in range(expected)]
    assert f"gateway workers: {expected}" in done.stdout + done.stderr


def test_a_models_file_in_user_data_places_one_engine_unit_a_replica(host, tmp_path):
    """The models file after the settings is written out; the single engine is switched off
    and appliance-engine@0 and @1 on; the gateway gets both replicas' addresses. Run again
    with one model, the second replica's unit is switched off."""
    models = [make_tiny_model(tmp_path / f"tiny-{seed}", seed=seed) for seed in (0, 1)]
    table = "".join(f'[[models]]\nname = "m{i}"\nsource = "{path}"\nmax_model_len = 512\n\n'
                    for i, path in enumerate(models))
    settings = "APPLIANCE_ENGINE_PORT=9100\nAPPLIANCE_MAX_INFLIGHT=32\n"
    with fake_imds(settings + table) as imds:
        done = host.firstboot(imds.url)
    assert done.returncode == 0, done.stderr
    assert host.models_file.read_text() == table
    env = dotenv_values(host.env_file)
    assert env["APPLIANCE_ENGINE_URLS"] == "http://127.0.0.1:9100,http://127.0.0.1:9101"
    assert env["APPLIANCE_MAX_INFLIGHT"] == "32" and "[[models]]" not in host.env_file.read_text()
    assert host.systemctl_calls() == [
        "disable --now --no-block appliance-engine.service",
        "enable --now --no-block appliance-engine@0.service appliance-engine@1.service"]
    assert json.loads(host.prometheus_targets.read_text()) == [
        {"targets": ["127.0.0.1:9100"], "labels": {"replica": "0", "model": "m0"}},
        {"targets": ["127.0.0.1:9101"], "labels": {"replica": "1", "model": "m1"}}]
    assert mode(host.prometheus_targets) == 0o644
    assert not (host.root / "no-cloudwatch").exists()

    one = table.split("\n\n")[0] + "\n\n"
    host.models_file.write_text(one)
    with fake_imds(settings) as imds:
        done = host.firstboot(imds.url)
    assert done.returncode == 0, done.stderr
    assert dotenv_values(host.env_file)["APPLIANCE_ENGINE_URLS"] == "http://127.0.0.1:9100"
    assert host.systemctl_calls()[-2:] == [
        "disable --now --no-block appliance-engine@1.service",
        "enable --now --no-block appliance-engine@0.service"]
    assert [group["targets"] for group in json.loads(host.prometheus_targets.read_text())] \
        == [["127.0.0.1:9100"]]


def test_without_a_models_file_prometheus_scrapes_the_single_engine_on_its_port(host):
    with fake_imds("APPLIANCE_ENGINE_PORT=8100\n") as imds:
        done = host.firstboot(imds.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(host.prometheus_targets.read_text()) == [{"targets": ["127.0.0.1:8100"]}]


def test_a_models_file_that_cannot_be_placed_fails_first_boot_and_says_why(host):
    with fake_imds('[[models]]\nname = "x"\nsource = "/nowhere/at/all"\n') as imds:
        done = host.firstboot(imds.url)
    assert done.returncode == 1
    assert "does not start" in done.stderr and "/nowhere/at/all" in done.stderr
    assert host.systemctl_calls() == []
