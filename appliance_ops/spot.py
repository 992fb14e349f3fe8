"""EC2 spot interruption notices, from IMDSv2's ``spot/instance-action``.

Until AWS decides to interrupt the instance that path answers 404; from then on (two minutes
before the action) it answers ``{"action": "terminate"|"stop"|"hibernate", "time": ...}``.
"""

import json
from dataclasses import dataclass

import httpx

TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600


@dataclass(frozen=True)
class Notice:
    action: str
    time: str

    @property
    def reason(self) -> str:
        return f"spot interruption notice: {self.action} at {self.time}"


def notice_from(status: int, body: bytes) -> Notice | None:
    """Pure: the notice an answer of ``spot/instance-action`` carries, if any."""
    if status == 404:
        return None
    if status != 200:
        raise ValueError(f"IMDS answered {status} for spot/instance-action")
    data = json.loads(body)
    return Notice(str(data["action"]), str(data.get("time", "unknown time")))


class Imds:
    """IMDSv2: a session token first (PUT), then reads with it; a new token when refused."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.token: str | None = None

    async def _token(self) -> str:
        response = await self.client.put(
            self.base_url + TOKEN_PATH,
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
        response.raise_for_status()
        return response.text

    async def instance_action(self) -> Notice | None:
        for _ in range(2):
            if self.token is None:
                self.token = await self._token()
            response = await self.client.get(self.base_url + ACTION_PATH,
                                              headers={"X-aws-ec2-metadata-token": self.token})
            if response.status_code == 401:
                self.token = None
                continue
            return notice_from(response.status_code, response.content)
        raise ValueError("IMDS refused a fresh token")
