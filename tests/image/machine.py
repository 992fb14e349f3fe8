"""A root file system booted under systemd-nspawn, driven from the host without a systemd of
its own: commands enter the container's namespaces with ``nsenter``, as an SSH session would.

Always ``--private-network``: the image's provisioners enable a firewall, which in the host's
network namespace would rewrite the host's own. Always the unified cgroup hierarchy (cgroup v2)
and the ``bpf()`` system call, as on the real image: systemd enforces ``IPAddressDeny=`` and
``DevicePolicy=`` with BPF programs on cgroup v2, and without either (nspawn's defaults on a host
with the hybrid layout, like this project's build machine) those directives silently do
nothing, while ``systemctl show`` and ``systemd-analyze security`` still count them.
"""

import os
import subprocess
import time
from pathlib import Path

from tests.image.rootfs import NSPAWN

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Machine:
    def __init__(self, root: Path, name: str, console: Path, binds: tuple[str, ...] = ()):
        self.root, self.name, self.console, self.binds = root, name, console, binds
        self.proc: subprocess.Popen | None = None
        self.leader = 0

    def boot(self, timeout: float = 60.0) -> None:
        """Start systemd as the container's PID 1 and find it in the host's PID namespace."""
        argv = [*NSPAWN, "--quiet", "--boot", "--console=passive", "--system-call-filter=bpf",
                f"--machine={self.name}", "-D", str(self.root), *self.binds]  # fmt: skip
        log = open(self.console, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}: {self.console}")
            self.leader = self._leader()
            if self.leader:
                return
            time.sleep(0.05)
        raise TimeoutError(f"no init process under systemd-nspawn in {timeout}s")

    def _leader(self) -> int:
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields.get("PPid", "").strip() == str(self.proc.pid):
                # Until it has exec'd, the child is still systemd-nspawn's own code.
                return int(entry.name) if fields.get("Name", "").strip() == "systemd" else 0
        return 0

    def command(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """``argv`` run inside, as root, with a clean environment plus ``env``."""
        variables = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        return ["nsenter", "-t", str(self.leader), "-a", "--", "/usr/bin/env", "-i",
                *(f"{k}={v}" for k, v in variables.items()), *argv]  # fmt: skip

    def run(
        self, argv: list[str], env: dict[str, str] | None = None, check: bool = True,
        timeout: float = 600.0, input: str | None = None,
    ) -> subprocess.CompletedProcess:  # fmt: skip
        done = subprocess.run(
            self.command(argv, env), capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{argv} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}"
                f"\n--- stderr\n{done.stderr[-4000:]}"
            )
        return done

    def in_netns(self, argv: list[str]) -> list[str]:
        """``argv`` from the host's file system, in the container's network namespace only."""
        return ["nsenter", "-t", str(self.leader), "-n", "--", *argv]

    def wait_booted(self, timeout: float = 300.0) -> str:
        """Wait for the boot to finish: ``running``, or ``degraded`` when a unit failed."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            done = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                            timeout=timeout)  # fmt: skip
            state = done.stdout.strip()
            if state not in ("offline", "unknown", ""):  # the manager is not up yet
                return state
            time.sleep(0.2)
        return state

    def poweroff(self, timeout: float = 180.0) -> None:
        assert self.proc is not None
        self.run(["systemctl", "poweroff"], check=False, timeout=30)
        self.proc.wait(timeout)
        self.leader = 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(30)

    def __enter__(self) -> "Machine":
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.poweroff()
            except Exception:
                self.kill()
