"""The Files and Batches APIs on the fake engine, through the real ``openai`` SDK: a batch from
upload to results, its error file, a cancel, tenancy, billing, and restarts that lose nothing
and repeat nothing (the fake engine counts each line's request by its ``user`` tag)."""

import contextlib
import io
import json
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.integration.proxy_stack import ENGINE_KEY, keys_cli, make_key
from tests.servers import free_port, proxy, running, wait_http


def batch_file(count: int, tag: str, delay: float = 0.0, failing: frozenset[int] = frozenset(),
               url: str = "/v1/chat/completions", model: str = "fake-model") -> bytes:
    lines = []
    for i in range(count):
        body = {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}],
                "max_tokens": 3, "user": f"{tag}-{i}"}
        fake = {}
        if delay:
            fake["delay"] = delay
        if i in failing:
            fake["status"] = 400
        if fake:
            body["fake"] = fake
        lines.append(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": url,
                                 "body": body}))
    return ("\n".join(lines) + "\n").encode()


class Box:
    """A gateway whose key store and batch directory outlive it: it can be restarted."""

    def __init__(self, engine_url: str, workdir: Path, **settings: object) -> None:
        self.engine_url = engine_url
        self.workdir = workdir
        self.db = workdir / "keys.db"
        self.settings = {"batch_dir": workdir / "batches", "batch_poll_interval_s": 0.1,
                         "batch_lease_s": 1.5, "usage_flush_interval_s": 0.2, **settings}
        self.secrets: dict[str, str] = {}
        self.url = ""
        self.proc = None

    @contextlib.contextmanager
    def up(self):
        port = free_port()
        env = {"APPLIANCE_ENGINE_URL": self.engine_url, "APPLIANCE_ENGINE_API_KEY": ENGINE_KEY,
               "APPLIANCE_KEYS_DB": str(self.db), "APPLIANCE_PROXY_WORKERS": "1",
               "APPLIANCE_ENGINE_CONCURRENCY": "16",
               **{f"APPLIANCE_{k.upper()}": str(v) for k, v in self.settings.items()}}
        self.url = f"http://127.0.0.1:{port}"
        with running(proxy(port), ready_url=self.url + "/health", env=env,
                     log=self.workdir / "proxy.log") as proc:
            self.proc = proc
            yield self

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def client(self, name: str = "alice", *options: str) -> openai.OpenAI:
        if name not in self.secrets:
            self.secrets[name] = make_key(self.db, name, *options)
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.secrets[name],
                             max_retries=0)


@pytest.fixture
def box(fake, tmp_path):
    box = Box(fake.url, tmp_path, batch_max_slots=4)
    with box.up():
        yield box


def upload(client: openai.OpenAI, data: bytes):
    return client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")


def start(client: openai.OpenAI, data: bytes, **extra):
    uploaded = upload(client, data)
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", **extra)


def wait_status(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...],
                timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} is still {batch.status}")


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def runs_of(fake, tag: str) -> dict[str, int]:
    return {user: n for user, n in fake.stats()["by_user"].items()
            if user.startswith(tag + "-")}


