"""Every knob of the appliance's operations programs (idle stop, spot watch), read from
``APPLIANCE_*`` environment variables like the gateway's and the engine's.

The host's units load ``/etc/appliance/appliance.env`` (root only) with ``EnvironmentFile``;
the process environment wins, and ``APPLIANCE_ENV_FILE`` points elsewhere in development.
"""

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_FILE = Path("/etc/appliance/appliance.env")


def readable_env_file() -> Path | None:
    path = Path(os.environ.get("APPLIANCE_ENV_FILE") or ENV_FILE)
    return path if os.access(path, os.R_OK) else None


class OpsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", extra="ignore")

    idle_stop_minutes: float = Field(0.0, ge=0)
    """Power off after this long without a generation request answered and without an SSH
    session; 0 (the default) never does."""
    idle_stop_ignores_batches: bool = False
    """Power off even while batch lines wait to run (they resume at the next boot); by
    default a batch still running keeps the appliance up."""
    idle_stop_command: str = "systemctl poweroff"
    """What powering off runs (shell words, no shell)."""
    ssh_port: int = Field(22, gt=0, lt=65536)
    """The port whose established connections count as SSH sessions."""

    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080
    """The gateway, as ``appliance-proxy`` reads the same two variables."""

    imds_url: str = "http://169.254.169.254"
    """EC2's instance metadata service (IMDSv2)."""
    spot_poll_interval_s: float = Field(5.0, gt=0)
    """How often the spot watch asks for an interruption notice (AWS suggests every 5 s)."""

    log_level: str = "info"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.proxy_host}:{self.proxy_port}"


def load_settings() -> OpsSettings:
    return OpsSettings(_env_file=readable_env_file())
