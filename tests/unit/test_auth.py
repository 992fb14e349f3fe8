"""Authenticator: bearer parsing, caching with a short life, one store lookup per burst."""

import asyncio
import time

import pytest

from proxy.keys.auth import Authenticator, bearer_secret
from proxy.keys.backends import open_store
from proxy.keys.sqlite import SqliteKeyStore as KeyStore
from proxy.protocol.errors import ProxyError


@pytest.mark.parametrize(("header", "secret"), [(b"Bearer abc", "abc"), (b"bearer  abc ", "abc"),
                                                (b"Basic abc", None), (b"Bearer ", None),
                                                (None, None)])
def test_bearer_secret(header, secret):
    assert bearer_secret(header) == secret


def test_a_burst_of_requests_shares_one_store_lookup(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    secret = store.create("alice")
    auth = Authenticator(lambda: open_store(tmp_path / "keys.db", create=False), ttl=0.5)
    lookups = []
    real_lookup = auth._lookup

    def counted(value):
        lookups.append(value)
        time.sleep(0.05)
        return real_lookup(value)

    auth._lookup = counted

    async def burst():
        header = f"Bearer {secret}".encode()
        keys = await asyncio.gather(*(auth.authenticate(header) for _ in range(64)))
        assert {k.name for k in keys} == {"alice"}

    asyncio.run(burst())
    assert len(lookups) == 1


def test_revocation_is_seen_once_the_cache_entry_expires(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    secret = store.create("alice")
    auth = Authenticator(lambda: open_store(tmp_path / "keys.db", create=False), ttl=0.1)
    header = f"Bearer {secret}".encode()

    async def check():
        assert (await auth.authenticate(header)).name == "alice"
        store.revoke("alice")
        await asyncio.sleep(0.15)
        with pytest.raises(ProxyError) as refused:
            await auth.authenticate(header)
        assert refused.value.status == 401 and "revoked" in refused.value.message

    asyncio.run(check())
