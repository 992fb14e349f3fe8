"""The appliance image, built and booted under real systemd: ``ami/`` provisions a Debian root
(the cpu flavour, this checkout as the source) inside a booted container as Packer would on a
build instance, the machine powers off like the snapshot, then boots as a new instance whose
user data comes from a fake IMDSv2, and is checked from inside and from the host.

Needs root, debootstrap and systemd-nspawn (``.ci/run`` installs them). The container always
has a network namespace of its own (``--private-network``); the host reaches its loopback by
running clients in that namespace. Phase timings are printed at the end of the run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.image.conftest import FINDINGS, phase
from tests.image.machine import Machine
from tests.image.provision import (
    PROXY_PORT,
    WHEELS,
    provisioner_env,
    provisioner_scripts,
    upload_sources,
    wheelhouse,
)
from tests.image.rootfs import CACHE, base_root, discard, fresh_copy
from tests.servers import ROOT, stop

pytestmark = pytest.mark.timeout(2400)

SERVICES = ("appliance-engine", "appliance-proxy", "nginx")
MODEL_DIR = "/var/lib/appliance/models/tiny"
SECOND_MODEL_DIR = "/var/lib/appliance/models/tiny-b"
"""A second tiny model (another seed) for the models file's two engines."""
USER_DATA = f"""APPLIANCE_MODEL={MODEL_DIR}
APPLIANCE_SERVED_MODEL_NAME=tiny
APPLIANCE_MAX_MODEL_LEN=1024
APPLIANCE_MAX_NUM_SEQS=16
APPLIANCE_SHUTDOWN_GRACE_S=5
"""
"""No KV cache size: the cpu image must run with the engine's defaults."""
LATER_USER_DATA = USER_DATA.replace("MAX_NUM_SEQS=16", "MAX_NUM_SEQS=4")
"""Served on the second boot: first boot must not run again and apply it."""
ENGINE_READY_S = 600.0
IMDS_PORT = 9169
"""The metadata service on the instance's loopback: its real address's port 80 would take the
port NGINX binds on every address, so first boot is pointed here by a drop-in."""
IMDS_DROP_IN = f"""# The image test's metadata service (tests/image), on the instance's loopback.
[Service]
Environment=APPLIANCE_FIRSTBOOT_IMDS_URL=http://127.0.0.1:{IMDS_PORT}
"""


def require_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the image test needs root (debootstrap, systemd-nspawn, nsenter)")
    missing = [t for t in ("debootstrap", "systemd-nspawn", "nsenter", "ip") if not shutil.which(t)]
    if missing:
        pytest.fail(f"the image test needs {missing}: .ci/run installs them")


def tiny_model(dest: Path, uid: int, seed: int = 0) -> None:
    engine_python = ROOT / os.environ.get("ENGINE_VENV", ".venv-engine") / "bin" / "python"
    subprocess.run(
        [str(engine_python), str(ROOT / "scripts" / "make_tiny_model.py"), str(dest),
         "--seed", str(seed)], check=True, capture_output=True,
    )  # fmt: skip
    for path in [dest, *dest.rglob("*")]:
        os.chown(path, uid, uid)


def image_uid(root: Path, user: str = "appliance") -> int:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2])
    raise AssertionError(f"no {user} user in the image")


