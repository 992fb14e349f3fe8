import pytest

from tests.integration.proxy_stack import engine, gateway


@pytest.fixture(scope="session")
def fake():
    with engine() as e:
        yield e


@pytest.fixture(scope="session")
def gw(fake, tmp_path_factory):
    with gateway(fake.url, tmp_path_factory.mktemp("gw")) as p:
        yield p


@pytest.fixture(scope="session")
def tight(fake, tmp_path_factory):
    """A proxy with deadlines short enough to cross in a test."""
    with gateway(fake.url, tmp_path_factory.mktemp("tight"), timeout_base_s=0.5,
                 timeout_per_token_s=0, stream_first_token_timeout_s=0.5,
                 stream_idle_timeout_s=0.5, max_body_bytes=4096) as p:
        yield p
