"""The engine's internal key: made once on first start and kept in the env file.

vLLM requires it on every ``/v1`` request and only the proxy (which reads the same file) sends
it, so nothing else on the host can reach the engine around the gateway's client keys.
"""

import os
import secrets
from pathlib import Path

SETTING = "APPLIANCE_ENGINE_API_KEY"


class KeyFileError(Exception):
    """The key is not set and cannot be written to the env file."""


def ensure_internal_key(env_file: Path) -> str:
    """Generate a key and store it in ``env_file``, replacing an empty assignment.

    A new file is made mode 0600; an existing one keeps its mode and owner.
    """
    key = secrets.token_urlsafe(32)
    try:
        lines = env_file.read_text().splitlines() if env_file.exists() else []
        kept = [line for line in lines if not line.strip().startswith(f"{SETTING}=")]
        kept.append(f"{SETTING}={key}")
        tmp = env_file.with_name(env_file.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(kept) + "\n")
        if env_file.exists():
            old = env_file.stat()
            os.chmod(tmp, old.st_mode & 0o777)
            os.chown(tmp, old.st_uid, old.st_gid)
        tmp.replace(env_file)
    except OSError as exc:
        raise KeyFileError(
            f"{SETTING} is not set and {env_file} cannot be written ({exc.strerror}): set it, "
            "or start the engine once as a user who may write that file"
        ) from exc
    return key
