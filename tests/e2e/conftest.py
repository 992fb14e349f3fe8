"""The real engine and proxy, started once for the e2e package and stopped when it is done,
so the rest of the suite does not share the machine's two cores and RAM with an idle vLLM."""

import pytest

from tests.e2e.engine_stack import MAX_NUM_SEQS, engine, make_tiny_model
from tests.integration.proxy_stack import gateway


@pytest.fixture(scope="package")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="package")
def vllm(tiny_model, tmp_path_factory):
    """One real vLLM for these tests, tensor-parallel size 1, batch ``MAX_NUM_SEQS``.

    It logs each request's start and end (``--enable-log-requests``), so that a test can read
    from vLLM itself that a request was aborted: this vLLM counts no client abort in /metrics.
    """
    with engine(tiny_model, tmp_path_factory.mktemp("engine"),
                max_num_seqs=MAX_NUM_SEQS, engine_extra_args="--enable-log-requests") as e:
        yield e


@pytest.fixture(scope="package")
def gw(vllm, tmp_path_factory):
    """The real proxy in front of it, holding the engine's generated internal key and, as
    ``make run`` and the appliance give it, the engine's batch size."""
    with gateway(vllm.url, tmp_path_factory.mktemp("e2e-gw"), engine_api_key=vllm.key,
                 max_num_seqs=MAX_NUM_SEQS) as p:
        yield p
