"""The output is the user's: whatever happens to the state folder, the output or the input,
no paid result is lost or paid for twice, and nothing is destroyed by a mistake.

Through the CLI against the real simulator; assertions on the files written and on what
the simulator received.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchgpt import JobConfig, RunOptions
from batchgpt.pricing import Usage
from batchgpt.runner import run_job
from batchgpt.simulator import Simulator, SimulatorConfig
from batchgpt.store.index import Index, NewResult
from batchgpt.store.output_log import OutputLog
from tests.conftest import JobFiles, articles, read_jsonl, user_texts, write_jsonl


def ids_in(path: Path) -> Counter[str]:
    return Counter(line["custom_id"] for line in read_jsonl(path))


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def usage_of_lines(path: Path) -> int:
    return sum(line["response"]["body"]["usage"]["total_tokens"] for line in read_jsonl(path))


def state_db(job: JobFiles) -> Path:
    return job.output.with_name("job.state") / "rows.sqlite"


def done_run(job: JobFiles, cli: Any, n: int = 20, **overrides: Any) -> Path:
    path = job.write(articles(n), **overrides)
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    return path


# -- the state folder lost or damaged ---------------------------------------------------------

def test_state_folder_lost_rerun_sends_nothing_and_takes_over_every_result(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli)
    before = job.output.read_bytes()
    shutil.rmtree(job.output.with_name("job.state"))
    sim.reset_stats()

    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0
    assert job.output.read_bytes() == before
    assert f"took over 20 results from {job.output}" in result.output
    summary = job.summary()
    assert summary["requests"]["succeeded"] == 20
    assert summary["usage"]["total_tokens"] == usage_of_lines(job.output)
    assert summary["this_run"]["recovered"]["taken_over"] == 20
    # Taken over once: the next run trusts the index again and says nothing.
    again = cli("run", path)
    assert "took over" not in again.output and sim.stats.requests == 0


def test_garbled_checkpoint_is_moved_aside_and_rebuilt_from_the_output(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli)
    db = state_db(job)
    db.write_bytes(b"this is not a database, it was overwritten\n" * 100)
    sim.reset_stats()

    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0
    assert "rebuilding the index" in result.output
    assert list(db.parent.glob("rows.sqlite.damaged-*"))
    assert ids_in(job.output) == Counter({a["id"]: 1 for a in articles(20)})


def test_same_length_byte_edits_in_the_checkpoint_are_found_and_rebuilt(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli)
    db = state_db(job)
    data = db.read_bytes()
    assert data.count(b"a0005") >= 1
    db.write_bytes(data.replace(b"a0005", b"a0O05"))  # same length, another id
    sim.reset_stats()

    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0  # a0005's result is in the output: not paid again
    assert ids_in(job.output) == Counter({a["id"]: 1 for a in articles(20)})


def test_index_behind_the_output_takes_the_uncommitted_lines_over(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """What a kill between the append and the index commit leaves: whole, paid lines past
    the committed size. They are taken over, not cut and paid again."""
    path = done_run(job, cli)
    lines = job.output.read_bytes().splitlines(keepends=True)
    prefix = b"".join(lines[:15])
    late = [json.loads(line)["custom_id"] for line in lines[15:]]
    db = sqlite3.connect(state_db(job))
    with db:
        db.executemany("DELETE FROM results WHERE custom_id = ?", [(i,) for i in late])
        db.execute("UPDATE meta SET value = ? WHERE key = 'output_size'", (str(len(prefix)),))
        db.execute("UPDATE meta SET value = ? WHERE key = 'output_crc'",
                   (str(zlib.crc32(prefix)),))
    db.close()
    sim.reset_stats()

    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0
    assert f"took over 5 results from {job.output}" in result.output
    assert job.output.read_bytes() == b"".join(lines)


# -- the output edited, cut or broken ---------------------------------------------------------

def test_output_cut_to_a_prefix_sends_only_the_rows_whose_lines_are_gone(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli)
    lines = job.output.read_bytes().splitlines(keepends=True)
    kept = [json.loads(line)["custom_id"] for line in lines[:12]]
    job.output.write_bytes(b"".join(lines[:12]))
    sim.reset_stats()

    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert "8 results the checkpoint recorded are no longer in" in result.output
    sent = {t.removeprefix("Summarize: ") for t in user_texts(sim)}
    assert len(sent) == sim.stats.requests == 8
    assert not sent & {a["text"] for a in articles(20) if a["id"] in kept}
    assert ids_in(job.output) == Counter({a["id"]: 1 for a in articles(20)})


def test_hand_edits_that_keep_or_grow_the_output_are_noticed(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli)
    lines = job.output.read_bytes().splitlines(keepends=True)
    edited = [*reversed(lines)]  # reordered
    first = json.loads(edited[0])
    first["note"] = "checked by hand"  # a field added to one line
    edited[0] = (json.dumps(first) + "\n").encode()
    edited.append(edited[3])  # a line duplicated
    job.output.write_bytes(b"".join(edited))
    sim.reset_stats()

    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0
    assert ids_in(job.output) == Counter({a["id"]: 1 for a in articles(20)})
    assert job.summary()["requests"]["succeeded"] == 20
    assert any("checked by hand" in line.get("note", "") for line in read_jsonl(job.output))


def test_unreadable_lines_in_the_output_are_set_aside_not_dropped(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli)
    lines = job.output.read_bytes().splitlines(keepends=True)
    junk = b"<<<merge conflict>>>\n"
    job.output.write_bytes(b"".join(lines[:10]) + junk + b"".join(lines[10:]))
    sim.reset_stats()

    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0
    aside = list(job.output.parent.glob("job.jsonl.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == junk
    assert str(aside[0]) in result.output
    assert job.output.read_bytes() == b"".join(lines)


def test_a_last_line_without_its_newline_is_kept(job: JobFiles, sim: Simulator,
                                                  cli: Any) -> None:
    path = done_run(job, cli)
    job.output.write_bytes(job.output.read_bytes().rstrip(b"\n"))  # an editor's save
    sim.reset_stats()
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0
    assert job.output.read_bytes().endswith(b"\n")
    assert ids_in(job.output) == Counter({a["id"]: 1 for a in articles(20)})


# -- --fresh and --dry-run ---------------------------------------------------------------------

def test_fresh_dry_run_moves_nothing_and_says_what_it_would_set_aside(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli)
    before = tree(job.dir)
    result = cli("run", path, "--fresh", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "--fresh would set aside" in result.output
    assert f"{job.output} → " in result.output
    assert tree(job.dir) == before
    assert sim.stats.requests == 20


def test_fresh_sets_the_previous_files_aside_and_starts_over(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli)
    old = job.output.read_bytes()
    result = cli("run", path, "--fresh", "--yes")
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 40
    aside = sorted(job.output.parent.glob("job.previous-*"))
    assert [p.name.split(".", 2)[2] for p in aside] == ["jsonl", "summary.json"]
    assert aside[0].read_bytes() == old
    assert str(aside[0]) in result.output
    assert ids_in(job.output) == Counter({a["id"]: 1 for a in articles(20)})


def test_fresh_with_one_bad_input_line_moves_nothing(job: JobFiles, sim: Simulator,
                                                      cli: Any) -> None:
    path = done_run(job, cli)
    before = tree(job.dir / "out")
    write_jsonl(job.input, [*articles(20), "{not json"])
    result = cli("run", path, "--fresh", "--yes")
    assert result.exit_code == 1
    assert "input.jsonl:21: invalid JSON" in result.output
    assert tree(job.dir / "out") == before
    assert sim.stats.requests == 20


def test_dry_run_writes_nothing_even_when_the_state_needs_repair(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli)
    shutil.rmtree(job.output.with_name("job.state"))
    with job.output.open("ab") as fh:
        fh.write(b'{"id":"batch_req_torn","custom_id":"a00')
    write_jsonl(job.input, articles(25))
    before = tree(job.dir)
    result = cli("run", path, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert tree(job.dir) == before  # nothing written, moved, locked or repaired
    estimate = json.loads(result.stdout)
    assert estimate["already_done"] == 20 and estimate["pending"] == 5
    assert "would take over 20 results" in result.output
    assert "would set aside a torn last line" in result.output


# -- paths that would destroy something -----------------------------------------------------------

def test_output_equal_to_the_input_is_refused_and_the_input_kept(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    write_jsonl(job.input, articles(5))
    before = job.input.read_bytes()
    for output in ("../data/input.jsonl", "../data/./../data/input.jsonl"):
        path = job.write(output=output)
        result = cli("run", path)
        assert result.exit_code == 1, result.output
        assert "is the input file" in result.output
        assert job.input.read_bytes() == before
    link = job.dir / "out" / "link.jsonl"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(job.input)
    result = cli("run", job.write(output="../out/link.jsonl"))
    assert result.exit_code == 1 and "is the input file" in result.output
    assert job.input.read_bytes() == before
    assert sim.stats.requests == 0


def test_output_inside_a_state_folder_is_refused(job: JobFiles, sim: Simulator,
                                                 cli: Any) -> None:
    path = job.write(articles(3), output="../out/job.state/results.jsonl")
    result = cli("run", path)
    assert result.exit_code == 1
    assert "inside a state folder" in result.output
    assert sim.stats.requests == 0


def test_two_jobs_writing_one_output_are_refused(job: JobFiles, sim: Simulator,
                                                 cli: Any) -> None:
    done_run(job, cli, n=5)
    other = job.job_path.with_name("other.yaml")
    other.write_text(yaml.safe_dump({**job.config, "name": "other"}), encoding="utf-8")
    sim.reset_stats()
    result = cli("run", other)
    assert result.exit_code == 1
    assert "holds the results of job 'job'" in result.output
    assert "two jobs must not share an output" in result.output
    assert sim.stats.requests == 0


def test_output_that_is_a_fifo_is_refused_without_blocking(job: JobFiles, sim: Simulator,
                                                          cli: Any) -> None:
    path = job.write(articles(3))
    job.output.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(job.output)
    result = cli("run", path)
    assert result.exit_code == 1
    assert "is a pipe (FIFO), not a regular file" in result.output
    assert sim.stats.requests == 0


# -- paid results are never thrown away ---------------------------------------------------------

def test_changed_prompt_with_the_server_down_keeps_every_old_result(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli, n=10)
    old = job.output.read_bytes()
    paid_before = job.summary()["usage"]["total_tokens"]
    job.write(prompt="Summarize in one line: {text}",
              retry={"max_attempts": 2, "initial_delay_s": 0.001, "max_delay_s": 0.002})
    sim.config.faults.server_error_rate = 1.0
    result = cli("run", path)
    assert result.exit_code == 6, result.output  # retryable failures: rerun later
    assert job.output.read_bytes() == old  # nothing paid for was removed
    assert len(job.failed()) == 10 and all(f["error"]["retryable"] for f in job.failed())

    sim.config.faults.server_error_rate = 0.0
    sim.reset_stats()
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 10
    lines = read_jsonl(job.output)
    assert Counter(line["custom_id"] for line in lines) == Counter(
        {a["id"]: 1 for a in articles(10)})
    assert not job.failures.exists()
    # What was paid includes the replaced results.
    summary = job.summary()
    assert summary["usage"]["total_tokens"] == paid_before + usage_of_lines(job.output)


def test_totals_count_the_current_input_and_what_was_paid(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = done_run(job, cli, n=20)
    write_jsonl(job.input, articles(10))
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    req = job.summary()["requests"]
    assert req == {"total": 10, "succeeded": 10, "failed": 0, "pending": 0,
                   "not_in_input": 10}
    assert ids_in(job.output) == Counter({a["id"]: 1 for a in articles(20)})  # kept


# -- the input changed during a run ------------------------------------------------------------

ROWS = 300  # 24 kB: more than a read buffer, so later rows are read from the disk again


async def _run_and_rewrite_input(job: JobFiles, rewrite: Any) -> Any:
    sim = Simulator(SimulatorConfig(latency_s=0.05))
    base = await sim.start()
    try:
        job.config["api"] = {"base_url": base}
        path = job.write(articles(ROWS), limits={"concurrency": 1})
        task = asyncio.create_task(run_job(JobConfig.load(path), RunOptions()))
        while sim.stats.requests < 3:  # wait for arrivals, not for time
            await asyncio.sleep(0.001)
        rewrite()
        result = await asyncio.wait_for(task, 60)
        return result, [b["messages"][-1]["content"] for b in sim.stats.bodies]
    finally:
        await sim.stop()


async def test_input_rewritten_in_place_during_a_run_stops_cleanly(job: JobFiles) -> None:
    records = articles(ROWS)

    def reorder() -> None:
        write_jsonl(job.input, list(reversed(records)))

    result, sent = await _run_and_rewrite_input(job, reorder)
    assert result.exit_code == 1
    assert result.report.stopped.value == "input changed"
    assert "the input changed during the run" in result.message
    assert len(sent) == len(set(sent)) < 150  # nothing twice; it stopped at the change
    assert sent == [f"Summarize: {r['text']}" for r in records[: len(sent)]]
    done = {line["custom_id"] for line in read_jsonl(job.output)}
    assert len(done) == len(sent)  # every answer that came back was kept


async def test_input_cut_during_a_run_stops_cleanly(job: JobFiles) -> None:
    def cut() -> None:
        with job.input.open("r+b") as fh:
            fh.truncate(200)

    result, sent = await _run_and_rewrite_input(job, cut)
    assert result.exit_code == 1
    assert result.report.stopped.value == "input changed"
    assert len(sent) == len(set(sent))
    assert len(read_jsonl(job.output)) == len(sent)


# -- a failed write -----------------------------------------------------------------------------

def test_absurd_usage_in_a_reply_neither_breaks_the_checkpoint_nor_is_paid_twice(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    sim.config.faults.reply_patch = {"usage": {"prompt_tokens": 10**30,
                                               "completion_tokens": 5, "total_tokens": 10**30}}
    path = job.write(articles(20))
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert job.summary()["usage"]["prompt_tokens"] < 10**12  # not counted as such
    sim.config.faults.reply_patch = None
    sim.reset_stats()
    again = cli("run", path)
    assert again.exit_code == 0, again.output
    assert sim.stats.requests == 0
    assert ids_in(job.output) == Counter({a["id"]: 1 for a in articles(20)})


def test_a_lone_surrogate_in_a_reply_is_stored_escaped_not_paid_again(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    sim.config.faults.reply_patch = {"choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant",
                                                              "content": "bad \ud800 text"}}]}
    path = job.write(articles(5))
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert b"\\ud800" in job.output.read_bytes()
    lines = read_jsonl(job.output)
    assert {line["response"]["body"]["choices"][0]["message"]["content"] for line in lines} == {
        "bad \ud800 text"}
    sim.reset_stats()
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests == 0



# -- a kill during the end-of-run compaction, at each step ---------------------------------------

def _with_dead_lines(job: JobFiles, cli: Any) -> Path:
    """A finished job whose output holds superseded lines (three rows answered twice), as a
    run that replaced results leaves it just before its compaction."""
    from batchgpt.store import Store

    path = done_run(job, cli, n=10)
    store = Store(JobConfig.load(path))
    store.open()
    try:
        lines = job.output.read_bytes().splitlines(keepends=True)[:3]
        results = []
        start, fp = store.out.append(b"".join(lines))
        for line in lines:
            results.append(NewResult(json.loads(line)["custom_id"], None, start, len(line), 1,
                                     "gpt-4o-mini", Usage()))
            start += len(line)
        store.index.commit(results, [], None, output_size=store.out.size,
                           output_crc=store.out.crc, fingerprint=fp.dumps())
        assert store.index.meta_int("dead_lines") == 3
    finally:
        store.dry = True  # close without compacting
        store.close()
    return path


@pytest.mark.parametrize("step", ["file written", "offsets committed", "renamed"])
def test_a_kill_during_compaction_loses_nothing_and_the_next_run_finishes_it(
    job: JobFiles, sim: Simulator, cli: Any, step: str
) -> None:
    path = _with_dead_lines(job, cli)
    index = Index.open(state_db(job))
    out = OutputLog(job.output)
    moved, size, crc = out.write_compacted(index.live_ranges())
    if step != "file written":
        index.move_offsets(moved, output_size=size, output_crc=crc, dead_lines=0,
                           compacting=1, fingerprint=None)
    if step == "renamed":
        out.swap_in_compacted()
    index.close()  # "killed" here
    sim.reset_stats()

    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0
    assert ids_in(job.output) == Counter({a["id"]: 1 for a in articles(10)})
    assert not out.compact_path.exists()
    assert job.summary()["requests"]["succeeded"] == 10
