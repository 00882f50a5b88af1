"""Crash safety of the real CLI: ``python -m batchgpt.cli run JOB`` as a subprocess against
the simulator, killed (SIGKILL), interrupted (SIGTERM, SIGINT, twice), given a torn output
line and an unwritable output folder. Assertions are on the files written, the checkpoint
and what the simulator received.

Waiting on the subprocess is done by polling the output file, the simulator's counters or
the subprocess's stderr in a short loop with a timeout (it is another process: there is
nothing to await), never by a fixed sleep.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchgpt.breaker import threshold_for
from batchgpt.runner import RunOptions
from batchgpt.simulator import FaultConfig, Simulator, SimulatorConfig, SimulatorThread
from tests.conftest import JobFiles

ROWS = 300
CONCURRENCY = 16
TIMEOUT_S = 30.0  # safety nets for polls and waits: only a run that hangs gets near it
GRACE_S = RunOptions().grace_s  # the CLI's grace period after a first SIGINT/SIGTERM


# -- helpers ------------------------------------------------------------------------------
def records(n: int = ROWS) -> list[dict[str, Any]]:
    # The id is the first word of the text, so every request the simulator saw names its row.
    return [{"id": f"r{i:04d}", "text": f"r{i:04d} reports on local news. More text follows."}
            for i in range(n)]


IDS = [r["id"] for r in records()]


def sent_ids(sim: Simulator, start: int = 0) -> Counter[str]:
    """How often each row was sent (requests the simulator received, from ``start`` on)."""
    bodies = list(sim.stats.bodies)[start:]
    return Counter(b["messages"][-1]["content"].split()[1] for b in bodies)


class Cli:
    """One ``batchgpt run`` subprocess; stdout and stderr go to files (no pipe to fill)."""

    def __init__(self, job: JobFiles, *args: str) -> None:
        self.job = job
        n = len(list(job.dir.glob("stderr-*.txt")))
        self.stderr_path = job.dir / f"stderr-{n}.txt"
        env = dict(os.environ, OPENAI_API_KEY="sk-test-key")
        env.pop("OPENAI_BASE_URL", None)
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "batchgpt.cli", "run", str(job.job_path), *args],
                stdout=subprocess.DEVNULL, stderr=err, env=env,
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"batchgpt did not exit within {timeout}s; stderr:\n{self.stderr}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.proc.pid, sig)

    def until(self, what: str, cond: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
        """Poll ``cond`` while the subprocess runs; fail if it exits first or times out."""
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"batchgpt exited ({self.proc.returncode}) before {what}; "
                            f"stderr:\n{self.stderr}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"timed out waiting for {what}; stderr:\n{self.stderr}")
            time.sleep(0.005)


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def has_lines(path: Path, n: int) -> Callable[[], bool]:
    return lambda: line_count(path) >= n


def committed(job: JobFiles) -> tuple[set[str], int]:
    """The checkpoint as a dead run left it: the ids marked done, and the output size it
    vouches for. Read-only, so reading it changes nothing."""
    db_path = job.output.with_name("job.state") / "rows.sqlite"
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        ids = {cid for (cid,) in db.execute("SELECT custom_id FROM results")}
        row = db.execute("SELECT value FROM meta WHERE key = 'output_size'").fetchone()
    finally:
        db.close()
    return ids, int(row[0]) if row else 0


def complete_line_ids(job: JobFiles) -> set[str]:
    """Ids of the whole result lines in the output, committed or not: all of them are
    paid results, and none of them may be sent again."""
    data = job.output.read_bytes() if job.output.exists() else b""
    return {json.loads(line)["custom_id"] for line in data.splitlines(keepends=True)
            if line.endswith(b"\n")}


def output_lines(job: JobFiles) -> list[dict[str, Any]]:
    """Every output line, each of which must be whole JSON."""
    data = job.output.read_bytes() if job.output.exists() else b""
    assert data == b"" or data.endswith(b"\n"), f"torn last line: {data[-200:]!r}"
    return [json.loads(line) for line in data.splitlines()]


def assert_every_row_once(job: JobFiles, ids: list[str] = IDS) -> list[dict[str, Any]]:
    lines = output_lines(job)
    got = Counter(line["custom_id"] for line in lines)
    assert sorted(got) == sorted(ids), "rows missing from, or foreign rows in, the output"
    twice = [cid for cid, n in got.items() if n > 1]
    assert not twice, f"rows in the output more than once: {twice[:10]}"
    assert all(line["error"] is None and line["response"]["status_code"] == 200
               for line in lines)
    return lines


def assert_usage_matches_output(job: JobFiles, lines: list[dict[str, Any]]) -> None:
    usage = job.summary()["usage"]
    bodies = [line["response"]["body"]["usage"] for line in lines]
    assert usage["prompt_tokens"] == sum(u["prompt_tokens"] for u in bodies)
    assert usage["completion_tokens"] == sum(u["completion_tokens"] for u in bodies)
    assert usage["total_tokens"] == sum(u["total_tokens"] for u in bodies)


@pytest.fixture
def fast_sim() -> Iterator[Simulator]:
    with SimulatorThread(SimulatorConfig(latency_s=0.02, latency_jitter_s=0.03)) as s:
        yield s


@pytest.fixture
def crash_job(tmp_path: Path, fast_sim: Simulator) -> JobFiles:
    job = JobFiles(tmp_path, fast_sim.base_url)
    job.write(records(), limits={"concurrency": CONCURRENCY})
    return job


# -- SIGKILL ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [int(os.environ.get("BATCHGPT_CRASH_SEED", "20240"))])
def test_sigkill_at_random_points_then_rerun_answers_every_row_exactly_once(
    crash_job: JobFiles, fast_sim: Simulator, seed: int
) -> None:
    job, sim = crash_job, fast_sim
    rng = random.Random(seed)
    kills = 4
    # Kill once the output holds this many lines; each run resumes and goes further.
    points = sorted(rng.sample(range(10, ROWS - 10), kills))
    written_before: set[str] = set()
    for point in points:
        start = len(sim.stats.bodies)
        run = Cli(job)
        run.until(f"{point} output lines", has_lines(job.output, point))
        run.kill(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
        # Nothing written to the output before this run was sent again by it.
        resent = written_before & set(sent_ids(sim, start))
        assert not resent, f"rows in the output before were sent again: {sorted(resent)[:10]}"
        # Whatever the checkpoint counts as done is durably in the output, as whole lines.
        done, size = committed(job)
        data = job.output.read_bytes()
        assert len(data) >= size
        prefix = [json.loads(line) for line in data[:size].splitlines()]
        assert {p["custom_id"] for p in prefix} == done and len(prefix) == len(done)
        written = complete_line_ids(job)
        assert written >= done >= written_before  # a kill never loses what was written
        written_before = written

    start = len(sim.stats.bodies)
    final = Cli(job)
    assert final.wait() == 0, final.stderr
    assert not (written_before & set(sent_ids(sim, start)))
    lines = assert_every_row_once(job)

    sent = sent_ids(sim)
    assert set(sent) == set(IDS)
    extra = sum(sent.values()) - ROWS
    again = [cid for cid, n in sent.items() if n > 1]
    # Only requests in flight at a kill (sent, answer not yet written) can be sent again:
    # at most `concurrency` rows per kill. Written but uncommitted lines are taken over.
    assert extra <= kills * CONCURRENCY, f"{extra} requests repeated over {kills} kills"
    assert len(again) <= kills * CONCURRENCY
    assert max(sent.values()) <= 1 + kills

    summary = job.summary()
    assert summary["outcome"] == "completed"
    assert summary["requests"] == {"total": ROWS, "succeeded": ROWS, "failed": 0,
                                   "pending": 0, "not_in_input": 0}
    assert_usage_matches_output(job, lines)
    assert "Traceback" not in final.stderr


# -- torn last line -----------------------------------------------------------------------
def _half_line(custom_id: str) -> bytes:
    line = json.dumps({"id": "batch_req_torn", "custom_id": custom_id,
                       "response": {"status_code": 200, "request_id": "req_torn",
                                    "body": {"object": "chat.completion", "choices": []}},
                       "error": None}, separators=(",", ":")).encode()
    return line[: len(line) // 2]


def test_torn_last_line_is_set_aside_and_its_row_still_answered_once(
    crash_job: JobFiles, fast_sim: Simulator
) -> None:
    job, sim = crash_job, fast_sim
    run = Cli(job)
    run.until("100 output lines", lambda: line_count(job.output) >= 100)
    run.kill()
    run.wait()
    _done, _size = committed(job)
    written = complete_line_ids(job)
    pending = sorted(set(IDS) - written)
    victim = pending[len(pending) // 2]
    torn = _half_line(victim)
    with job.output.open("ab") as fh:  # what a crash mid-write leaves: half a line
        fh.write(torn)
    kept = job.output.read_bytes()[: -len(torn)]

    start = len(sim.stats.bodies)
    rerun = Cli(job)
    assert rerun.wait() == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert job.output.read_bytes().startswith(kept)  # every whole line untouched
    lines = assert_every_row_once(job)  # the half line is gone; its row is there once
    assert next(line for line in lines if line["custom_id"] == victim)["id"] != "batch_req_torn"
    again = sent_ids(sim, start)
    assert again[victim] == 1
    assert set(again) == set(pending)  # exactly the rows with no whole line, each once
    assert_usage_matches_output(job, lines)
    # The fragment was moved aside, to a file the log names, not dropped.
    aside = sorted(job.output.parent.glob("job.jsonl.torn-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == torn
    assert str(aside[0]) in rerun.stderr

    # The same on a finished job: the half line is set aside, nothing is sent.
    before = job.output.read_bytes()
    with job.output.open("ab") as fh:
        fh.write(_half_line(IDS[7]))
    sim.reset_stats()
    last = Cli(job)
    assert last.wait() == 0, last.stderr
    assert f"nothing to do: all {ROWS} rows already succeeded" in last.stderr
    assert sim.stats.requests == 0
    assert job.output.read_bytes() == before
    assert len(list(job.output.parent.glob("job.jsonl.torn-*"))) == 2


# -- SIGTERM / SIGINT ---------------------------------------------------------------------
def _interrupt_finishes_in_flight(job: JobFiles, sim: Simulator, sig: int,
                                  code: int) -> None:
    sim.config.latency_s = 0.3  # ~16 requests always in flight
    sim.config.latency_jitter_s = 0.0
    run = Cli(job)
    run.until("40 output lines", lambda: line_count(job.output) >= 40)
    run.kill(sig)
    assert run.wait() == code, run.stderr
    assert f"{signal.Signals(sig).name} received" in run.stderr
    assert "Traceback" not in run.stderr

    lines = output_lines(job)
    summary = job.summary()
    assert summary["outcome"] == "interrupted"
    assert summary["requests"]["succeeded"] == len(lines)
    assert summary["requests"]["pending"] == ROWS - len(lines)
    # Every request that was sent got its answer written: in-flight ones were finished,
    # nothing answered was thrown away.
    assert sim.stats.requests == len(lines)
    assert len({line["custom_id"] for line in lines}) == len(lines)
    assert_usage_matches_output(job, lines)
    done, size = committed(job)
    assert size == job.output.stat().st_size and len(done) == len(lines)

    sim.config.latency_s = 0.0
    start = len(sim.stats.bodies)
    rerun = Cli(job)
    assert rerun.wait() == 0, rerun.stderr
    again = sent_ids(sim, start)
    assert set(again) == set(IDS) - done  # no succeeded row is sent again
    assert all(n == 1 for n in sent_ids(sim).values())
    assert_usage_matches_output(job, assert_every_row_once(job))


def test_sigterm_finishes_in_flight_and_exits_143(crash_job: JobFiles,
                                                  fast_sim: Simulator) -> None:
    _interrupt_finishes_in_flight(crash_job, fast_sim, signal.SIGTERM, 143)


def test_sigint_finishes_in_flight_and_exits_130(crash_job: JobFiles,
                                                 fast_sim: Simulator) -> None:
    _interrupt_finishes_in_flight(crash_job, fast_sim, signal.SIGINT, 130)


def test_second_sigterm_abandons_hung_requests_and_exits_143(
    crash_job: JobFiles, fast_sim: Simulator
) -> None:
    """The real signal path. Every request hangs for an hour and times out only after ten
    minutes, so after the first SIGTERM nothing but the grace period (the CLI's 30 s) or a
    second signal can end the run. That a second signal ends it without waiting out the
    grace is pinned down on a fake clock (tests/test_runner_clock.py); here the run is
    given less than the grace period to exit, as a safety net, so a run that only the grace
    period ended fails instead of passing late."""
    job, sim = crash_job, fast_sim
    sim.config.faults = FaultConfig(hang_rate=1.0, hang_s=3600)
    job.write(timeout_s=600)
    # No answer ever comes back, so the circuit breaker, which lets at most its threshold
    # of requests out until one is answered, keeps that many hanging (5 of the 16 slots).
    hung = threshold_for(CONCURRENCY)
    run = Cli(job)
    run.until(f"{hung} requests in flight", lambda: sim.stats.in_flight >= hung)
    run.kill(signal.SIGTERM)
    run.until("the first signal to be handled", lambda: "SIGTERM received" in run.stderr)
    assert sim.stats.in_flight == hung  # the first signal waits for them
    run.kill(signal.SIGTERM)
    assert run.wait(timeout=GRACE_S / 2) == 143, run.stderr
    err = run.stderr
    assert err.index("SIGTERM received") < err.index("second signal: abandoning") \
        < err.index("interrupted:")
    assert "Traceback" not in err
    summary = job.summary()
    assert summary["outcome"] == "interrupted"
    assert summary["requests"]["succeeded"] == 0
    assert summary["requests"]["pending"] == ROWS
    assert output_lines(job) == []
    # Nothing was sent after the first signal, and the hung requests were never answered:
    # their connections were closed, not left hanging on the server.
    assert sim.stats.requests == hung
    deadline = time.monotonic() + TIMEOUT_S
    while sim.stats.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.stats.by_status == {0: hung}

    sim.config.faults = FaultConfig()
    rerun = Cli(job)
    assert rerun.wait() == 0, rerun.stderr
    assert_usage_matches_output(job, assert_every_row_once(job))


# -- unwritable output --------------------------------------------------------------------
def _make_read_only(paths: list[Path]) -> Callable[[], None]:
    """Make paths unwritable and return the undo. chmod doesn't stop root, so as root the
    immutable attribute (chattr +i, which stops root too) is used instead."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)

        def undo_chmod() -> None:
            for p, mode in modes.items():
                p.chmod(mode)

        return undo_chmod
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("running as root (chmod does not stop root) and chattr is not installed")
    probe = subprocess.run([chattr, "+i", *map(str, paths)], capture_output=True, text=True)
    if probe.returncode != 0:
        subprocess.run([chattr, "-i", *map(str, paths)], capture_output=True)
        pytest.skip("running as root (chmod does not stop root) and this filesystem or "
                    f"container does not allow chattr +i: {probe.stderr.strip()}")

    def undo_chattr() -> None:
        subprocess.run([chattr, "-i", *map(str, paths)], check=True)

    return undo_chattr


@pytest.mark.parametrize("what", ["folder", "folder+output+torn tail"])
def test_unwritable_output_folder_exits_1_sends_nothing_and_keeps_the_checkpoint(
    crash_job: JobFiles, fast_sim: Simulator, what: str
) -> None:
    job, sim = crash_job, fast_sim
    run = Cli(job, "--limit", "120")
    assert run.wait() == 0, run.stderr
    read_only = [job.output.parent]
    if "torn" in what:
        with job.output.open("ab") as fh:  # a torn tail, which can't be cut now
            fh.write(_half_line(IDS[-1]))
        read_only.append(job.output)
    before = job.output.read_bytes()
    done, size = committed(job)
    assert len(done) == 120

    # The state folder inside stays writable: it is the output's folder that isn't.
    undo = _make_read_only(read_only)
    try:
        sim.reset_stats()
        blocked = Cli(job)
        code = blocked.wait()
        err = blocked.stderr
    finally:
        undo()
    assert code == 1, err
    assert "Traceback" not in err and "never retrieved" not in err, err
    assert str(job.output) in err or str(job.output.parent) in err, err
    assert "cannot" in err, err
    assert sim.stats.requests == 0  # nothing paid for that could not be written
    assert job.output.read_bytes() == before
    assert committed(job) == (done, size)

    rerun = Cli(job)
    assert rerun.wait() == 0, rerun.stderr
    assert sim.stats.requests == ROWS - 120
    assert_usage_matches_output(job, assert_every_row_once(job))


def test_output_becoming_unwritable_mid_run_stops_promptly_and_keeps_the_checkpoint(
    crash_job: JobFiles, fast_sim: Simulator
) -> None:
    """The disk-full / remounted-read-only case: writes fail on the open output."""
    job, sim = crash_job, fast_sim
    run = Cli(job)
    run.until("50 output lines", lambda: line_count(job.output) >= 50)
    undo = _make_read_only([job.output])
    try:
        code = run.wait()
    finally:
        undo()
    err = run.stderr
    assert code == 1, err
    assert "Traceback" not in err and "never retrieved" not in err, err
    assert f"cannot write {job.output}" in err
    done, size = committed(job)
    assert job.output.stat().st_size == size  # no partial line: nothing could be written
    assert len(output_lines(job)) == len(done)
    # It stopped at the first failed write: only requests already in flight went on.
    assert sim.stats.requests <= len(done) + CONCURRENCY
    summary = job.summary()
    assert summary["outcome"] == "stopped"
    assert summary["requests"]["succeeded"] == len(done)

    start = len(sim.stats.bodies)
    rerun = Cli(job)
    assert rerun.wait() == 0, rerun.stderr
    assert set(sent_ids(sim, start)) == set(IDS) - done
    assert_usage_matches_output(job, assert_every_row_once(job))
