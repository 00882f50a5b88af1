"""The parts of the job's state, one at a time: the output log, the index, the group-commit
writer, recovery, and compaction interrupted at every step."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import zlib
from pathlib import Path

import pytest

from batchgpt.config import JobConfig
from batchgpt.errors import StateError
from batchgpt.pricing import Usage
from batchgpt.store import Store
from batchgpt.store.index import Index, NewFailure, NewResult
from batchgpt.store.output_log import (
    OutputChanged,
    OutputLog,
    answer_tag,
    encode_line,
    line_is_result_of,
    tag_of,
)
from batchgpt.store.recover import recover


def result_line(custom_id: str, tokens: int = 10, model: str = "gpt-4o-mini") -> bytes:
    return encode_line({
        "id": "batch_req_x", "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": "req_1",
                     "body": {"object": "chat.completion", "model": model, "choices": [],
                              "usage": {"prompt_tokens": tokens, "completion_tokens": 1,
                                        "total_tokens": tokens + 1}}},
        "error": None,
    })


def make_job(tmp_path: Path) -> JobConfig:
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "x"}\n')
    return JobConfig.model_validate({
        "name": "job", "input": tmp_path / "in.jsonl", "output": tmp_path / "out" / "job.jsonl",
        "model": "gpt-4o-mini",
    })


def commit(out: OutputLog, index: Index, ids: list[str]) -> None:
    """What the writer does for a batch of results."""
    lines = [result_line(i) for i in ids]
    start, fp = out.append(b"".join(lines))
    results = []
    for cid, line in zip(ids, lines, strict=True):
        results.append(NewResult(cid, f"h-{cid}", start, len(line), 1, "gpt-4o-mini",
                                 Usage(prompt_tokens=10, completion_tokens=1,
                                       total_tokens=11)))
        start += len(line)
    index.commit(results, [], None, output_size=out.size, output_crc=out.crc,
                 fingerprint=fp.dumps())


def live(index: Index) -> list[str]:
    return [cid for cid, _, _ in index.live_ranges()]


# -- the output log ----------------------------------------------------------------------------

def test_appends_are_chained_into_a_crc_of_the_whole_file(tmp_path: Path) -> None:
    out = OutputLog(tmp_path / "o.jsonl")
    out.start(0, 0)
    out.append(result_line("a"))
    out.append(result_line("b") + result_line("c"))
    data = out.path.read_bytes()
    assert out.size == len(data) and out.crc == zlib.crc32(data)
    assert out.checksum(out.size) == out.crc
    assert out.checksum(out.size + 1) is None  # the file is shorter


def test_an_output_changed_behind_the_writers_back_stops_the_next_append(tmp_path: Path) -> None:
    out = OutputLog(tmp_path / "o.jsonl")
    out.start(0, 0)
    out.append(result_line("a"))
    with out.path.open("ab") as fh:
        fh.write(b"someone else\n")
    with pytest.raises(OutputChanged, match="changed during the run"):
        out.append(result_line("b"))


def test_an_output_deleted_during_the_run_stops_the_next_append(tmp_path: Path) -> None:
    out = OutputLog(tmp_path / "o.jsonl")
    out.start(0, 0)
    out.append(result_line("a"))
    out.path.unlink()
    with pytest.raises(OutputChanged, match="was deleted"):
        out.append(result_line("b"))


def test_a_line_is_checked_to_be_the_result_of_its_id() -> None:
    assert line_is_result_of(result_line("a1"), "a1")
    assert not line_is_result_of(result_line("a1"), "a2")
    assert not line_is_result_of(result_line("a1")[:-1], "a1")  # no newline: torn
    edited = json.dumps({"custom_id": "日本", "x": 1, "response": {
        "status_code": 200, "body": {}}}).encode() + b"\n"
    assert line_is_result_of(edited, "日本")  # another layout, parsed


def test_a_lone_surrogate_is_encoded_escaped() -> None:
    line = encode_line({"content": "bad \ud800"})
    assert line == b'{"content":"bad \\ud800"}\n'
    assert json.loads(line)["content"] == "bad \ud800"


# -- the index ---------------------------------------------------------------------------------

def test_a_failure_never_replaces_a_result(tmp_path: Path) -> None:
    index = Index.open(tmp_path / "i.sqlite")
    index.commit([NewResult("a", "h1", 0, 10, 1, "m", Usage())], [], None)
    index.commit([], [NewFailure("a", "h2", True, "server_error", 3, b"{}\n")], None)
    assert live(index) == ["a"]
    unsettled = index.unsettled([("a", "h2")])["a"]
    assert unsettled.result_hash == "h1" and unsettled.failure_hash == "h2"
    index.commit([NewResult("a", "h2", 10, 10, 1, "m", Usage())], [], None)
    assert list(index.failure_lines()) == []  # a success clears the failure
    assert index.unsettled([("a", "h2")]) == {}


def test_replaced_results_stay_in_what_was_paid(tmp_path: Path) -> None:
    index = Index.open(tmp_path / "i.sqlite")
    u = Usage(prompt_tokens=100, completion_tokens=10, total_tokens=110)
    index.commit([NewResult("a", "h1", 0, 10, 1, "m", u)], [], None)
    assert index.commit([NewResult("a", "h2", 10, 10, 1, "m", u)], [], None) == 1
    totals = index.totals()
    assert totals.results == 1 and totals.replaced == 1
    assert totals.spend_by_model["m"].total_tokens == 220
    assert index.meta_int("dead_lines") == 1


def test_a_taken_over_result_is_adopted_only_by_the_request_its_tag_names(
    tmp_path: Path
) -> None:
    index = Index.open(tmp_path / "i.sqlite")
    index.commit([
        NewResult("a", None, 0, 10, 1, "m", Usage(), tag=answer_tag("a", "h-now")),
        NewResult("b", None, 10, 10, 1, "m", Usage(), tag=answer_tag("b", "h-before")),
        NewResult("c", None, 20, 10, 1, "m", Usage(), tag=None),  # an older output's line
    ], [], None)
    assert index.unsettled([("a", "h-now")]) == {}  # not yet checked: left out
    assert index.unadopted_count() == 3
    index.adopt([("a", "h-now"), ("b", "h-now"), ("c", "h-now")])
    assert index.unadopted_count() == 0
    assert index.unsettled([("a", "h-now"), ("c", "h-now")]) == {}  # their answers
    changed = index.unsettled([("b", "h-now")])["b"]  # an answer to another request
    assert changed.has_result and changed.result_hash != "h-now"
    assert index.unsettled([("a", "h-later")])["a"].result_hash == "h-now"  # a change


def test_an_answer_tag_is_never_a_uuid4() -> None:
    import uuid

    tag = answer_tag("row-1", "0" * 32)
    assert len(tag) == 32 and tag_of(f"batch_req_{tag}") == tag
    assert tag_of(f"batch_req_{uuid.uuid4().hex}") is None
    assert tag_of("batch_req_wnaDys8zPPoSiJQqHm6Z8Skn") is None  # the Batch API's own


def test_a_schema_1_checkpoint_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE rows (custom_id TEXT PRIMARY KEY, req_hash TEXT NOT NULL,
            status INTEGER NOT NULL, transient INTEGER NOT NULL DEFAULT 0, off INTEGER,
            len INTEGER, line BLOB, error_code TEXT, attempts INTEGER NOT NULL, model TEXT,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0, reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            run_id INTEGER, updated_at REAL NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO meta VALUES ('schema', '1'), ('output_size', '20');
        INSERT INTO rows VALUES ('a', 'h1', 1, 0, 0, 10, NULL, NULL, 1, 'm', 5, 1, 0, 0, 1, 0);
        INSERT INTO rows VALUES ('b', 'h2', 2, 1, NULL, NULL, X'7B7D0A', 'server_error', 3,
                                 NULL, 0, 0, 0, 0, 1, 0);
    """)
    db.commit()
    db.close()
    index = Index.open(path)
    assert live(index) == ["a"]
    assert list(index.failure_lines()) == [b"{}\n"]
    assert index.unsettled([("a", "h1"), ("b", "h2")])["b"].transient
    assert index.totals().spend_by_model["m"].prompt_tokens == 5