def test_a_batch_runs_from_upload_to_results_with_every_line_once(box, fake):
    client = box.client()
    batch = start(client, batch_file(12, "happy"), metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.request_counts.total == 12
    assert batch.metadata == {"job": "nightly"}
    done = wait_status(client, batch.id, ("completed", "failed"))
    assert done.status == "completed", done
    assert done.request_counts.completed == 12 and done.request_counts.failed == 0
    assert done.error_file_id is None
    results = lines_of(client, done.output_file_id)
    assert sorted(r["custom_id"] for r in results) == sorted(f"happy-{i}" for i in range(12))
    first = results[0]
    assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["object"] == "chat.completion"
    assert first["response"]["request_id"] == first["id"]
    assert runs_of(fake, "happy") == {f"happy-{i}": 1 for i in range(12)}
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    listed = client.batches.list(limit=5)
    assert [b.id for b in listed.data] == [batch.id]


def test_usage_of_batch_lines_is_billed_to_the_key_and_shown_apart(box):
    client = box.client("biller")
    batch = start(client, batch_file(4, "bill"))
    wait_status(client, batch.id, ("completed",))
    time.sleep(0.5)  # the usage flush
    out = keys_cli(box.db, "usage", "biller")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[0].split(), out.stdout.splitlines()[-1].split()
    values = dict(zip(header, row, strict=True))
    assert values["REQUESTS"] == "4" and values["COMPLETION"] == "12"
    # every one of the key's tokens came from its batch lines, billed like live requests
    assert int(values["BATCH"]) == int(values["PROMPT"]) + int(values["COMPLETION"]) > 12


def test_failing_lines_go_to_the_error_file(box):
    client = box.client()
    batch = start(client, batch_file(5, "mixed", failing=frozenset({1, 3})))
    done = wait_status(client, batch.id, ("completed",))
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 2)
    errors = lines_of(client, done.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == ["mixed-1", "mixed-3"]
    assert all(e["response"]["status_code"] == 400 and e["response"]["body"]["error"]
               for e in errors)
    assert len(lines_of(client, done.output_file_id)) == 3


def test_a_model_the_key_may_not_use_is_refused_naming_the_line(box):
    client = box.client("narrow", "--models", "fake-model")
    data = batch_file(2, "ok") + batch_file(1, "bad", model="other-model")
    with pytest.raises(openai.BadRequestError) as caught:
        upload(client, data)
    assert "line 3:" in caught.value.message and "other-model" in caught.value.message
    assert caught.value.code == "invalid_batch_file"


def test_a_model_taken_from_the_key_while_its_batch_runs_fails_the_lines_after(box):
    client = box.client("shrinking")
    batch = start(client, batch_file(24, "shrink", delay=0.4))  # 4 at a time: 2.4 s
    wait_status(client, batch.id, ("in_progress",))
    out = keys_cli(box.db, "update", "shrinking", "--models", "some-other-model")
    assert out.returncode == 0, out.stderr
    done = wait_status(client, batch.id, ("completed",))
    errors = lines_of(client, done.error_file_id)
    assert errors and all(e["response"]["status_code"] == 404 and
                          e["response"]["body"]["error"]["code"] == "model_not_found"
                          for e in errors)
    assert done.request_counts.completed + done.request_counts.failed == 24


def test_cancel_mid_way_keeps_what_is_done(box, fake):
    client = box.client()
    batch = start(client, batch_file(20, "cancel", delay=0.3))
    deadline = time.monotonic() + 10
    while client.batches.retrieve(batch.id).request_counts.completed < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_status(client, batch.id, ("cancelled",))
    assert done.cancelled_at is not None
    assert 4 <= done.request_counts.completed < 20
    results = lines_of(client, done.output_file_id)
    assert len(results) == done.request_counts.completed
    assert sum(runs_of(fake, "cancel").values()) == done.request_counts.completed
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_another_keys_files_and_batches_are_missing_to_it(box):
    owner, other = box.client(), box.client("mallory")
    uploaded = upload(owner, batch_file(1, "mine"))
    batch = owner.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
    for call in (lambda: other.files.retrieve(uploaded.id),
                 lambda: other.files.content(uploaded.id),
                 lambda: other.files.delete(uploaded.id),
                 lambda: other.batches.retrieve(batch.id),
                 lambda: other.batches.cancel(batch.id),
                 lambda: other.batches.create(input_file_id=uploaded.id,
                                              endpoint="/v1/chat/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.files.list().data == [] and other.batches.list().data == []
    assert owner.files.retrieve(uploaded.id).id == uploaded.id


def test_files_list_get_content_and_delete(box):
    client = box.client("filer")
    data = batch_file(2, "files")
    uploaded = upload(client, data)
    assert uploaded.bytes == len(data) and uploaded.filename == "requests.jsonl"
    assert client.files.content(uploaded.id).content == data
    assert [f.id for f in client.files.list(purpose="batch").data] == [uploaded.id]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_bad_uploads_and_batch_requests_are_refused(box):
    client = box.client()
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", io.BytesIO(batch_file(1, "p"))),
                            purpose="fine-tune")
    uploaded = upload(client, batch_file(1, "e"))
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                              completion_window="1h")
    with pytest.raises(openai.BadRequestError, match="line 1: url"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                              completion_window="24h")
    response = httpx.get(box.url + "/v1/batches", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    key = {"Authorization": f"Bearer {box.secrets['alice']}"}
    for window in ({}, [], 24):  # found by schemathesis: a dict was looked up, and raised
        response = httpx.post(box.url + "/v1/batches", headers=key, json={
            "input_file_id": uploaded.id, "endpoint": "/v1/chat/completions",
            "completion_window": window})
        assert response.status_code == 400, response.text
    for limit in ("²", "0", "-1", "1e3"):  # "²".isdigit(), but int("²") raises
        response = httpx.get(box.url + "/v1/batches", params={"limit": limit}, headers=key)
        assert response.status_code == 400, response.text


def test_too_large_a_file_is_refused(fake, tmp_path):
    box = Box(fake.url, tmp_path, batch_max_file_bytes=2048)
    with box.up(), pytest.raises(openai.APIStatusError) as caught:
        upload(box.client(), batch_file(40, "big"))
    assert caught.value.status_code == 413


def test_a_key_may_have_only_so_many_batches_unfinished(fake, tmp_path):
    box = Box(fake.url, tmp_path, batch_max_in_progress_per_key=1)
    with box.up():
        client = box.client()
        start(client, batch_file(10, "slow", delay=0.5))
        with pytest.raises(openai.RateLimitError, match="unfinished"):
            start(client, batch_file(1, "second"))


@pytest.mark.parametrize("how", ["terminate", "kill -9"])
def test_a_restart_resumes_with_every_line_exactly_once(fake, tmp_path, how):
    tag = "restart" if how == "terminate" else "killed"
    box = Box(fake.url, tmp_path, batch_max_slots=3)
    with box.up():
        client = box.client()
        batch = start(client, batch_file(24, tag, delay=0.2))
        deadline = time.monotonic() + 10
        while client.batches.retrieve(batch.id).request_counts.completed < 6:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        if how == "kill -9":
            box.kill()
    partial = sum(runs_of(fake, tag).values())
    assert 6 <= partial < 24
    with box.up():
        done = wait_status(box.client(), batch.id, ("completed",), timeout=60)
        results = lines_of(box.client(), done.output_file_id)
    assert done.request_counts.completed == 24
    assert runs_of(fake, tag) == {f"{tag}-{i}": 1 for i in range(24)}
    assert sorted(r["custom_id"] for r in results) == sorted(f"{tag}-{i}" for i in range(24))


def test_drain_takes_no_new_lines_and_a_restart_finishes_the_batch(fake, tmp_path):
    box = Box(fake.url, tmp_path, batch_max_slots=2)
    with box.up():
        client = box.client()
        batch = start(client, batch_file(20, "drain", delay=0.3))
        deadline = time.monotonic() + 10
        while client.batches.retrieve(batch.id).request_counts.completed < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(box.url + "/drain", json={"reason": "test"}).status_code == 200
        time.sleep(1.0)  # the lines running when the drain came (2, 0.3 s each) finish
        settled = client.batches.retrieve(batch.id)
        time.sleep(1.0)
        still = client.batches.retrieve(batch.id)
        assert still.status == "in_progress"
        assert still.request_counts.completed == settled.request_counts.completed < 20
    with box.up():
        done = wait_status(box.client(), batch.id, ("completed",), timeout=60)
    assert runs_of(fake, "drain") == {f"drain-{i}": 1 for i in range(20)}
    assert done.request_counts.completed == 20


def test_a_batch_past_its_window_expires_with_what_is_done(fake, tmp_path):
    box = Box(fake.url, tmp_path, batch_max_slots=2)
    with box.up():
        client = box.client()
        batch = start(client, batch_file(30, "expire", delay=0.3))
        deadline = time.monotonic() + 10
        while client.batches.retrieve(batch.id).request_counts.completed < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # Its window ends while the gateway is down (as it would after a long stop).
    with contextlib.closing(sqlite3.connect(box.db)) as db, db:
        db.execute("UPDATE batches SET expires_at = ? WHERE id = ?", (time.time(), batch.id))
    with box.up():
        client = box.client()
        done = wait_status(client, batch.id, ("expired",))
        output = lines_of(client, done.output_file_id)
        errors = lines_of(client, done.error_file_id)
    assert done.expired_at is not None
    assert len(output) == done.request_counts.completed >= 4
    assert len(output) + len(errors) == 30
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["response"] is None for e in errors)
    assert sum(runs_of(fake, "expire").values()) == len(output)


def test_with_two_workers_each_line_runs_once(fake, tmp_path):
    box = Box(fake.url, tmp_path, batch_max_slots=2, proxy_workers=2)
    with box.up():
        client = box.client()
        batches = [start(client, batch_file(10, f"pair{n}", delay=0.05)) for n in range(3)]
        for batch in batches:
            assert wait_status(client, batch.id, ("completed",)).request_counts.completed == 10
    for n in range(3):
        assert runs_of(fake, f"pair{n}") == {f"pair{n}-{i}": 1 for i in range(10)}


def test_with_two_workers_a_batch_gives_way_to_live_traffic_in_the_other_one(fake, tmp_path):
    """Live traffic to a key of worker 0 holds back a batch run by worker 1 on the same engine
    (the live board), until it has gone and lingered."""
    box = Box(fake.url, tmp_path, batch_max_slots=2, proxy_workers=2,
              batch_poll_interval_s=60)  # the batch runs in the worker it was created in
    with box.up():
        other = box.url.rsplit(":", 1)[0] + f":{int(box.url.rsplit(':', 1)[1]) + 1}"
        wait_http(other + "/health")
        live, batches = box.client("interactive"), box.client()
        batches.base_url = other + "/v1"
        stop, flowing = threading.Event(), threading.Event()

        def keep_asking() -> None:
            while not stop.is_set():
                live.chat.completions.create(model="fake-model", max_tokens=2, user="live",
                                             messages=[{"role": "user", "content": "now"}],
                                             extra_body={"fake": {"delay": 0.2}})
                flowing.set()

        with ThreadPoolExecutor(1) as pool:
            asking = pool.submit(keep_asking)
            try:
                assert flowing.wait(30)  # live traffic runs (a slow machine's first request)
                batch = start(batches, batch_file(4, "aside"))
                time.sleep(2.0)
                assert runs_of(fake, "aside") == {}
                assert batches.batches.retrieve(batch.id).status == "in_progress"
            finally:
                stop.set()
            asking.result()
        assert wait_status(batches, batch.id, ("completed",), timeout=60).request_counts \
            .completed == 4
    assert runs_of(fake, "aside") == {f"aside-{i}": 1 for i in range(4)}


def test_a_batch_cancelled_before_it_starts_ends_cancelled_with_nothing_run(fake, tmp_path):
    box = Box(fake.url, tmp_path, batch_max_in_progress_per_key=2, batch_max_slots=1)
    with box.up():
        client = box.client()
        held = start(client, batch_file(1, "ahead", delay=2.0))
        box.kill()  # the batch is stored, but nobody runs it
    with contextlib.closing(sqlite3.connect(box.db)) as db, db:
        db.execute("UPDATE batches SET status = 'cancelling' WHERE id = ?", (held.id,))
    with box.up():
        done = wait_status(box.client(), held.id, ("cancelled",))
    assert done.request_counts.completed == 0 and done.output_file_id is None
    assert runs_of(fake, "ahead") == {}


def test_live_requests_go_before_batch_lines_waiting_for_a_slot(fake, tmp_path):
    """Every engine slot may go to the batch while nobody else asks; once live requests wait,
    each slot a batch line frees goes to them, and no further line starts until they ran."""
    box = Box(fake.url, tmp_path, engine_concurrency=2, batch_max_slots=2)
    with box.up():
        client = box.client()
        live = box.client("interactive")
        batch = start(client, batch_file(12, "busy", delay=1.0))  # long lines, short live ones
        wait_status(client, batch.id, ("in_progress",))
        time.sleep(0.5)
        before = sum(runs_of(fake, "busy").values())

        def ask(i: int) -> None:
            live.chat.completions.create(model="fake-model", max_tokens=2, user=f"live-{i}",
                                         messages=[{"role": "user", "content": "now"}],
                                         extra_body={"fake": {"delay": 0.1}})

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(ask, range(6)))
        after = sum(runs_of(fake, "busy").values())
        # All six arrive while two lines hold the slots; the slots those free go to them, and
        # batch lines resume only behind the last: no line but the two finishes meanwhile.
        assert after - before <= 2
        assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")


