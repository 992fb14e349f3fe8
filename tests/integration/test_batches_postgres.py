"""The batch tables in a real PostgreSQL (the same SQL as SQLite's, its own schema step), and a
batch run by two gateways sharing one store: the lease lets one run it, each line once."""

import httpx
import pytest

from proxy.keys.postgres import PostgresKeyStore
from tests.integration.proxy_stack import gateway
from tests.integration.test_batches import batch_file, runs_of, start, wait_status
from tests.stores import postgres
from tests.unit import test_batch_jobs


@pytest.fixture(scope="module")
def pg():
    with postgres() as server:
        yield server


@pytest.fixture
def keys_url(pg):
    return pg.new_database()


@pytest.fixture
def tables(keys_url):
    store = PostgresKeyStore(keys_url, pool_size=1)
    yield store.jobs()
    store.close()


@pytest.mark.parametrize("check", [
    test_batch_jobs.test_a_line_result_is_written_once_however_often_it_is_reported,
    test_batch_jobs.test_a_lease_is_held_by_one_runner_until_it_runs_out,
    test_batch_jobs.test_a_batch_of_another_host_is_not_taken,
    test_batch_jobs.test_a_status_moves_only_from_the_one_read,
    test_batch_jobs.test_pages_run_newest_first_and_continue_after_an_id,
], ids=lambda check: check.__name__.removeprefix("test_"))
def test_batch_tables_behave_as_on_sqlite(tables, check):
    check(tables)


def test_two_gateways_on_one_store_run_each_line_once(fake, tmp_path, keys_url):
    settings = {"keys_url": keys_url, "batch_dir": tmp_path / "batches",
                "batch_poll_interval_s": 0.1, "batch_max_slots": 2}
    with gateway(fake.url, tmp_path, **settings) as a, gateway(fake.url, tmp_path, **settings) as b:
        client = a.client("alice")
        batches = [start(client, batch_file(8, f"pg{n}", delay=0.05)) for n in range(3)]
        b.keys["alice"] = a.keys["alice"]
        other = b.client("alice")  # the same key, asked through the other gateway
        for batch in batches:
            assert wait_status(other, batch.id, ("completed",)).request_counts.completed == 8
    for n in range(3):
        assert runs_of(fake, f"pg{n}") == {f"pg{n}-{i}": 1 for i in range(8)}


def test_ids_and_names_postgres_cannot_store_are_answered_not_failed(fake, tmp_path, keys_url):
    """PostgreSQL refuses a NUL in a string with an error: an id with one names nothing (404,
    or an empty page after it), and an uploaded file's name loses it."""
    with gateway(fake.url, tmp_path, keys_url=keys_url,
                 batch_dir=tmp_path / "batches") as gw:
        headers = gw.headers("nul")
        for method, path in (("GET", "/v1/files/file-%00"), ("DELETE", "/v1/files/a%00"),
                             ("GET", "/v1/files/a%00/content"), ("GET", "/v1/batches/b%00"),
                             ("POST", "/v1/batches/b%00/cancel")):
            assert httpx.request(method, gw.url + path, headers=headers).status_code == 404
        for query in ("/v1/files?after=%00", "/v1/files?purpose=%00", "/v1/batches?after=%00"):
            answer = httpx.get(gw.url + query, headers=headers)
            assert answer.status_code == 200 and answer.json()["data"] == []
        created = httpx.post(gw.url + "/v1/batches", headers=headers, json={
            "input_file_id": "file-\x00", "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        assert created.status_code == 404
        body = (b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a\x00.jsonl"'
                b'\r\n\r\n' + batch_file(1, "nul") + b'\r\n--XX--\r\n')
        uploaded = httpx.post(gw.url + "/v1/files", content=body, headers={
            **headers, "content-type": "multipart/form-data; boundary=XX"})
        assert uploaded.status_code == 200 and uploaded.json()["filename"] == "a.jsonl"