# -- the writer ----------------------------------------------------------------------------------

async def test_after_a_failed_index_write_results_still_reach_the_output_and_are_taken_over(
    tmp_path: Path
) -> None:
    job = make_job(tmp_path)
    store = Store(job)
    store.open()
    writer = store.start_writer()
    await writer.put_result("a", "h", result_line("a"), 1, "m", Usage())
    store.index.db.execute("CREATE TRIGGER no_more BEFORE INSERT ON results "
                           "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(StateError, match="cannot record results in the checkpoint"):
        await writer.put_result("b", "h", result_line("b"), 1, "m", Usage())
    # A result still on the wire when the run stopped: written to the output, not recorded.
    with pytest.raises(StateError, match="cannot record results in the checkpoint"):
        await writer.put_result("c", "h", result_line("c"), 1, "m", Usage())
    assert not writer.healthy
    await store.stop_writer()
    store.index.db.execute("DROP TRIGGER no_more")
    store.close()
    assert [json.loads(x)["custom_id"] for x in job.output.read_bytes().splitlines()] == [
        "a", "b", "c"]  # whole lines: paid for, kept

    again = Store(job)
    again.open()  # b's and c's lines are taken over
    try:
        assert live(again.index) == ["a", "b", "c"]
        assert again.recovery.taken_over == 2
    finally:
        again.close()


async def test_a_failed_append_is_cut_back_and_nothing_is_recorded(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    store = Store(job)
    store.open()
    writer = store.start_writer()
    await writer.put_result("a", "h", result_line("a"), 1, "m", Usage())
    size = job.output.stat().st_size
    job.output.unlink()  # the output deleted under the run
    with pytest.raises(StateError, match="was deleted"):
        await writer.put_result("b", "h", result_line("b"), 1, "m", Usage())
    await store.stop_writer()
    assert store.index.meta_int("output_size") == size
    assert live(store.index) == ["a"]
    store.close()


async def test_results_waiting_for_one_commit_are_committed_together(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    store = Store(job)
    store.open()
    writer = store.start_writer()
    await asyncio.gather(*(writer.put_result(f"r{i}", "h", result_line(f"r{i}"), 1, "m",
                                             Usage()) for i in range(50)))
    await store.stop_writer()
    runs = store.index.db.execute("SELECT COUNT(DISTINCT updated_at) FROM results").fetchone()
    assert runs[0] < 50  # group commit: fewer transactions than results
    assert len(live(store.index)) == 50
    store.close()


# -- recovery --------------------------------------------------------------------------------

def test_an_untouched_output_is_trusted_without_reading_it(tmp_path: Path) -> None:
    out = OutputLog(tmp_path / "o.jsonl")
    index = Index.open(tmp_path / "i.sqlite")
    out.start(0, 0)
    commit(out, index, ["a", "b"])
    out.close()
    report = recover(OutputLog(out.path), index, tmp_path / "f.jsonl", dry=False,
                     index_was_lost=False)
    assert report.taken_over == report.lost == 0 and not report.rebuilt


def test_a_lost_index_is_rebuilt_with_the_failures_file(tmp_path: Path) -> None:
    out = OutputLog(tmp_path / "o.jsonl")
    out.start(0, 0)
    out.append(result_line("a") + result_line("b") + result_line("a", tokens=99))
    failures = tmp_path / "f.jsonl"
    failures.write_bytes(encode_line({"custom_id": "c", "error": {
        "code": "context_length_exceeded", "retryable": False, "attempts": 1}}))
    index = Index.open(tmp_path / "i.sqlite")
    report = recover(OutputLog(out.path), index, failures, dry=False, index_was_lost=True)
    assert report.rebuilt and report.taken_over == 2 and report.failures_taken_over == 1
    assert sorted(live(index)) == ["a", "b"]
    assert index.meta_int("dead_lines") == 1  # the first line of a was superseded
    # The later line of a is its live result.
    off = index.db.execute("SELECT off FROM results WHERE custom_id = 'a'").fetchone()[0]
    assert off == len(result_line("a")) * 2
    unsettled = index.unsettled([("c", "hc")])["c"]
    assert unsettled.has_failure and unsettled.failure_hash is None and not unsettled.transient


def test_dry_recovery_touches_no_file(tmp_path: Path) -> None:
    out = OutputLog(tmp_path / "o.jsonl")
    out.start(0, 0)
    out.append(result_line("a") + b"<<junk>>\n" + result_line("b")[:20])
    before = out.path.read_bytes()
    index = Index.in_memory()
    report = recover(OutputLog(out.path), index, tmp_path / "f.jsonl", dry=True,
                     index_was_lost=True)
    assert report.taken_over == 1 and report.unreadable_lines == 1 and report.torn_bytes == 20
    assert not report.set_aside
    assert out.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl"]


# -- compaction, interrupted at every step ------------------------------------------------------

def replaced_job(tmp_path: Path) -> tuple[JobConfig, list[bytes]]:
    """An output with a dead line (a0 replaced), ready to be compacted."""
    job = make_job(tmp_path)
    store = Store(job)
    store.open()
    commit(store.out, store.index, ["a0", "a1", "a2"])
    commit(store.out, store.index, ["a0"])  # replaces the first line
    assert store.index.meta_int("dead_lines") == 1
    store.close()
    lines = job.output.read_bytes().splitlines(keepends=True)
    return job, lines


def reopen_and_check(job: JobConfig, expected: list[bytes]) -> None:
    store = Store(job)
    store.open()
    try:
        data = job.output.read_bytes()
        assert data == b"".join(expected)
        assert store.index.meta_int("dead_lines") == 0
        assert sorted(live(store.index)) == ["a0", "a1", "a2"]
        for cid, off, length in store.index.live_ranges():
            assert line_is_result_of(data[off:off + length], cid)
        assert not store.out.compact_path.exists()
        assert store.recovery.lost == 0 and store.recovery.taken_over == 0
    finally:
        store.close()


def test_compaction_killed_after_writing_its_file_leaves_the_output_as_it_was(
    tmp_path: Path
) -> None:
    job, lines = replaced_job(tmp_path)
    store = Store(job)
    store.dry = True  # look without compacting on open
    store._index = Index.open(store.db_path)
    store.out.write_compacted(store.index.live_ranges())  # step 1 done, then "killed"
    store.index.close()
    assert store.out.compact_path.exists()
    reopen_and_check(job, lines[1:])  # the next open compacts afresh


def test_compaction_killed_after_committing_offsets_is_finished_by_the_next_open(
    tmp_path: Path
) -> None:
    job, lines = replaced_job(tmp_path)
    index = Index.open(job.state_dir / "rows.sqlite")
    out = OutputLog(Path(job.output))
    moved, size, crc = out.write_compacted(index.live_ranges())
    index.move_offsets(moved, output_size=size, output_crc=crc, dead_lines=0, compacting=1,
                       fingerprint=None)  # steps 1-2 done, then "killed" before the rename
    index.close()
    assert job.output.read_bytes() == b"".join(lines)  # still the old file
    reopen_and_check(job, lines[1:])


def test_compaction_killed_after_the_rename_is_finished_by_the_next_open(
    tmp_path: Path
) -> None:
    job, lines = replaced_job(tmp_path)
    index = Index.open(job.state_dir / "rows.sqlite")
    out = OutputLog(Path(job.output))
    moved, size, crc = out.write_compacted(index.live_ranges())
    index.move_offsets(moved, output_size=size, output_crc=crc, dead_lines=0, compacting=1,
                       fingerprint=None)
    out.swap_in_compacted()  # steps 1-3 done, then "killed" before the marker is cleared
    index.close()
    reopen_and_check(job, lines[1:])


def test_compaction_refuses_an_output_that_is_not_what_the_index_says(tmp_path: Path) -> None:
    job, lines = replaced_job(tmp_path)
    index = Index.open(job.state_dir / "rows.sqlite")
    job.output.write_bytes(b"".join(reversed(lines)))  # same size, other order
    with pytest.raises(OutputChanged):
        OutputLog(Path(job.output)).write_compacted(index.live_ranges())
    index.close()
    assert job.output.read_bytes() == b"".join(reversed(lines))  # untouched


def test_a_rebuild_keeps_spare_answers_until_the_plan_picks_the_current_one(
    tmp_path: Path
) -> None:
    """An id with two answers in the output, tagged for two requests, and an index that
    knows neither line's place (the file was reordered): the rebuild cannot tell which is
    current, so both stay until the plan knows the row's request."""
    def tagged(cid: str, h: str) -> bytes:
        return encode_line({"id": f"batch_req_{answer_tag(cid, h)}", "custom_id": cid,
                            "response": {"status_code": 200, "body": {"model": "m",
                                         "usage": {"prompt_tokens": 1}}}, "error": None})

    new, old = tagged("a", "h-new"), tagged("a", "h-old")
    out = OutputLog(tmp_path / "o.jsonl")
    out.start(0, 0)
    out.append(new + old)  # the newer answer first, as a reorder can leave it
    index = Index.open(tmp_path / "i.sqlite")
    index.commit([NewResult("a", "h-old", 999, len(old), 1, "m", Usage())], [], None,
                 output_size=1, output_crc=0)  # the index: old request, at no real place
    recover(OutputLog(out.path), index, tmp_path / "f.jsonl", dry=False,
            index_was_lost=False)
    assert index.spare_count() == 1
    index.adopt([("a", "h-new")])  # the plan: the row's request is the new one
    assert index.spare_count() == 0
    assert index.unsettled([("a", "h-new")]) == {}
    (_, off, length), = index.live_ranges()
    assert out.path.read_bytes()[off:off + length] == new
    assert index.meta_int("dead_lines") == 1  # the old answer, for the next compaction
