"""The Python API: ``run_job`` / ``run_job_sync`` and what a ``RunResult`` gives back.

A result names the output file and reads it back (``results()``, streamed), so a caller
needs nothing from the job file's layout. ``run_job_sync`` works from a plain script and
from inside a running event loop (a Jupyter cell), where ``asyncio.run`` would refuse.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from batchgpt import JobConfig, RunOptions, RunResult, StateError, run_job, run_job_sync
from batchgpt.simulator import Simulator
from tests.conftest import JobFiles, articles, read_jsonl


def test_a_result_names_the_output_and_streams_every_result_in_it(
    job: JobFiles, sim: Simulator
) -> None:
    records = articles(5)
    records[1]["text"] = "__POISON__"
    path = job.write(records)
    result = run_job_sync(path)
    assert result.exit_code == 3
    assert result.output == job.output
    assert result.failures_file == job.failures

    lines = result.results()
    assert isinstance(lines, Iterator)  # read as iterated, not loaded whole
    assert list(lines) == read_jsonl(job.output)
    assert sorted(r["custom_id"] for r in result.results()) == ["a0001", "a0003", "a0004",
                                                                "a0005"]
    assert [f["custom_id"] for f in result.failures()] == ["a0002"]


def test_results_cover_the_job_not_just_the_last_run(job: JobFiles, sim: Simulator) -> None:
    path = job.write(articles(4))
    run_job_sync(path, RunOptions(limit=1))
    result = run_job_sync(path)
    assert result.report is not None and result.report.this_run.requests.succeeded == 3
    assert len(list(result.results())) == 4


def test_a_dry_run_result_reads_what_is_there(job: JobFiles, sim: Simulator) -> None:
    path = job.write(articles(3))
    before = run_job_sync(path, RunOptions(dry_run=True))
    assert list(before.results()) == [] and list(before.failures()) == []
    run_job_sync(path)
    assert len(list(run_job_sync(path, RunOptions(dry_run=True)).results())) == 3


def test_a_line_that_is_not_a_result_is_reported_not_skipped(
    job: JobFiles, sim: Simulator
) -> None:
    path = job.write(articles(2))
    result = run_job_sync(path)
    with job.output.open("a") as fh:
        fh.write("<<<<<<< HEAD\n")
    with pytest.raises(StateError, match=r"job\.jsonl:3: not a result line"):
        list(result.results())


def test_run_job_sync_without_an_event_loop(job: JobFiles, sim: Simulator) -> None:
    result = run_job_sync(JobConfig.load(job.write(articles(2))))
    assert (result.outcome, result.exit_code) == ("completed", 0)


async def test_run_job_sync_inside_a_running_event_loop_runs_in_a_worker_thread(
    job: JobFiles, sim: Simulator
) -> None:
    """What a notebook cell does: a synchronous call while the kernel's loop runs. The
    simulator has its own thread here, so blocking this loop blocks nobody it needs."""
    asyncio.get_running_loop()  # there is one
    seen: list[str] = []

    def progress(_: dict[str, Any]) -> None:
        seen.append(threading.current_thread().name)

    result = run_job_sync(job.write(articles(3)), RunOptions(progress=progress))
    assert (result.outcome, result.exit_code) == ("completed", 0)
    assert len(list(result.results())) == 3
    assert seen and all(name.startswith("batchgpt-run") for name in seen)


async def test_await_run_job_is_the_non_blocking_way(job: JobFiles, sim: Simulator) -> None:
    result: RunResult = await run_job(JobConfig.load(job.write(articles(3))))
    assert result.exit_code == 0
    assert {r["custom_id"] for r in result.results()} == {"a0001", "a0002", "a0003"}
