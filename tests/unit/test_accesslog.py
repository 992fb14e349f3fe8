"""Access-log lines: one JSON object a request, out by the end of the event loop's turn."""

import asyncio
import io
import json
import time

import pytest

from proxy import accesslog
from proxy.accesslog import LINES, RequestRecord


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
