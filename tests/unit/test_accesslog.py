"""Access-log lines: one JSON object a request, out by the end of the event loop's turn."""

import asyncio
import io
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.observe import accesslog
from proxy.observe.accesslog import LINES, RequestRecord


@pytest.fixture
def out():
    stream = io.StringIO()
    accesslog.configure("info")
    LINES.stream = stream
    yield stream
    accesslog.configure("info")


def record(request_id: str) -> RequestRecord:
    return RequestRecord(request_id, "POST", '/v1/chat/"completions"', time.monotonic(),
                         arrived=time.time(), status=200, key="team-a", prompt_tokens=3)


def test_lines_wait_for_the_end_of_the_loops_turn_and_go_out_together(out):
    async def scenario() -> None:
        accesslog.write(record("a"), 0.01)
        accesslog.write(record("b"), 0.02)
        assert out.getvalue() == ""
        await asyncio.sleep(0)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [line["request_id"] for line in lines] == ["a", "b"]
        assert lines[0]["route"] == '/v1/chat/"completions"' and lines[1]["duration_ms"] == 20
        accesslog.write(record("c"), 0.01)
        await asyncio.sleep(0)
        assert out.getvalue().count("\n") == 3

    asyncio.run(scenario())


def test_without_a_loop_a_line_goes_out_at_once(out):
    accesslog.write(record("tool"), 0.5)
    assert json.loads(out.getvalue())["request_id"] == "tool"


def test_above_info_nothing_is_written(out):
    accesslog.configure("warning")
    LINES.stream = out
    accesslog.write(record("quiet"), 0.1)
    assert out.getvalue() == ""


@settings(max_examples=200, deadline=None)
@given(text=st.text(), error=st.text(), worker=st.none() | st.integers(0, 64),
       queued=st.booleans())
def test_a_line_is_json_with_the_records_values_in_a_fixed_order(text, error, worker, queued):
    stream = io.StringIO()
    accesslog.configure("info", worker)
    LINES.stream = stream
    arrived = time.time()
    entry = RequestRecord(text, text, text, 0.0, status=499, key=text, stream=queued,
                          completion_tokens=7, error=error, arrived=arrived,
                          queued=arrived + 0.002 if queued else None,
                          admitted=arrived + 0.0031 if queued else None)
    accesslog.write(entry, 1.23456)
    accesslog.configure("info")
    line = json.loads(stream.getvalue())
    expected = ["request_id", "key", "method", "route", "status", "duration_ms", "stream",
                "prompt_tokens", "completion_tokens", "ts"]
    expected += ["queued_ms", "admitted_ms"] if queued else []
    expected += ["error"] if error else []
    expected += ["worker"] if worker is not None else []
    assert list(line) == expected
    assert line["request_id"] == line["key"] == line["method"] == line["route"] == text
    assert (line["status"], line["duration_ms"], line["stream"]) == (499, 1234.56, queued)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (0, 7)
    assert abs(line["ts"] - arrived) < 1e-6
    assert line.get("error", "") == error and line.get("worker") == worker
    if queued:
        assert (line["queued_ms"], line["admitted_ms"]) == (2.0, 3.1)
