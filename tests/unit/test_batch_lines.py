"""Batch input files checked line by line, and the lines a batch writes, without I/O."""

import json

import pytest

from proxy.batch.lines import (
    BadFile,
    count_lines,
    each_line,
    error_line,
    line_id,
    parse_lines,
    result_line,
    succeeded,
)


def request(custom_id: str = "r1", url: str = "/v1/chat/completions", **body: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"model": "m", "messages": [], **body}})


def every_model(model: str) -> bool:
    return True


def refusal(data: str, allows=every_model, endpoint: str | None = None) -> BadFile:
    with pytest.raises(BadFile) as caught:
        parse_lines(data.encode(), allows, endpoint)
    return caught.value


def test_a_good_file_gives_its_lines_numbered_as_an_editor_does():
    lines = parse_lines(f"{request('a')}\n\n{request('b')}\n".encode(), every_model)
    assert [(line.number, line.custom_id) for line in lines] == [(1, "a"), (3, "b")]
    assert lines[0].body["model"] == "m"


@pytest.mark.parametrize(("data", "line", "reason"), [
    ("{not json", 1, "not valid JSON"),
    ('["a list"]', 1, "must be a JSON object"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"model": "m"}}), 1,
     "custom_id must be a non-empty string"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions",
                 "body": {"model": "m"}}), 1, 'method must be "POST"'),
    (request(url="/v1/models"), 1, "is not a route a batch may run"),
    (request(url="/v1/audio/transcriptions"), 1, "is not a route a batch may run"),
    (request(stream=True), 1, "cannot stream"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                 "body": {"prompt": "x"}}), 1, "body.model must name a model"),
])
def test_a_bad_line_is_named_with_its_reason(data, line, reason):
    exc = refusal(data)
    assert exc.line == line and reason in str(exc) and str(exc).startswith(f"line {line}: ")


def test_a_repeated_custom_id_names_both_lines():
    exc = refusal("\n".join([request("a"), request("b"), request("a")]))
    assert str(exc) == "line 3: custom_id 'a' repeats line 1; each must be unique"


def test_a_model_the_key_may_not_use_is_refused_by_line():
    exc = refusal("\n".join([request("a"), json.dumps({
        "custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "secret-model", "messages": []}})]),
        allows=lambda model: model == "m")
    assert exc.line == 2 and "'secret-model'" in str(exc)


def test_every_line_must_match_the_batch_endpoint():
    exc = refusal("\n".join([request("a"), request("b", url="/v1/completions")]),
                  endpoint="/v1/chat/completions")
    assert exc.line == 2 and "endpoint" in str(exc)


def test_an_empty_file_and_a_non_utf8_file_are_refused():
    assert "no requests" in str(refusal("\n\n"))
    with pytest.raises(BadFile, match=r"^line 2: not UTF-8"):
        parse_lines(request().encode() + b"\n\xff\xfe", every_model)


def test_too_many_lines_are_refused():
    with pytest.raises(BadFile, match="at most 2"):
        parse_lines("\n".join(request(str(i)) for i in range(3)).encode(), every_model,
                    max_lines=2)


def test_output_and_error_lines_take_openais_shape():
    ok = result_line(line_id("batch_abc", 3), "r3", 200, "req-1", {"choices": []})
    assert ok == {"id": "batch_req_abc_3", "custom_id": "r3",
                  "response": {"status_code": 200, "request_id": "req-1",
                               "body": {"choices": []}}, "error": None}
    never = error_line("batch_req_abc_4", "r4", "batch_expired", "too late")
    assert never == {"id": "batch_req_abc_4", "custom_id": "r4", "response": None,
                     "error": {"code": "batch_expired", "message": "too late"}}
    assert succeeded(200) and not succeeded(404) and not succeeded(500)


def test_an_open_files_lines_are_checked_one_at_a_time(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(f"{request('a')}\r\n\n{request('b')}\n".encode())
    with path.open("rb") as source:
        assert count_lines(source, every_model) == 2
    with path.open("rb") as source:
        assert [line.number for line in each_line(source, every_model)] == [1, 3]
