"""Prefix-cache isolation: every key (or cache group) gets a ``cache_salt`` of its own.

vLLM's prefix cache answers a prompt that starts like an earlier one faster, which lets one
tenant time another's prompts (vLLM's advisory CVE-2025-46570). Its remedy is ``cache_salt``:
blocks hashed with different salts are never shared. The salt must come from a trusted layer,
so the gateway sets it on every generation request and replaces any the client sent: a client
that guessed another key's salt would otherwise join its cache. Within one key (or the keys an
operator put in one ``--cache-group``) the cache is still shared, so repeats stay fast.

A salt is an HMAC of the key's identity under a secret only the gateway knows, the same in
every worker and across restarts (so caches survive them) and impossible to derive from a name.
"""

import base64
import hashlib
import hmac
import json
import secrets

SALT_FIELD = "cache_salt"
BLANK = b" \t\r\n"


class CacheSalts:
    """The salt of each key, computed once per identity."""

    def __init__(self, secret: str) -> None:
        self.secret = (secret or secrets.token_hex(32)).encode()
        self.salts: dict[str, str] = {}

    def salt_for(self, name: str, group: str | None = None) -> str:
        """The salt of key ``name``, or of its cache group when it is in one."""
        identity = f"group:{group}" if group else f"key:{name}"
        salt = self.salts.get(identity)
        if salt is None:
            digest = hmac.new(self.secret, identity.encode(), hashlib.sha256).digest()
            salt = self.salts[identity] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        return salt


def with_cache_salt(body: dict, raw: bytes, salt: str) -> bytes:
    """The request's bytes with ``cache_salt`` set to ``salt``.

    The field goes in front of the client's own bytes, which are left as they are (no re-encode
    on every request); a body that already names a salt, or whose bytes do not start plainly
    with ``{`` and a first field (another encoding, an empty object), is re-encoded instead.
    """
    head = raw.lstrip(BLANK)
    if SALT_FIELD not in body and head[:1] == b"{" and head[1:].lstrip(BLANK)[:1] == b'"':
        return b'{"' + SALT_FIELD.encode() + b'": "' + salt.encode() + b'", ' + head[1:]
    return json.dumps({**body, SALT_FIELD: salt}, ensure_ascii=False).encode()
