"""A batch's statuses and moves, and the batch tables on SQLite: a line's result is written
once, a lease is held by one runner at a time, a status moves only from the one read."""

import pytest

from proxy.batch.jobs import (
    ACTIVE,
    STATUSES,
    TERMINAL,
    TRANSITIONS,
    IllegalMove,
    advance,
    check_metadata,
    output_file_id,
)
from proxy.batch.storage import batch_from_row
from proxy.keys.jobs import LineResult
from proxy.keys.sqlite import SqliteKeyStore


def test_the_happy_path_ends_completed():
    status = "validating"
    for event in ("start", "all_done", "finalized"):
        status = advance(status, event)
    assert status == "completed"


@pytest.mark.parametrize("status", ["validating", "in_progress"])
def test_a_running_batch_can_be_cancelled_and_ends_cancelled(status):
    assert advance(advance(status, "cancel"), "cancelled") == "cancelled"


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_a_finished_batch_moves_no_more(status):
    for event in ("start", "cancel", "all_done", "expire", "fail", "finalized"):
        with pytest.raises(IllegalMove):
            advance(status, event)


def test_only_a_running_batch_expires_and_only_a_finalizing_one_completes():
    assert advance("in_progress", "expire") == "expired"
    with pytest.raises(IllegalMove, match="cannot finalized"):
        advance("in_progress", "finalized")
    with pytest.raises(IllegalMove):
        advance("cancelling", "start")


def test_every_status_is_openais_and_every_one_can_be_reached():
    assert set(STATUSES) == {"validating", "in_progress", "finalizing", "completed", "failed",
                             "expired", "cancelling", "cancelled"}
    reached = {"validating"} | set(TRANSITIONS.values())
    assert reached == set(STATUSES)


def test_result_file_ids_are_the_same_every_time():
    assert output_file_id("batch_x1", False) == "file-x1-output"
    assert output_file_id("batch_x1", True) == "file-x1-errors"


def test_metadata_follows_openais_limits():
    assert check_metadata({"a": "b"}) == {"a": "b"}
    with pytest.raises(ValueError):
        check_metadata({"a": 1})
    with pytest.raises(ValueError):
        check_metadata({str(i): "" for i in range(17)})


@pytest.fixture
def tables(tmp_path):
    store = SqliteKeyStore(tmp_path / "keys.db")
    yield store.jobs()
    store.close()


def add_batch(tables, batch_id: str = "batch_1", node: str = "box", total: int = 3) -> None:
    tables.add_batch({"id": batch_id, "owner": "alice", "node": node, "input_file_id": "file-1",
                      "endpoint": "/v1/chat/completions", "completion_window": "24h",
                      "metadata": None, "status": "validating", "total": total,
                      "created_at": 1.0, "expires_at": 100.0})


def test_a_line_result_is_written_once_however_often_it_is_reported(tables):
    add_batch(tables)
    assert tables.record_results([LineResult("batch_1", 1, "r1", 200, "{}", 3, 4, 5.0)]) == 1
    assert tables.record_results([LineResult("batch_1", 1, "r1", 500, "{}", 9, 9, 6.0)]) == 0
    assert tables.results_page("batch_1", False, 0, 10) == [(1, "{}")]
    assert tables.results_page("batch_1", True, 0, 10) == []
    assert tables.counts("batch_1") == (1, 0)
    assert tables.done_lines("batch_1") == {1}
    assert tables.batch_tokens() == {"alice": 7}
    assert tables.pending_lines("box", ACTIVE) == 2


def test_results_come_a_page_at_a_time_in_line_order(tables):
    add_batch(tables, total=7)
    assert tables.record_results([
        LineResult("batch_1", line, f"r{line}", 500 if line == 4 else 200,
                   f'{{"line": {line}}}', 1, 1, 1.0) for line in (5, 1, 3, 2, 7, 4)]) == 6
    assert tables.results_page("batch_1", False, 0, 2) == [(1, '{"line": 1}'), (2, '{"line": 2}')]
    assert [n for n, _ in tables.results_page("batch_1", False, 2, 10)] == [3, 5, 7]
    assert tables.results_page("batch_1", False, 7, 10) == []
    assert tables.results_page("batch_1", True, 0, 10) == [(4, '{"line": 4}')]


def test_a_lease_is_held_by_one_runner_until_it_runs_out(tables):
    add_batch(tables)
    assert tables.claim("box", "a", now=10.0, lease_s=30, active=ACTIVE)[0] == "batch_1"
    assert tables.claim("box", "b", now=20.0, lease_s=30, active=ACTIVE) is None
    assert tables.renew("batch_1", "a", now=30.0, lease_s=30)
    assert tables.claim("box", "b", now=50.0, lease_s=30, active=ACTIVE) is None
    assert tables.claim("box", "b", now=61.0, lease_s=30, active=ACTIVE)[0] == "batch_1"
    assert not tables.renew("batch_1", "a", now=62.0, lease_s=30)  # taken over: a stops


def test_a_batch_of_another_host_is_not_taken(tables):
    add_batch(tables, node="elsewhere")
    assert tables.claim("box", "a", now=10.0, lease_s=30, active=ACTIVE) is None


def test_a_status_moves_only_from_the_one_read(tables):
    add_batch(tables)
    assert tables.move("batch_1", "validating", "in_progress", 2.0)
    assert not tables.move("batch_1", "validating", "cancelling", 3.0)
    assert tables.move("batch_1", "in_progress", "cancelling", 4.0)
    batch = batch_from_row(tables.batch("batch_1", "alice"))
    assert batch.status == "cancelling"
    assert batch.times["in_progress"] == 2.0 and batch.times["cancelling"] == 4.0
    assert tables.batch("batch_1", "bob") is None
    assert batch.as_openai(0, 0)["cancelling_at"] == 4


def test_pages_run_newest_first_and_continue_after_an_id(tables):
    for i in range(3):
        tables.add_file((f"file-{i}", "alice", "batch", "f", 10, 1, float(i), "box"))
    first = tables.files("alice", None, 2, None)
    assert [row[0] for row in first] == ["file-2", "file-1"]
    assert [row[0] for row in tables.files("alice", None, 2, "file-1")] == ["file-0"]
    assert tables.stored_bytes("alice") == 30 and tables.stored_bytes("bob") == 0
    assert tables.delete_file("alice", "file-0", 9.0)
    assert tables.file("alice", "file-0") is None and tables.stored_bytes("alice") == 20
