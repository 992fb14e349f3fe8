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
import re
import secrets

SALT_FIELD = "cache_salt"
OPENING = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*(?=")')
"""A body's ``{`` and what precedes its first field's name."""


class CacheSalts:
    """The salt of each key, computed once per identity."""

    def __init__(self, secret: str) -> None:
        self.secret = (secret or secrets.token_hex(32)).encode()
        self.salts: dict[str, str] = {}
        self.prefixes: dict[str, bytes] = {}

    def salt_for(self, name: str, group: str | None = None) -> str:
        """The salt of key ``name``, or of its cache group when it is in one."""
        identity = f"group:{group}" if group else f"key:{name}"
        salt = self.salts.get(identity)
        if salt is None:
            digest = hmac.new(self.secret, identity.encode(), hashlib.sha256).digest()
            salt = self.salts[identity] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
            self.prefixes[salt] = b'{"%s": "%s", ' % (SALT_FIELD.encode(), salt.encode())
        return salt

    def salted(self, body: dict, raw: bytes, salt: str) -> bytes:
        """The request's bytes with ``cache_salt`` set to ``salt`` (one of this object's).

        The field goes in front of the client's own bytes, which are left as they are (no
        re-encode on every request); a body that already names a salt, or whose bytes do not
        start plainly with ``{`` and a first field (another encoding, an empty object), is
        re-encoded instead.
        """
        opening = OPENING.match(raw)
        if opening is not None and SALT_FIELD not in body:
            return self.prefixes[salt] + raw[opening.end():]
        return json.dumps({**body, SALT_FIELD: salt}, ensure_ascii=False).encode()