def test_batches_page_through_with_limit_and_after(box):
    client = box.client("pager")
    ids = [start(client, batch_file(1, f"page{n}")).id for n in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[:0:-1] and first.has_more
    assert [b.id for b in client.batches.list(limit=2, after=ids[1]).data] == [ids[0]]
    assert [b.id for b in client.batches.list(limit=1)] == ids[::-1]  # the SDK follows after


def test_an_input_file_of_a_running_batch_cannot_be_deleted(box):
    client = box.client("keeper")
    uploaded = upload(client, batch_file(10, "keep", delay=0.3))
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    with pytest.raises(openai.ConflictError):
        client.files.delete(uploaded.id)
    client.batches.cancel(batch.id)
    wait_status(client, batch.id, ("cancelled",))
    assert client.files.delete(uploaded.id).deleted


def test_lines_over_the_keys_rate_limit_wait_and_then_run(box, fake):
    client = box.client("metered", "--rpm", "60")
    batch = start(client, batch_file(63, "rpm"))
    done = wait_status(client, batch.id, ("completed",), timeout=30)
    assert done.request_counts.completed == 63 and done.request_counts.failed == 0
    assert runs_of(fake, "rpm") == {f"rpm-{i}": 1 for i in range(63)}
    metrics = httpx.get(box.url + "/metrics").text
    assert 'appliance_rate_limited_total{key="metered",limit="requests"}' in metrics
    for name in ("appliance_batch_lines_total", "appliance_batch_lines_queued",
                 "appliance_batch_lines_running", "appliance_batch_slots_in_use"):
        assert name in metrics
    assert 'appliance_batch_lines_total{outcome="done"}' in metrics


def test_every_answer_has_the_shape_and_status_the_openapi_description_gives(box):
    """Schemathesis never gets past a 404 here (its files are never valid batch input), so the
    described 200s and 409s are checked on a real batch's life."""
    box.client("shaped")
    described = httpx.get(box.url + "/openapi.json").json()
    headers = {"Authorization": f"Bearer {box.secrets['shaped']}"}

    def call(method: str, template: str, path: str, **kwargs) -> httpx.Response:
        response = httpx.request(method, box.url + path, headers=headers, **kwargs)
        documented = described["paths"][template][method.lower()]["responses"]
        answer = documented[str(response.status_code)]
        answer = described["components"]["responses"]["Error"] if "$ref" in answer else answer
        media = response.headers["content-type"]
        assert media in answer["content"], (method, path, media)
        if media == "application/json":
            schema = {**answer["content"][media]["schema"],
                      "components": described["components"]}
            jsonschema.validate(response.json(), schema)
        return response

    data = batch_file(3, "shape", delay=0.5, failing=frozenset({1}))
    uploaded = call("POST", "/v1/files", "/v1/files", data={"purpose": "batch"},
                    files={"file": ("in.jsonl", data)})
    file_id = uploaded.json()["id"]
    call("GET", "/v1/files", "/v1/files", params={"purpose": "batch", "limit": 1})
    call("GET", "/v1/files/{file_id}", f"/v1/files/{file_id}")
    assert call("GET", "/v1/files/{file_id}/content",
                f"/v1/files/{file_id}/content").content == data
    created = call("POST", "/v1/batches", "/v1/batches",
                   json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                         "completion_window": "24h", "metadata": {"k": "v"}}).json()
    assert call("DELETE", "/v1/files/{file_id}", f"/v1/files/{file_id}").status_code == 409
    done = wait_status(box.client("shaped"), created["id"], ("completed",))
    call("GET", "/v1/batches/{batch_id}", f"/v1/batches/{done.id}")
    call("GET", "/v1/batches", "/v1/batches", params={"limit": 5})
    assert call("POST", "/v1/batches/{batch_id}/cancel",
                f"/v1/batches/{done.id}/cancel").status_code == 409
    for result in (done.output_file_id, done.error_file_id):
        call("GET", "/v1/files/{file_id}", f"/v1/files/{result}")
    assert call("DELETE", "/v1/files/{file_id}", f"/v1/files/{file_id}").json()["deleted"]
    assert call("GET", "/v1/files/{file_id}", f"/v1/files/{file_id}").status_code == 404
    cancelled = call("POST", "/v1/batches", "/v1/batches",
                     json={"input_file_id": done.output_file_id, "completion_window": "24h",
                           "endpoint": "/v1/chat/completions"})
    assert cancelled.status_code == 400
