"""A real fake engine and a real proxy on loopback, with keys made by the real CLI."""

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.servers import VENV_BIN, fake_engine, free_port, proxy, running

ENGINE_KEY = "internal-engine-key"


def make_key(db: Path | str, name: str, *options: str) -> str:
    out = keys_cli(db, "create", "--name", name, *options)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def keys_cli(db: Path | str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "appliance-keys"), "--db", str(db), *args],
                          capture_output=True, text=True)


@dataclass
class Engine:
    url: str
    proc: subprocess.Popen

    def stats(self) -> dict:
        return httpx.get(self.url + "/fake/stats").json()


@contextlib.contextmanager
def engine(*extra: str, port: int | None = None) -> Iterator[Engine]:
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with running(fake_engine(port, "--api-key", ENGINE_KEY, *extra), ready_url=url + "/fake/stats",
                 ) as proc:
        yield Engine(url, proc)


@dataclass
class Proxy:
    url: str
    db: Path | str
    """The key store: a SQLite file, or the PostgreSQL URL several gateways share."""
    log: Path
    keys: dict[str, str] = field(default_factory=dict)

    def key(self, name: str, *options: str) -> str:
        if name not in self.keys:
            self.keys[name] = make_key(self.db, name, *options)
        return self.keys[name]

    def headers(self, name: str = "default") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(name)}"}

    def client(self, name: str = "default", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key(name), max_retries=0,
                             **kwargs)


@contextlib.contextmanager
def gateway(engine_url: str, workdir: Path, db_dir: Path | None = None,
            **settings: object) -> Iterator[Proxy]:
    port = free_port()
    file = (db_dir or workdir) / f"keys-{port}.db"
    db = settings.get("keys_url") or file
    log = workdir / f"proxy-{port}.log"
    env = {"APPLIANCE_ENGINE_URL": engine_url, "APPLIANCE_ENGINE_API_KEY": ENGINE_KEY,
           "APPLIANCE_KEYS_DB": str(file), "APPLIANCE_USAGE_FLUSH_INTERVAL_S": "0.2",
           "APPLIANCE_PROXY_WORKERS": "1"}
    env |= {f"APPLIANCE_{k.upper()}": str(v) for k, v in settings.items()}
    url = f"http://127.0.0.1:{port}"
    with running(proxy(port), ready_url=url + "/health", env=env, log=log):
        yield Proxy(url, db, log)
