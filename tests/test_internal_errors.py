"""A bug in batchgpt is never a traceback on the terminal: one line naming the error and
the file holding the traceback (next to the job's state), exit 70, and nothing committed
is lost. The bugs are injected into batchgpt's own code (never into the SDK or HTTP)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

import batchgpt.runner
from batchgpt.simulator import Simulator
from tests.conftest import TRACEBACK, JobFiles, articles, read_jsonl


def crash_files(job: JobFiles) -> list[Any]:
    return sorted(job.output.with_name("job.state").glob("crash-*.txt"))


def test_a_bug_after_the_run_prints_one_line_and_the_traceback_goes_to_a_file(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> str:
        raise RuntimeError("the table renderer is broken")

    monkeypatch.setattr(batchgpt.runner, "render_table", broken)
    path = job.write(articles(5))
    result = cli("run", path, internal_error=True)
    assert result.exit_code == 70
    assert "internal error: RuntimeError: the table renderer is broken" in result.output
    (crash,) = crash_files(job)
    assert str(crash) in result.output
    text = crash.read_text()
    assert TRACEBACK in text and "render_table" in text
    assert "sk-test-key" not in text and "sk-test-key" not in result.output
    # The results were committed before the bug: a rerun sends nothing.
    monkeypatch.undo()
    sim.reset_stats()
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests == 0


def test_a_bug_in_a_worker_stops_the_run_with_exit_70_and_keeps_what_was_committed(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = batchgpt.runner.result_line
    calls = Counter[str]()

    def flaky(*args: Any) -> bytes:
        calls["n"] += 1
        if calls["n"] == 6:
            raise ValueError("a bug while writing one row")
        return real(*args)

    monkeypatch.setattr(batchgpt.runner, "result_line", flaky)
    path = job.write(articles(20), limits={"concurrency": 1})
    result = cli("run", path, internal_error=True)
    assert result.exit_code == 70
    assert "internal error on row" in result.output and "a bug while writing one row" in (
        result.output)
    (crash,) = crash_files(job)
    assert str(crash) in result.output and TRACEBACK in crash.read_text()
    summary = job.summary()
    assert summary["outcome"] == "error" and summary["stopped"] == "internal error"
    kept = {line["custom_id"] for line in read_jsonl(job.output)}
    assert len(kept) == 5

    monkeypatch.undo()
    sim.reset_stats()
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests == 15  # only what was not written
    assert Counter(line["custom_id"] for line in read_jsonl(job.output)) == Counter(
        {a["id"]: 1 for a in articles(20)})

