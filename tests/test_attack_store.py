"""Adversarial reproductions against the output-is-the-record store (commit 27ef8dd).

Each test is one finding: it drives the CLI (in process through ``cli``, or as a
subprocess where a kill or a hang is involved) against the simulator and asserts what
batchgpt promises — every record once, never lost, never paid twice, a right summary, a
clear message instead of a traceback or a hang. They fail on the code they were written
against.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchgpt.simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.conftest import JobFiles, read_jsonl, user_texts, write_jsonl
from tests.test_crash import Cli, line_count

POISON = "__POISON__"  # the simulator's default poison marker: 400 context_length_exceeded


# -- helpers ------------------------------------------------------------------------------
def rows(n: int, tag: str = "news") -> list[dict[str, Any]]:
    """The id is the second word of the user message, so each request names its row."""
    return [{"id": f"r{i:04d}", "text": f"r{i:04d} {tag} here. More text follows."}
            for i in range(n)]


def sent_ids(sim: Simulator, start: int = 0) -> Counter[str]:
    return Counter(re.search(r"\br\d{4}\b", t).group() for t in user_texts(sim)[start:])


def output_ids(path: Path) -> Counter[str]:
    return Counter(line["custom_id"] for line in read_jsonl(path))


def contents(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in read_jsonl(path):
        out.setdefault(line["custom_id"], []).append(
            line["response"]["body"]["choices"][0]["message"]["content"])
    return out


def file_usage(path: Path) -> int:
    return sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in read_jsonl(path))


def state_files(job: JobFiles) -> set[str]:
    state = job.output.with_name("job.state")
    return {p.name for p in state.iterdir()} if state.exists() else set()


def crash_files(job: JobFiles) -> list[Path]:
    return sorted(job.output.with_name("job.state").glob("crash-*.txt"))


@pytest.fixture
def slow_sim() -> Iterator[Simulator]:
    with SimulatorThread(SimulatorConfig(latency_s=0.1)) as s:
        yield s


# -- 1. a line appended twice is counted (and paid) twice ---------------------------------
def test_line_duplicated_at_the_end_of_the_output_is_not_counted_as_paid_twice(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """Tier 2 takes a copy of an already recorded line over as a new result: the job's
    usage and cost then include that answer twice, and the log says "took over 1
    results" for a row that was never missing."""
    path = job.write(rows(10))
    assert cli("run", path).exit_code == 0
    data = job.output.read_bytes()
    last = data.splitlines(keepends=True)[-1]
    job.output.write_bytes(data + last)  # e.g. a careless `tail -1 out >> out`
    sim.reset_stats()
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0
    assert output_ids(job.output) == Counter({r["id"]: 1 for r in rows(10)})
    # Nothing was re-sent or replaced: what the job paid is exactly what the output holds.
    assert job.summary()["usage"]["prompt_tokens"] == file_usage(job.output)


