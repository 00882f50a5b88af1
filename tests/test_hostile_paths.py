"""Paths that cannot be written: refused before the first request, or — when they vanish
during a run — a clean stop naming the path, never a traceback after a paid run."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from batchgpt import JobConfig, RunOptions
from batchgpt.runner import run_job
from batchgpt.simulator import Simulator, SimulatorConfig
from tests.conftest import JobFiles, articles


def test_metrics_file_in_a_missing_folder_is_refused_before_anything_is_sent(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path
) -> None:
    path = job.write(articles(5))
    metrics = tmp_path / "no" / "such" / "folder" / "job.prom"
    result = cli("run", path, "--metrics-file", metrics)
    assert result.exit_code == 1
    assert f"cannot write the metrics file {metrics}" in result.output
    assert "nothing was sent" in result.output
    assert sim.stats.requests == 0
    assert not job.output.exists()


def test_metrics_file_that_is_a_folder_is_refused(job: JobFiles, sim: Simulator, cli: Any,
                                                  tmp_path: Path) -> None:
    path = job.write(articles(5))
    result = cli("run", path, "--metrics-file", tmp_path)
    assert result.exit_code == 1
    assert "is a folder" in result.output
    assert sim.stats.requests == 0


def test_log_file_in_a_missing_folder_is_refused_before_anything_is_sent(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path
) -> None:
    path = job.write(articles(5))
    log_file = tmp_path / "no" / "such" / "folder" / "run.log"
    result = cli("run", path, "--log-file", log_file)
    assert result.exit_code == 1
    assert f"cannot write the log file {log_file}" in result.output
    assert sim.stats.requests == 0


async def test_output_folder_removed_during_a_run_stops_at_the_next_write(
    job: JobFiles
) -> None:
    sim = Simulator(SimulatorConfig(latency_s=0.02))
    base = await sim.start()
    try:
        job.config["api"] = {"base_url": base}
        path = job.write(articles(200), limits={"concurrency": 2})
        task = asyncio.create_task(run_job(JobConfig.load(path), RunOptions()))
        while sim.stats.requests < 10:  # wait for arrivals, not for time
            await asyncio.sleep(0.001)
        shutil.rmtree(job.output.parent)
        result = await asyncio.wait_for(task, 60)
    finally:
        await sim.stop()
    assert result.exit_code == 1
    assert result.report is not None and result.report.stopped is not None
    assert result.report.stopped.value == "storage"
    # Which write notices first depends on where rmtree is when the writer's thread
    # commits: the output's append, the state folder's check, or SQLite itself.
    assert any(says in result.message for says in (
        "was removed or replaced during the run", "was deleted",
        "cannot record results in the checkpoint")), result.message
    # It stopped at the first write that failed: only the requests in flight went on.
    assert sim.stats.requests <= 10 + 2 * 2