@pytest.fixture(scope="module")
def image() -> Path:
    """The provisioned, powered-off root file system: what Packer would snapshot."""
    require_tools()
    run_dir = CACHE / "run"
    discard(run_dir)
    run_dir.mkdir(parents=True)
    with phase("debootstrap base (cached per ami/)"):
        base, _ = base_root()
    with phase("wheelhouse of the cpu lock (cached per lock)"):
        wheels = wheelhouse()
    root = run_dir / "root"
    with phase("fresh copy of the base"):
        fresh_copy(base, root)
        upload_sources(root)
    proxy_socket = run_dir / "egress.sock"
    proxy_socket.unlink(missing_ok=True)
    egress = [sys.executable, "-m", "tests.image.egress"]
    build = Machine(root, "appliance-build", run_dir / "build-console.log",
                    binds=(f"--bind-ro={wheels}:{WHEELS}",))  # fmt: skip
    host_proxy = subprocess.Popen(
        [*egress, "proxy", "--unix", str(proxy_socket)], cwd=ROOT, start_new_session=True,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert host_proxy.stdout and host_proxy.stdout.readline() == "listening\n"
    try:
        with phase("build instance boots"):
            build.boot()
            assert build.wait_booted() in ("running", "degraded")
        relay = subprocess.Popen(
            build.in_netns([*egress, "relay", "--port", str(PROXY_PORT),
                            "--unix", str(proxy_socket)]), cwd=ROOT, start_new_session=True,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert relay.stdout and relay.stdout.readline() == "listening\n"
        try:
            for script in provisioner_scripts():
                with phase(f"provision {script}"):
                    done = build.run(["bash", f"/var/tmp/appliance-src/{script}"],
                                     env=provisioner_env(), timeout=1200)  # fmt: skip
                (run_dir / f"{Path(script).stem}.log").write_text(done.stdout + done.stderr)
        finally:
            stop(relay)
        with phase("power off (the snapshot)"):
            build.poweroff()
    finally:
        build.kill()
        stop(host_proxy)
    with phase("tiny model placed in the image"):
        tiny_model(root / MODEL_DIR.lstrip("/"), image_uid(root))
        tiny_model(root / SECOND_MODEL_DIR.lstrip("/"), image_uid(root), seed=1)
    drop_in = root / "etc/systemd/system/appliance-firstboot.service.d/test-imds.conf"
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(IMDS_DROP_IN)
    return root


class Instance:
    """The booted instance: its fake metadata service and the host-side client."""

    def __init__(self, root: Path, run_dir: Path) -> None:
        self.root, self.run_dir = root, run_dir
        self.machine = Machine(root, "appliance", run_dir / "console.log")
        self.imds: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None

    def boot(self, user_data: str) -> str:
        (self.run_dir / "user-data").write_text(user_data)
        self.machine.boot()
        script = (
            f"ip link set lo up && exec {sys.executable} -m tests.firstboot_imds --host 127.0.0.1 "
            f"--port {IMDS_PORT} --user-data {self.run_dir / 'user-data'}"
        )
        self.imds = subprocess.Popen(
            self.machine.in_netns(["sh", "-c", script]), cwd=ROOT, stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self.machine.wait_booted()

    def wait_active(self, unit: str, timeout: float = ENGINE_READY_S) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.machine.run(["systemctl", "is-active", unit], check=False).stdout.strip()
            if state in ("active", "failed"):
                return state
            time.sleep(2)
        return state

    def ask(self, command: str, **args: object) -> dict:
        """One command to the host-side client in the instance's network namespace."""
        if self.client is None:
            cacert = self.root / "etc/appliance/tls/self-signed.crt"
            local_cert = self.run_dir / "instance.crt"
            shutil.copy(cacert, local_cert)
            self.client = subprocess.Popen(
                self.machine.in_netns([sys.executable, "-m", "tests.image.client",
                                       "--url", "https://127.0.0.1", "--cacert", str(local_cert)]),
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert json.loads(self.client.stdout.readline()) == {"ready": True}
        assert self.client.stdin and self.client.stdout
        self.client.stdin.write(json.dumps({"command": command, **args}) + "\n")
        self.client.stdin.flush()
        answer = json.loads(self.client.stdout.readline())
        assert "exception" not in answer, answer["exception"]
        return answer

    def shutdown(self) -> None:
        for proc in (self.client, self.imds):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self.client = self.imds = None
        self.machine.poweroff()

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        done = self.machine.run(["systemctl", "show", unit, "-p", ",".join(properties)])
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def proc_status(self, pid: str) -> dict[str, str]:
        text = self.machine.run(["cat", f"/proc/{pid}/status"]).stdout
        return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


@pytest.fixture(scope="module")
def instance(image: Path):
    run_dir = CACHE / "run"
    node = Instance(image, run_dir)
    try:
        with phase("instance boots: first boot from user data, until the engine answers"):
            state = node.boot(USER_DATA)
            assert node.wait_active("appliance-engine") == "active", node.machine.run(
                ["journalctl", "-u", "appliance-engine", "-n", "40", "--no-pager"], check=False
            ).stdout
        FINDINGS.append(f"first boot: system {state}")
        yield node
    finally:
        if node.machine.proc is not None and node.machine.proc.poll() is None:
            try:
                node.shutdown()
            except Exception:
                node.machine.kill()


def admin_key(instance: Instance) -> str:
    return instance.machine.run(["cat", "/etc/appliance/admin-key"]).stdout.strip()


def engine_key(instance: Instance) -> str:
    env = instance.machine.run(["cat", "/etc/appliance/appliance.env"]).stdout
    match = re.search(r"^APPLIANCE_ENGINE_API_KEY=['\"]?([^'\"\n]+)", env, re.M)
    assert match, "no engine key in the env file"
    return match.group(1)


def test_first_boot_writes_settings_key_and_certificate_from_user_data(instance):
    m = instance.machine
    private = ("appliance.env", "admin-key", "tls/self-signed.key")
    modes = m.run(["stat", "-c", "%n %a %U", *(f"/etc/appliance/{p}" for p in private)]).stdout
    assert modes.split("\n")[:3] == [
        "/etc/appliance/appliance.env 600 root",
        "/etc/appliance/admin-key 600 root",
        "/etc/appliance/tls/self-signed.key 600 root",
    ]
    env = m.run(["cat", "/etc/appliance/appliance.env"]).stdout
    assert f"APPLIANCE_MODEL={MODEL_DIR}" in env
    assert "APPLIANCE_MAX_NUM_SEQS=16" in env
    assert engine_key(instance)
    assert admin_key(instance).startswith("sk-")
    subject = m.run(["openssl", "x509", "-in", "/etc/appliance/tls/self-signed.crt", "-noout",
                     "-subject"]).stdout  # fmt: skip
    assert "image-build" not in subject, "the image build's throw-away certificate survived"
    assert m.run(["test", "-e", "/var/lib/appliance/firstboot.done"], check=False).returncode == 0
    assert instance.show("appliance-firstboot", "Result")["Result"] == "success"


def test_services_are_active_and_renewal_is_enabled(instance):
    m = instance.machine
    for unit in SERVICES:
        assert instance.wait_active(unit, 120) == "active", unit
    assert m.run(["systemctl", "is-enabled", "certbot.timer"]).stdout.strip() == "enabled"
    failed = m.run(["systemctl", "--failed", "--plain", "--no-legend"]).stdout.strip()
    FINDINGS.append(f"failed units after first boot: {failed or 'none'}")
    states = [
        f"{u}: " + m.run(["systemctl", "is-active", u], check=False).stdout.strip()
        for u in (*SERVICES, "appliance-firstboot", "appliance-firstboot-tls", "certbot.timer")
    ]
    FINDINGS.append("unit states: " + ", ".join(states))


def test_prometheus_on_the_instance_scrapes_the_appliance_and_loads_its_alerts(instance):
    """``-var prometheus=true``: Debian's Prometheus and blackbox exporter with the bundle's
    configuration, on loopback only, every target up, the appliance's alerts loaded."""
    m = instance.machine
    for unit in ("prometheus", "prometheus-blackbox-exporter"):
        assert instance.wait_active(unit, 120) == "active", unit
    listening = [line.split()[3] for line in m.run(["ss", "-Hltn"]).stdout.splitlines()]
    for port in ("9090", "9115"):
        local = [address for address in listening if address.endswith(":" + port)]
        assert local and all(a.startswith("127.0.0.1:") for a in local), (port, local)

    def api(path: str) -> dict:
        return json.loads(m.run(["curl", "-sf", f"http://127.0.0.1:9090/api/v1/{path}"]).stdout)

    deadline, health = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        targets = api("targets")["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if set(health.values()) == {"up"}:
            break
        time.sleep(3)
    assert health == {"appliance-gateway": "up", "vllm": "up", "appliance-tls": "up"}, targets
    rules = {r["name"] for g in api("rules")["data"]["groups"] for r in g["rules"]}
    assert {"ApplianceEngineDown", "ApplianceKeyNearQuota"} <= rules, rules
    FINDINGS.append(f"prometheus on the instance: targets {health}, {len(rules)} alert rules")


HARDENING = {
    "appliance-engine": {
        "User": "appliance", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": "",
        "DevicePolicy": "closed", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "LockPersonality": "yes",
        "ProtectProc": "invisible", "RestrictSUIDSGID": "yes",
    },
    "appliance-proxy": {
        "User": "appliance", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes", "PrivateUsers": "yes",
        "CapabilityBoundingSet": "", "MemoryDenyWriteExecute": "yes",
        "IPAddressDeny": "::/0 0.0.0.0/0", "ProtectProc": "invisible", "ProcSubset": "pid",
        "RestrictNamespaces": "yes",
    },
}  # fmt: skip


@pytest.mark.parametrize("unit", sorted(HARDENING))
def test_services_run_as_appliance_with_their_sandbox_in_force(instance, unit):
    """The unit's settings as systemd loaded them, and their effect on the running process."""
    expected = HARDENING[unit]
    shown = instance.show(unit, "MainPID", "SystemCallFilter", *expected)
    for name, value in expected.items():
        # Lists (IPAddressDeny=...) come back in no fixed order.
        assert sorted(shown[name].split()) == sorted(value.split()), (unit, name, shown[name])
    assert shown["SystemCallFilter"], "no system call filter"
    pid = shown["MainPID"]
    status = instance.proc_status(pid)
    assert status["Uid"].split()[0] == str(image_uid(instance.root))
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # filter mode
    limits = instance.machine.run(["cat", f"/proc/{pid}/limits"]).stdout
    open_files = next(line for line in limits.splitlines() if "open files" in line)
    FINDINGS.append(f"{unit} (pid {pid}): {' '.join(open_files.split())}")
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    mounts = instance.machine.run(["cat", f"/proc/{pid}/mountinfo"]).stdout.splitlines()
    options = {line.split()[4]: line.split()[5] for line in mounts}
    assert options["/"].startswith("ro"), "ProtectSystem=strict: / is not read-only"
    assert options["/var/lib/appliance"].startswith("rw")
    assert options["/usr"].startswith("ro") if "/usr" in options else True
    if unit == "appliance-proxy":
        uid_map = instance.machine.run(["cat", f"/proc/{pid}/uid_map"]).stdout.split()
        assert uid_map[:3] != ["0", "0", "4294967295"], "PrivateUsers=yes: no user namespace"


def test_gateway_reaches_nothing_beyond_loopback(instance):
    """The gateway's IPAddressDeny=/IPAddressAllow=, as systemd loaded them, enforced here: a
    probe under the same two settings reaches loopback but not a listener on another address
    (192.0.2.1, added to the loopback device of the container's private network namespace:
    the fence filters by address, not by device)."""
    m = instance.machine
    m.run(["sh", "-c", "ip addr show dev lo | grep -q 192.0.2.1/32 || "
           "ip addr add 192.0.2.1/32 dev lo"])  # fmt: skip
    m.run(["systemd-run", "--unit=fence-listener", "--collect", "python3", "-m", "http.server",
           "--bind", "192.0.2.1", "9170"])  # fmt: skip
    # A dropped connection times out (errno None); either way it is not open.
    probe = (
        "import socket,sys,time\n"
        "for host, port in (('127.0.0.1', 8080), ('192.0.2.1', 9170)):\n"
        "    for attempt in range(int(sys.argv[1])):\n"
        "        try:\n"
        "            socket.create_connection((host, port), timeout=3).close()\n"
        "            print(host, 'open'); break\n"
        "        except OSError as e:\n"
        "            error = e.errno; time.sleep(0.5)\n"
        "    else:\n"
        "        print(host, 'refused', error)\n"
    )
    fence = instance.show("appliance-proxy", "IPAddressDeny", "IPAddressAllow")
    outside = m.run(["python3", "-c", probe, "20"]).stdout  # until the listener is up
    inside = m.run(["systemd-run", "--wait", "--pipe", "--quiet", "--collect",
                    *(f"--property={k}={v}" for k, v in fence.items()),
                    "python3", "-c", probe, "1"]).stdout  # fmt: skip
    m.run(["systemctl", "stop", "fence-listener"], check=False)
    FINDINGS.append(f"gateway's IP fence {fence}: without it {outside.split()}; "
                    f"with it {inside.split()}")  # fmt: skip
    assert "192.0.2.1 open" in outside, outside  # the listener is there
    assert "127.0.0.1 open" in inside, inside
    assert "192.0.2.1 refused" in inside, inside


def test_exposure_scores_from_inside(instance):
    scores = {}
    for unit in (*HARDENING, "appliance-firstboot", "appliance-firstboot-tls"):
        out = instance.machine.run(["systemd-analyze", "security", "--no-pager", unit]).stdout
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert match, out[-500:]
        scores[unit] = float(match.group(1))
    FINDINGS.append(
        "systemd-analyze security (inside): "
        + ", ".join(f"{u} {s}" for u, s in scores.items())
    )
    assert scores["appliance-proxy"] < 2.0 and scores["appliance-engine"] < 3.0, scores


def test_smoke_test_passes_inside(instance):
    done = instance.machine.run(["appliance-smoke-test"], check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_openai_client_through_nginx_tls_from_the_host(instance):
    answer = instance.ask("chat", key=admin_key(instance))
    assert answer["usage"]["completion_tokens"] > 0


def test_keys_created_and_revoked_take_effect_at_the_front_door_within_a_second(instance):
    m = instance.machine
    secret = m.run(["appliance-keys", "create", "--name", "image-test"]).stdout.strip()
    assert secret.startswith("sk-")
    allowed = instance.ask("watch", key=secret, status=200, timeout=5)
    m.run(["appliance-keys", "revoke", "image-test"])
    refused = instance.ask("watch", key=secret, status=401, timeout=5)
    FINDINGS.append(
        f"key created -> 200 after {allowed['elapsed']:.3f} s; revoked -> 401 after "
        f"{refused['elapsed']:.3f} s (timed from the CLI's exit)"
    )
    assert allowed["elapsed"] is not None and allowed["elapsed"] <= 1.0, allowed
    assert refused["elapsed"] is not None and refused["elapsed"] <= 1.0, refused


def test_engine_restart_under_a_live_stream(instance):
    key = admin_key(instance)
    proxy_before = instance.show("appliance-proxy", "MainPID", "NRestarts")
    instance.ask("stream", key=key, max_tokens=1000)
    with phase("engine restart under a live stream, until requests succeed again"):
        instance.machine.run(["systemctl", "restart", "--no-block", "appliance-engine"])
        recovery = instance.ask("until_ok", key=key, timeout=ENGINE_READY_S)
        stream = instance.ask("stream_result")
    kinds = Counter(
        f"{r['status']} {r['code']}" + (" with Retry-After" if r["retry_after"] else "")
        for r in recovery["refusals"]
    )
    FINDINGS.append(
        f"engine restart: the live stream ended {stream}; requests meanwhile, in order of "
        f"first appearance: {dict(kinds)}; answered again after "
        f"{recovery['recovered_after']:.1f} s, gateway not restarted"
    )
    assert recovery["recovered_after"] is not None, recovery
    # Every refusal while the engine drains, stops and loads again says "come back", never a
    # server error of the engine's passed through (vLLM answers 500s as it drains).
    assert recovery["refusals"], "the restart went unnoticed"
    assert all(r["status"] == 503 and r["code"] == "engine_unavailable" and r["retry_after"]
               for r in recovery["refusals"]), recovery["refusals"]
    assert stream["outcome"] != "open", stream
    assert instance.show("appliance-proxy", "MainPID", "NRestarts") == proxy_before
    assert instance.wait_active("appliance-engine") == "active"  # its health check passed too


def journal(instance: Instance, *args: str) -> str:
    return instance.machine.run(["journalctl", "--no-pager", "-o", "cat", *args]).stdout


def usage_all_saved(instance: Instance, timeout: float = 60.0) -> None:
    """Until the gateway has written every answered request's usage to the key store (it
    flushes every APPLIANCE_USAGE_FLUSH_INTERVAL_S): a snapshot taken sooner misses the last
    requests, which the gateway's stop then writes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = instance.machine.run(["curl", "-sf", "http://127.0.0.1:8080/metrics"]).stdout
        if re.search(r"^appliance_usage_unsaved_requests 0(\.0)?$", metrics, re.MULTILINE):
            return
        time.sleep(1)
    raise AssertionError("the gateway kept unsaved usage for a minute")


def test_reboot_keeps_keys_and_usage_and_does_not_run_first_boot_again(instance):
    m = instance.machine
    key_before, env_before = admin_key(instance), m.run(["cat", "/etc/appliance/appliance.env"])
    usage_all_saved(instance)
    usage_before = m.run(["appliance-keys", "usage", "admin"]).stdout
    with phase("reboot: power off and boot again"):
        instance.shutdown()
        state = instance.boot(LATER_USER_DATA)
        assert instance.wait_active("appliance-engine") == "active"
    FINDINGS.append(f"second boot: system {state}")
    for unit in SERVICES:
        assert instance.wait_active(unit, 120) == "active", unit
    firstboot = instance.show("appliance-firstboot", "ConditionResult", "ActiveState")
    assert firstboot == {"ConditionResult": "no", "ActiveState": "inactive"}, firstboot
    assert admin_key(instance) == key_before
    assert m.run(["cat", "/etc/appliance/appliance.env"]).stdout == env_before.stdout
    assert m.run(["appliance-keys", "usage", "admin"]).stdout == usage_before
    listed = m.run(["appliance-keys", "list"]).stdout
    assert "image-test" in listed and "revoked" in listed, listed
    assert instance.ask("chat", key=key_before)["usage"]["completion_tokens"] > 0


def test_journal_holds_the_services_logs_and_no_secret(instance):
    engine = journal(instance, "-u", "appliance-engine")
    proxy = journal(instance, "-u", "appliance-proxy")
    assert "appliance-engine: KV cache of" in engine  # the defaults' sizing, and why
    assert "vLLM command:" in engine
    assert '"status": 200' in proxy or '"status":200' in proxy, proxy[-2000:]
    everything = journal(instance)
    for name, secret in (("admin key", admin_key(instance)), ("engine key", engine_key(instance))):
        assert secret not in everything, f"the {name} is in the journal"
    boots = instance.machine.run(["journalctl", "--list-boots", "--no-pager"]).stdout
    assert len(boots.strip().splitlines()) >= 2, "the journal did not persist across the reboot"


MODELS_FILE = "".join(
    f'[[models]]\nname = "{name}"\nsource = "{path}"\nmax_model_len = 1024\n'
    f"kv_cache_memory_bytes = {256 * 2**20}\n\n"
    for name, path in (("tiny", MODEL_DIR), ("tiny-b", SECOND_MODEL_DIR)))


def both_models_answer(instance: Instance, timeout: float = ENGINE_READY_S) -> None:
    """Each model of the models file answers a completion through the gateway, within
    ``timeout`` (its engine loads, generates its canary, and is routed to)."""
    key = admin_key(instance)
    deadline = time.monotonic() + timeout
    for model in ("tiny", "tiny-b"):
        while True:
            done = instance.machine.run([
                "curl", "--silent", "--output", "/dev/null", "--write-out", "%{http_code}",
                "--max-time", "60", "http://127.0.0.1:8080/v1/completions",
                "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json",
                "-d", json.dumps({"model": model, "prompt": "Once upon a time there was a ship",
                                  "max_tokens": 4})], check=False)
            if done.stdout == "200":
                break
            assert time.monotonic() < deadline, f"{model}: {done.stdout} {done.stderr}"
            time.sleep(3)


def engines_scraped(instance: Instance, count: int) -> dict[str, tuple[str, str, str]]:
    """Prometheus's vLLM targets on the instance (address: replica, model, health), once
    ``count`` of them are up (it re-reads the engine list first boot wrote)."""
    deadline, scraped = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        answer = json.loads(instance.machine.run(
            ["curl", "-sf", "http://127.0.0.1:9090/api/v1/targets"]).stdout)
        scraped = {t["labels"]["instance"]: (t["labels"].get("replica", ""),
                                             t["labels"].get("model", ""), t["health"])
                   for t in answer["data"]["activeTargets"] if t["labels"]["job"] == "vllm"}
        if len(scraped) == count and all(h == "up" for _, _, h in scraped.values()):
            break
        time.sleep(3)
    return scraped


def test_a_models_file_serves_both_models_after_first_boot_and_a_reboot(instance):
    """A models file of two models: first boot (run again by hand, as after editing the file)
    switches the single engine off and one appliance-engine@N on per replica; both models are
    served, and again after a reboot."""
    m = instance.machine
    (instance.root / "etc/appliance/models.toml").write_text(MODELS_FILE)
    with phase("first boot again with a models file: two engine units"):
        m.run(["env", f"APPLIANCE_FIRSTBOOT_IMDS_URL=http://127.0.0.1:{IMDS_PORT}",
               "appliance-firstboot", "--skip-tls"], timeout=600)
        m.run(["systemctl", "restart", "appliance-proxy"])
        both_models_answer(instance)
    env = m.run(["cat", "/etc/appliance/appliance.env"]).stdout
    assert "APPLIANCE_ENGINE_URLS=http://127.0.0.1:8000,http://127.0.0.1:8001" in env, env
    scraped = engines_scraped(instance, count=2)
    assert scraped == {"127.0.0.1:8000": ("0", "tiny", "up"),
                       "127.0.0.1:8001": ("1", "tiny-b", "up")}, scraped
    FINDINGS.append(f"prometheus with a models file: engines scraped {scraped}")
    status = m.run(["appliance-status"], check=False, timeout=120)
    assert status.returncode == 0 and "READY" in status.stdout, status.stdout + status.stderr
    for replica in ("appliance-engine@0.service", "appliance-engine@1.service"):
        assert re.search(rf"^{re.escape(replica)} .*\bactive running", status.stdout, re.M), \
            status.stdout
    for port in (8000, 8001):
        assert f"http://127.0.0.1:{port}/health -> 200" in status.stdout, status.stdout
    single = m.run(["systemctl", "is-active", "appliance-engine"], check=False).stdout.strip()
    assert single == "inactive", single
    with phase("reboot with the models file"):
        instance.shutdown()
        instance.boot(LATER_USER_DATA)
        for unit in ("appliance-engine@0", "appliance-engine@1", "appliance-proxy", "nginx"):
            assert instance.wait_active(unit, 120) == "active", unit
        both_models_answer(instance)
    single = instance.show("appliance-engine", "ConditionResult", "ActiveState")
    assert single == {"ConditionResult": "no", "ActiveState": "inactive"}, single