# -- 2. --dry-run crashes on a read-only index that has results to adopt -------------------
def test_dry_run_after_an_interrupted_takeover_does_not_crash(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """Index lost, and the run that rebuilt it stopped at a bad input line before its plan
    adopted the taken-over results. The index is now trusted as is, so --dry-run opens it
    read-only — and its plan tries to write the adoption into it: internal error, exit 70,
    and a crash file written by a dry run."""
    path = job.write(rows(10))
    assert cli("run", path).exit_code == 0
    (job.output.with_name("job.state") / "rows.sqlite").unlink()
    good = job.input.read_bytes()
    job.input.write_bytes(good + b"{not json\n")
    assert cli("run", path).exit_code == 1  # took over 10 results, then refused the input
    job.input.write_bytes(good)  # the user fixes the line and looks before running
    sim.reset_stats()
    result = cli("run", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "internal error" not in result.output
    assert not crash_files(job)
    assert sim.stats.requests == 0


# -- 3. an older copy of the output is taken as answers to the current prompt -------------
def test_output_restored_from_an_older_copy_is_not_taken_as_answers_to_the_new_prompt(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path
) -> None:
    """The rebuild keeps the index's request hash for an id even when the line it finds is
    not the line the index recorded. Restoring yesterday's output after a prompt change
    makes batchgpt call the old answers current: nothing is sent, the new (paid) answers
    are gone, and no message says anything happened."""
    path = job.write(rows(10), prompt="Summarize: {text}")
    assert cli("run", path).exit_code == 0
    backup = tmp_path / "backup.jsonl"
    shutil.copy(job.output, backup)
    path = job.write(prompt="Summarize NEW: {text}")
    assert cli("run", path).exit_code == 0  # 10 changed rows sent again, old lines compacted
    shutil.copy(backup, job.output)  # restore the older copy
    sim.reset_stats()
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    stale = [cid for cid, texts in contents(job.output).items()
             if not texts[-1].startswith("[sandbox] Summarize NEW")]
    assert not stale, f"answers to the old prompt kept as current: {stale}"


# -- 4. an index behind the output makes the rebuild re-send answered rows ----------------
def test_index_behind_the_output_does_not_resend_rows_answered_since(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path
) -> None:
    """The index is older than the output (restored from a backup, or its last
    transactions lost with the WAL / on power loss, which design.md says "only makes more
    rows 'not done'") and a compaction ran since. The rebuild keeps the old request
    hashes for lines it finds elsewhere, so every row re-run since is sent and paid
    again, although its answer to the current request is in the output."""
    path = job.write(rows(10), prompt="Summarize: {text}")
    assert cli("run", path).exit_code == 0
    index = job.output.with_name("job.state") / "rows.sqlite"
    saved = tmp_path / "rows.sqlite.bak"
    shutil.copy(index, saved)
    path = job.write(prompt="Summarize NEW: {text}")
    assert cli("run", path).exit_code == 0  # answers to the new prompt, compacted
    shutil.copy(saved, index)
    sim.reset_stats()
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0, f"re-sent {sorted(sent_ids(sim))}"


# -- 5. after a killed rerun, reordering the output keeps the stale line ------------------
def test_reordered_output_after_a_killed_rerun_keeps_the_new_answers(
    tmp_path: Path, slow_sim: Simulator, cli: Any
) -> None:
    """A rerun (prompt changed) killed before its compaction leaves each re-sent id twice
    in the output, old line first. Any hand edit that reorders lines (`sort -o` puts the
    two lines of an id in random order) sends the next open to a rebuild, which keeps an
    id's *last* line: the stale answer is kept under the new request's hash and the new,
    paid answer is compacted away."""
    job = JobFiles(tmp_path, slow_sim.base_url)
    path = job.write(rows(30), prompt="Summarize: {text}", limits={"concurrency": 2})
    assert cli("run", path).exit_code == 0
    job.write(prompt="Summarize NEW: {text}")
    run = Cli(job)
    run.until("6 re-sent answers in the output", lambda: line_count(job.output) >= 36)
    run.kill(signal.SIGKILL)
    run.wait()
    new_before = {cid for cid, texts in contents(job.output).items()
                  if any(t.startswith("[sandbox] Summarize NEW") for t in texts)}
    assert new_before
    # Reorder: for each id, its newer line now comes before its older one.
    lines = job.output.read_bytes().splitlines(keepends=True)
    lines.sort(key=lambda b: json.loads(b)["custom_id"])
    grouped = [list(g) for _, g in
               itertools.groupby(lines, key=lambda b: json.loads(b)["custom_id"])]
    job.output.write_bytes(b"".join(line for g in grouped for line in reversed(g)))

    slow_sim.config.latency_s = 0.0
    start = len(slow_sim.stats.bodies)
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert output_ids(job.output) == Counter({r["id"]: 1 for r in rows(30)})
    stale = sorted(cid for cid, texts in contents(job.output).items()
                   if not texts[0].startswith("[sandbox] Summarize NEW"))
    assert not stale, f"stale answers kept as current, new ones dropped: {stale}"
    assert not (new_before & set(sent_ids(slow_sim, start)))


# -- 6. two --fresh in the same second overwrite the first set-aside output ---------------
def test_fresh_twice_in_the_same_second_keeps_both_previous_outputs(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--fresh names the set-aside files by a one-second UTC stamp and moves them with
    os.replace: a second --fresh in the same second (a small job, a retry loop, a
    library caller) silently overwrites the first one's .previous file — paid results
    destroyed. (Seen with plain CLI subprocesses too; the stamp is pinned here to make
    "the same second" deterministic.) Torn/unreadable set-asides avoid this with a .2
    suffix; .previous files don't."""
    monkeypatch.setattr("batchgpt.store.stamp", lambda: "20260101T000000Z")
    path = job.write(rows(3), prompt="First: {text}")
    assert cli("run", path).exit_code == 0
    path = job.write(prompt="Second: {text}")
    assert cli("run", path, "--fresh", "--yes").exit_code == 0
    path = job.write(prompt="Third: {text}")
    assert cli("run", path, "--fresh", "--yes").exit_code == 0
    kept = [t for p in job.output.parent.glob("job.previous-*.jsonl")
            if "failures" not in p.name for ts in contents(p).values() for t in ts]
    assert any(t.startswith("[sandbox] First") for t in kept), "first run's results destroyed"
    assert any(t.startswith("[sandbox] Second") for t in kept)


# -- 7. compaction replaces a symlinked output instead of writing through it --------------
def test_symlinked_output_is_not_left_with_every_id_twice_after_compaction(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path
) -> None:
    """`output:` is a symlink to the real file (another volume, a shared folder). Appends
    go through the link, but the compaction renames its new file over the *link*: the
    real file keeps every re-run id twice and gets nothing more, and the job's output is
    now a different file."""
    real = tmp_path / "volume" / "results.jsonl"
    real.parent.mkdir()
    real.touch()
    job.output.parent.mkdir(parents=True)
    job.output.symlink_to(real)
    path = job.write(rows(5), prompt="Summarize: {text}")
    first = cli("run", path)
    if first.exit_code != 0:  # refusing a symlinked output with a message is fine too
        assert "symlink" in first.output or "link" in first.output
        return
    path = job.write(prompt="Summarize NEW: {text}")
    assert cli("run", path).exit_code == 0
    assert output_ids(real) == Counter({r["id"]: 1 for r in rows(5)}), (
        "the real output file holds ids twice after the compaction")
    assert all(ts[0].startswith("[sandbox] Summarize NEW") for ts in contents(real).values())


# -- 8. after an index rebuild, failed rows whose request changed are not sent ------------
def test_failed_rows_fixed_after_an_index_rebuild_are_sent(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """Failures read back from the failures file have no request hash, and the plan
    treats "no hash" as "this very request failed": rows the user fixed are reported as
    failed again and never sent without --retry-failed (with the index intact they are
    sent: the README says a changed request is sent again)."""
    records = rows(6)
    for r in records[:2]:
        r["text"] += f" {POISON}"
    path = job.write(records)
    assert cli("run", path).exit_code == 3  # 2 rows failed for good (400)
    (job.output.with_name("job.state") / "rows.sqlite").unlink()
    job.write(rows(6))  # the two rows fixed
    sim.reset_stats()
    result = cli("run", path)
    assert sorted(sent_ids(sim)) == ["r0000", "r0001"], result.output
    assert result.exit_code == 0, result.output
    assert not job.failures.exists()


# -- 9. two job files with the same (default) name share an output -----------------------
def test_two_job_files_with_the_same_default_name_cannot_share_an_output(
    tmp_path: Path, sim: Simulator, cli: Any
) -> None:
    """The one-output-one-job check compares job names only, and the name defaults to the
    job file's stem: jobs/a/job.yaml and jobs/b/job.yaml writing ../shared/results.jsonl
    are both "job". Each run then treats the other's rows as changed, re-sends them (paid
    again) and compacts the other job's paid results away — forever, in turn."""
    def make(sub: str, tag: str) -> Path:
        folder = tmp_path / "jobs" / sub
        folder.mkdir(parents=True)
        write_jsonl(folder / "in.jsonl", rows(5, tag))
        (folder / "job.yaml").write_text(yaml.safe_dump({
            "input": "in.jsonl", "output": "../../shared/results.jsonl",
            "model": "gpt-4o-mini", "prompt": "Summarize: {text}",
            "params": {"max_tokens": 20}, "api": {"base_url": sim.base_url}}))
        return folder / "job.yaml"

    a, b = make("a", "alpha"), make("b", "beta")
    out = tmp_path / "shared" / "results.jsonl"
    assert cli("run", a).exit_code == 0
    before = out.read_bytes()
    sim.reset_stats()
    result = cli("run", b)
    assert result.exit_code != 0, "job b ran on job a's output"
    assert sim.stats.requests == 0
    assert out.read_bytes() == before


# -- 10. a FIFO input hangs the run ------------------------------------------------------
def test_fifo_input_does_not_hang(tmp_path: Path, sim: Simulator) -> None:
    """The input is read twice (the plan's scan, then the pending rows re-read by
    offset). A named pipe (`mkfifo in; zcat big.gz > in &`) is consumed by the scan; the
    second open blocks forever waiting for a writer — inside the event loop, so SIGTERM
    does not end it either. The output, failures and summary refuse non-regular files;
    the input does not."""
    job = JobFiles(tmp_path, sim.base_url)
    job.write(rows(3))
    data = job.input.read_bytes()
    job.input.unlink()
    os.mkfifo(job.input)

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), job.input.open("wb") as fh:
            fh.write(data)  # BrokenPipe: batchgpt refused the pipe without reading it

    threading.Thread(target=feed, daemon=True).start()
    run = Cli(job)
    try:
        code = run.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.wait()
        pytest.fail("batchgpt hung on a FIFO input (killed after 30 s)")
    finally:
        # Release the feeder if batchgpt never opened the pipe.
        with contextlib.suppress(OSError):
            os.close(os.open(job.input, os.O_RDONLY | os.O_NONBLOCK))
    assert "Traceback" not in run.stderr
    assert code in (0, 1), run.stderr


# -- 11. a lock path that is not a file is an internal error ------------------------------
def test_lock_path_that_is_a_folder_is_a_clear_error_not_an_internal_one(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """JobLock.acquire runs outside Store.open's OSError handling: a `lock` that is a
    folder (or unreadable) ends in "internal error: IsADirectoryError ... a bug in
    batchgpt", exit 70, and a crash file, where every other bad state path gets a
    one-line StateError."""
    path = job.write(rows(3))
    assert cli("run", path).exit_code == 0
    lock = job.output.with_name("job.state") / "lock"
    lock.unlink()
    lock.mkdir()
    result = cli("run", path)
    assert result.exit_code not in (0, 70), result.output
    assert "internal error" not in result.output
    assert not crash_files(job)


# -- 12. --dry-run and status write files into the state folder ---------------------------
def test_dry_run_and_status_write_nothing_in_the_state_folder(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """Opening the WAL index read-only creates rows.sqlite-wal and rows.sqlite-shm (and
    status touches the -shm again each time): a dry run is documented to write nothing."""
    path = job.write(rows(5))
    assert cli("run", path).exit_code == 0
    before = state_files(job)
    assert cli("run", path, "--dry-run").exit_code == 0
    assert cli("status", path).exit_code == 0
    assert state_files(job) == before


# -- 13. status counts results of rows no longer in the input as this input's -------------
def test_status_counts_pending_rows_of_the_current_input(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """`status` computes pending as input lines − results − failures over the whole
    output: results of rows removed from the input (kept, as the README says) hide new
    rows. Today's input of 15 done rows + 5 new ones shows "succeeded 20, pending 0";
    a dry run of the same job says 5 to send."""
    path = job.write(rows(20))
    assert cli("run", path).exit_code == 0
    today = rows(20)[5:] + [{"id": f"n{i:03d}", "text": f"n{i:03d} new here."} for i in range(5)]
    job.write(today)
    result = cli("status", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["requests"]["total"] == 20
    assert info["requests"]["pending"] == 5, info["requests"]


# -- 14. an id with an escaped lone surrogate is an internal error ------------------------
def test_input_id_with_a_lone_surrogate_is_an_input_error_not_an_internal_one(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """`{"id": "x\\ud800y", ...}` is valid JSON and passes validation, then the plan hands
    the id to SQLite, which cannot encode it: "internal error: UnicodeEncodeError ... a bug
    in batchgpt", exit 70, on every run — one odd line makes the whole job unrunnable
    without naming the line."""
    path = job.write([*rows(3), '{"id": "x\\ud800y", "text": "odd id here."}'])
    result = cli("run", path)
    assert "internal error" not in result.output, result.output
    assert not crash_files(job)
    assert result.exit_code in (0, 1)


# -- 15. a compaction that cannot write its file ends the run as an internal error --------
def test_compaction_that_cannot_write_its_file_is_a_warning_not_an_internal_error(
    job: JobFiles, sim: Simulator
) -> None:
    """finalize() says compaction problems are "logged, never raised", but an OSError from
    write_compacted (ENOSPC in real life: the compaction needs a second copy of the
    output; here a dangling `job.jsonl.compact` link gives the same OSError
    deterministically) escapes: exit 70 "internal error", the summary of the run that
    just paid for 10 rows is never written, and every later run stops at the compaction
    in open() ("cannot open the job's state") although nothing is wrong with the results.
    On a full disk it is worse: the partial .compact file is left eating the space, and
    the next runs die with "internal error" in JobLock.acquire (its pid write), before
    open() could remove it."""
    job.write(rows(10), prompt="Summarize: {text}")
    first = Cli(job)
    assert first.wait() == 0, first.stderr
    (job.output.parent / "job.jsonl.compact").symlink_to(job.dir / "no" / "such" / "dir")
    job.write(prompt="Summarize NEW: {text}")
    second = Cli(job)
    code = second.wait()
    assert "internal error" not in second.stderr and "Traceback" not in second.stderr, (
        second.stderr)
    assert code == 0, second.stderr
    assert job.summary()["plan"]["changed"] == 10  # this run's summary, not the last one's
    third = Cli(job)
    assert third.wait() == 0, third.stderr
    assert output_ids(job.output) == Counter({r["id"]: 1 for r in rows(10)})


# -- 16. answers that arrive after the checkpoint broke are paid and thrown away ----------
def test_answers_arriving_after_the_state_folder_vanished_are_kept_in_the_output(
    tmp_path: Path, slow_sim: Simulator
) -> None:
    """The writer checks the state folder *before* appending the batch in hand, and once
    broken it refuses every later put: the batch being committed and every request still
    in flight (up to `concurrency`) are answered, paid, and dropped — although the output,
    the durable record, is writable and the next run would take them over. Their usage is
    missing from the summary too (cost under-reported)."""
    job = JobFiles(tmp_path, slow_sim.base_url)
    job.write(rows(200), limits={"concurrency": 8})
    run = Cli(job)
    run.until("40 output lines", lambda: line_count(job.output) >= 40)
    shutil.rmtree(job.output.with_name("job.state"))  # a clean-up job, an `rm -rf` ...
    assert run.wait() == 1, run.stderr
    assert "Traceback" not in run.stderr
    answered = slow_sim.stats.requests
    lines = read_jsonl(job.output)
    assert len(lines) == answered, f"{answered - len(lines)} paid answers thrown away"
    assert job.summary()["this_run"]["requests"]["succeeded"] == answered


# -- 17. an absurd usage figure from the server wedges the job for good -------------------
def test_absurd_usage_from_a_server_does_not_wedge_the_job(tmp_path: Path, cli: Any) -> None:
    """A proxy answers with `"prompt_tokens": 1e20` (an int past SQLite's 64 bits). The
    writer appends the line, the index commit overflows, the run stops (storage) — and
    the other answers in flight are thrown away. Worse, every later run takes that line
    over on open, hits the same OverflowError outside any handler and dies with
    "internal error", exit 70, even after the server is fixed: the job can't run again
    until someone edits the output by hand."""
    config = SimulatorConfig()
    config.faults.reply_patch = {"usage": {"prompt_tokens": 10**20}}
    with SimulatorThread(config) as sim:
        job = JobFiles(tmp_path, sim.base_url)
        path = job.write(rows(5))
        first = cli("run", path)
        assert "internal error" not in first.output, first.output
        sim.config.faults.reply_patch = None  # the server is fixed
        second = cli("run", path)
        assert "internal error" not in second.output, second.output
        assert second.exit_code == 0, second.output
        assert output_ids(job.output) == Counter({r["id"]: 1 for r in rows(5)})
        assert sim.stats.requests == 5, "answers already paid for were sent again"
