"""``--log-format json``: one JSON object per line, each an event with typed fields.

Cron users feed these lines to a log pipeline: every line must parse, name its event and
its job, and carry numbers as numbers (not inside a sentence). The text format stays a
sentence for people, and its periodic progress line includes the ETA.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchgpt import JobConfig, RunOptions
from batchgpt.clock import FakeClock
from batchgpt.logs import JsonFormatter
from batchgpt.runner import PROGRESS_EVERY_S, run_job
from batchgpt.simulator import FaultConfig, Simulator, SimulatorConfig
from tests.conftest import JobFiles, articles

FAST_RETRY = {"max_attempts": 4, "initial_delay_s": 0.01, "max_delay_s": 0.02}


def parse_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line as a JSON object (fails the test on any other line)."""
    events = []
    for line in text.splitlines():
        if line.strip():
            obj = json.loads(line)
            assert isinstance(obj, dict), line
            events.append(obj)
    return events


def by_event(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        out.setdefault(e["event"], []).append(e)
    return out


def test_every_line_is_a_json_event_with_typed_fields(
    tmp_path: Path, cli: Any
) -> None:
    with_faults = SimulatorConfig(seed=7, faults=FaultConfig(server_error_rate=0.3))
    from batchgpt.simulator import SimulatorThread

    with SimulatorThread(with_faults) as sim:
        job = JobFiles(tmp_path, sim.base_url)
        records = articles(10)
        records[3]["text"] = "__POISON__"
        path = job.write(records, retry=FAST_RETRY)
        log_file = tmp_path / "run.log"
        result = cli("run", path, "--log-format", "json", "--log-file", log_file, "-v")
        assert result.exit_code == 3, result.output
        assert sim.stats.by_status.get(500, 0) > 0  # the seed does fail some attempts

    events = parse_lines(log_file.read_text(encoding="utf-8"))
    assert parse_lines(result.stderr) == events  # stderr: the same lines, nothing else
    for e in events:
        assert {"ts", "level", "event", "job", "msg"} <= set(e)
        assert e["job"] == "job"
    kinds = by_event(events)
    assert {"plan", "retry", "row_failed", "summary", "outcome"} <= set(kinds)

    (plan,) = kinds["plan"]
    assert {k: plan[k] for k in ("rows", "done", "to_send", "new", "retried", "changed")} == {
        "rows": 10, "done": 0, "to_send": 10, "new": 10, "retried": 0, "changed": 0}

    for retry in kinds["retry"]:
        assert retry["level"] == "debug"
        assert retry["error_code"] == "server_error" and retry["status"] == 500
        assert isinstance(retry["attempt"], int) and isinstance(retry["delay_s"], float)
    failed = [e for e in kinds["row_failed"] if e["error_code"] == "context_length_exceeded"]
    assert [(e["row"], e["attempts"], e["retryable"]) for e in failed] == [("a0004", 1, False)]

    (summary,) = kinds["summary"]
    assert summary["summary"] == job.summary()  # the end-of-run table, as data

    (outcome,) = kinds["outcome"]
    assert outcome["outcome"] == "failed_rows" and outcome["exit_code"] == 3
    assert outcome["output"] == str(job.output)
    assert outcome["msg"].startswith("finished with 1 failed rows")


def test_a_stop_is_an_event_with_its_reason_and_exit_code(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path
) -> None:
    sim.config.faults = FaultConfig(echo_auth_status=502)
    path = job.write(articles(8))
    result = cli("run", path, "--log-format", "json")
    assert result.exit_code == 1
    kinds = by_event(parse_lines(result.stderr))
    (stopping,) = kinds["stopping"]
    assert stopping["level"] == "warning"
    assert stopping["reason"] == "circuit breaker" and stopping["exit_code"] == 1
    assert stopping["msg"] == f"stopping: {job.summary()['message']}"
    assert kinds["outcome"][0]["stopped"] == "circuit breaker"


def test_the_dry_run_estimate_is_an_event_too(job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(3))
    result = cli("run", path, "--dry-run", "--log-format", "json")
    assert result.exit_code == 0
    (estimate,) = by_event(parse_lines(result.stderr))["estimate"]
    assert estimate["estimate"]["pending"] == 3
    assert estimate["estimate"]["sample_request"]["model"] == "gpt-4o-mini"


def test_a_store_warning_is_a_log_event_naming_the_job(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """Records logged without typed fields still parse, as ``"event": "log"``."""
    path = job.write(articles(3))
    assert cli("run", path).exit_code == 0
    with job.output.open("ab") as fh:
        fh.write(b'{"custom_id": "torn')  # a torn last line
    result = cli("run", path, "--log-format", "json")
    assert result.exit_code == 0
    logs = by_event(parse_lines(result.stderr))["log"]
    assert any("torn" in e["msg"] and e["job"] == "job" for e in logs)


# -- the periodic progress line, on a fake clock ------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[Simulator]:
    sim = Simulator(SimulatorConfig(faults=FaultConfig(hang_rate=1.0, hang_s=3600.0)))
    await sim.start()
    yield sim
    await sim.stop()


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("batchgpt")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def _failures_recorded(job: JobFiles) -> int:
    """Failures committed to the job's index (read-only: the run holds it open)."""
    db = job.output.with_name("job.state") / "rows.sqlite"
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM failures").fetchone()[0])
    except sqlite3.Error:
        return 0


async def test_progress_every_ten_seconds_with_eta_as_json_and_as_text(
    tmp_path: Path, server: Simulator, captured: list[logging.LogRecord]
) -> None:
    """12 rows: 4 are refused at once (poison), 8 hang. At t=10 s the progress line says
    4 of 12 settled, in 10 s, so 8 more take 20 s."""
    job = JobFiles(tmp_path, server.base_url)
    records = articles(12)
    for record in records[:4]:
        record["text"] = "__POISON__"
    job.write(records, limits={"concurrency": 16}, timeout_s=600)
    clock = FakeClock()
    handlers: list[Any] = []
    run = asyncio.create_task(run_job(JobConfig.load(job.job_path), RunOptions(
        clock=clock, expose_signal_handler=handlers.append)))
    deadline = time.monotonic() + 20
    while not (server.stats.by_status.get(400) == 4 and server.stats.in_flight == 8
               and _failures_recorded(job) == 4):  # the 4 answers taken in, not just sent
        assert time.monotonic() < deadline and not run.done()
        await asyncio.sleep(0.005)
    for _ in range(10):  # the rows' tasks resume after their commit returns
        await asyncio.sleep(0)

    await clock.advance_to(PROGRESS_EVERY_S - 0.5)
    assert not [r for r in captured if getattr(r, "event", None) == "progress"]
    await clock.advance_to(PROGRESS_EVERY_S)
    (progress,) = [r for r in captured if getattr(r, "event", None) == "progress"]

    line = json.loads(JsonFormatter().format(progress))
    assert {k: line[k] for k in ("event", "job", "done", "failed", "total", "in_flight",
                                 "rpm", "tpm", "cost_usd", "eta_s", "elapsed_s")} == {
        "event": "progress", "job": "job", "done": 0, "failed": 4, "total": 12,
        "in_flight": 8, "rpm": 72.0, "tpm": 0.0, "cost_usd": 0.0, "eta_s": 20.0,
        "elapsed_s": 10.0}
    text = logging.Formatter("%(message)s").format(progress)
    assert text == ("progress: 0/12 done, 4 failed, 8 in flight, 72 req/min, 0 tok/min, "
                    "cost $0.0000, ETA 20s")

    handlers[0](signal.SIGTERM)
    handlers[0](signal.SIGTERM)
    result = await asyncio.wait_for(run, 20)
    assert result.outcome == "interrupted"


def test_the_json_formatter_never_writes_what_json_cannot_read() -> None:
    record = logging.LogRecord("batchgpt", logging.INFO, __file__, 1, "m", None, None)
    record.event = "progress"
    record.fields = {"eta_s": float("inf"), "nested": {"x": float("nan")}}
    line = json.loads(JsonFormatter().format(record))
    assert line["eta_s"] is None and line["nested"] == {"x": None}


# -- the CLI's own lines: internal errors, interruptions, the log file ---------------------


def test_an_internal_error_is_a_json_event_on_stderr_and_in_the_log_file(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import batchgpt.runner

    def broken(*_: Any) -> str:
        raise RuntimeError("the table renderer is broken")

    monkeypatch.setattr(batchgpt.runner, "render_table", broken)
    path = job.write(articles(2))
    log_file = tmp_path / "run.log"
    result = cli("run", path, "--log-format", "json", "--log-file", log_file,
                 internal_error=True)
    assert result.exit_code == 70
    for text in (result.stderr, log_file.read_text(encoding="utf-8")):
        last = parse_lines(text)[-1]
        assert last["event"] == "internal_error" and last["level"] == "error"
        assert last["error"] == "RuntimeError" and last["exit_code"] == 70
        assert last["job"] == "job"
        assert Path(last["crash_file"]).is_file()
        assert last["msg"].startswith("internal error: RuntimeError: the table renderer")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_input_is_planned_ends_the_run_at_once_with_an_event(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: pytest.MonkeyPatch,
    sig: signal.Signals, code: int
) -> None:
    """A real signal to this process in the middle of planning (a big input takes a
    while): SIGTERM used to kill the run without a word, and a Ctrl-C waited for the
    planning to end and then sent anyway. Nothing is sent, the lock is let go (the next
    run works), and the handlers are the defaults again afterwards."""
    import os

    import batchgpt.runner

    real = batchgpt.runner.make_plan

    def planning(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(batchgpt.runner, "make_plan", planning)
    path = job.write(articles(3))
    result = cli("run", path, "--log-format", "json")
    assert result.exit_code == code, result.output
    (line,) = parse_lines(result.stderr)
    assert line["event"] == "interrupted" and line["signal"] == sig.name
    assert line["exit_code"] == code and "before anything was sent" in line["msg"]
    assert sim.stats.requests == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.undo()
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests == 3


def test_the_runners_own_signal_handling_is_untouched_once_sending_starts(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While rows are sent, SIGTERM is the runner's: finish what is in flight, exit 143
    with the run's summary (not the CLI's planning handler)."""
    import os

    from batchgpt.transport import LeanClient

    real = LeanClient.complete  # the default api.transport's client
    sent = []

    async def complete(self: LeanClient, body: Any) -> Any:
        if not sent:
            os.kill(os.getpid(), signal.SIGTERM)
        sent.append(body)
        return await real(self, body)

    monkeypatch.setattr(LeanClient, "complete", complete)
    path = job.write(articles(20), limits={"concurrency": 1})
    result = cli("run", path, "--log-format", "json")
    assert result.exit_code == 143, result.output
    events = by_event(parse_lines(result.stderr))
    assert "interrupted" not in events
    assert events["stopping"][0]["reason"] == "signal"
    assert events["outcome"][0]["exit_code"] == 143
    assert 1 <= len(sent) < 20
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "missing folder"])
def test_a_log_file_that_cannot_be_a_log_is_refused_at_once_as_a_json_line(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path, kind: str
) -> None:
    """A FIFO used to block the open until a reader came (a cron job hung before it
    started); a device is not a log. Refused, exit 1, nothing sent; the line saying so
    goes to stderr only (the log file is what failed), in the format asked for."""
    import os

    path = job.write(articles(2))
    target = {"fifo": tmp_path / "log.fifo", "device": Path(os.devnull),
              "folder": tmp_path, "missing folder": tmp_path / "nowhere" / "run.log"}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    started = time.monotonic()
    result = cli("run", path, "--log-format", "json", "--log-file", target)
    assert time.monotonic() - started < 10
    assert result.exit_code == 1, result.output
    (line,) = parse_lines(result.stderr)
    assert line["level"] == "error"
    assert line["msg"].startswith(f"cannot write the log file {target}: ")
    assert line["msg"].endswith("; nothing was sent")
    if kind in ("fifo", "device"):
        assert "not a regular file" in line["msg"]
    assert sim.stats.requests == 0
