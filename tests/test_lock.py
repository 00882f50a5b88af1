"""The per-job lock, between real processes: a second ``batchgpt run`` of a job that is
running exits 75 without waiting for the lock, sends nothing and names the holder; a lock
left by a killed run is taken over.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from batchgpt.simulator import FaultConfig, Simulator, SimulatorConfig, SimulatorThread
from tests.conftest import JobFiles, articles, read_jsonl

ROWS = 200
TIMEOUT_S = 30.0  # a safety net: only a run that hangs gets near it


@pytest.fixture
def slow_sim() -> Iterator[Simulator]:
    with SimulatorThread(SimulatorConfig(latency_s=0.05)) as s:
        yield s


@pytest.fixture
def lock_job(tmp_path: Path, slow_sim: Simulator) -> JobFiles:
    job = JobFiles(tmp_path, slow_sim.base_url)
    # 200 rows, 2 at a time, 50 ms each: the first run takes ~5 s once it has started.
    job.write(articles(ROWS), limits={"concurrency": 2})
    return job


def start(job: JobFiles, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    env = dict(os.environ, OPENAI_API_KEY="sk-test-key")
    env.pop("OPENAI_BASE_URL", None)
    err_path = job.dir / f"{name}.stderr"
    cmd = [sys.executable, "-m", "batchgpt.cli", "run", str(job.job_path)]
    with err_path.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    return proc, err_path


def wait_until(proc: subprocess.Popen[bytes], what: str, cond: Callable[[], bool]) -> None:
    """Poll ``cond`` (another process is at work) while the run goes on."""
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT_S}s"
        time.sleep(0.005)


def wait_for_lines(job: JobFiles, proc: subprocess.Popen[bytes], n: int) -> None:
    wait_until(proc, f"{n} output lines",
               lambda: job.output.exists() and job.output.read_bytes().count(b"\n") >= n)


def finish(proc: subprocess.Popen[bytes], timeout: float = TIMEOUT_S) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"pid {proc.pid} did not exit within {timeout}s")


def assert_every_row_once(job: JobFiles) -> None:
    got = Counter(r["custom_id"] for r in read_jsonl(job.output))
    assert sorted(got) == [a["id"] for a in articles(ROWS)]
    assert set(got.values()) == {1}


def test_second_run_of_a_running_job_exits_75_naming_the_holder(
    lock_job: JobFiles, slow_sim: Simulator
) -> None:
    job = lock_job
    # The first run's requests hang, and would time out only after ten minutes: it holds
    # the lock, and sends nothing more, until the test kills it.
    slow_sim.config.faults = FaultConfig(hang_rate=1.0)
    job.write(timeout_s=600)
    before_first = datetime.now(timezone.utc).replace(microsecond=0)
    first, _ = start(job, "first")
    wait_until(first, "both of its requests hanging", lambda: slow_sim.stats.in_flight == 2)
    lock = job.output.with_name("job.state") / "lock"

    second, second_err = start(job, "second")
    code = finish(second)
    err = second_err.read_text()
    assert code == 75, err
    # It did not wait for the lock: the first run, which cannot finish, still holds it.
    assert first.poll() is None
    assert lock.read_text().startswith(f"pid {first.pid},")
    assert slow_sim.stats.requests == 2  # the second run sent nothing
    assert slow_sim.stats.in_flight == 2
    holder = re.search(r"pid (\d+), started (\S+)", err)
    assert holder, err
    assert int(holder.group(1)) == first.pid
    started = datetime.fromisoformat(holder.group(2))
    assert before_first <= started <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert "Traceback" not in err
    assert read_jsonl(job.output) == []  # the second wrote nothing
    assert not job.summary_path.exists()

    # The second run disturbed nothing: once the first is gone, a rerun answers every row
    # exactly once, sending again only the two requests that hung.
    first.send_signal(signal.SIGKILL)
    assert finish(first) == -signal.SIGKILL
    slow_sim.config.faults = FaultConfig()
    slow_sim.config.latency_s = 0.0
    third, third_err = start(job, "third")
    assert finish(third) == 0, third_err.read_text()
    assert_every_row_once(job)
    assert slow_sim.stats.requests == ROWS + 2
    assert json.loads(job.summary_path.read_text())["outcome"] == "completed"


def test_lock_of_a_killed_run_is_taken_over(lock_job: JobFiles, slow_sim: Simulator) -> None:
    job = lock_job
    first, _ = start(job, "first")
    wait_for_lines(job, first, 5)
    first.send_signal(signal.SIGKILL)
    assert finish(first) == -signal.SIGKILL
    lock = job.output.with_name("job.state") / "lock"
    # The dead run's note is still in the file; the kernel dropped its flock.
    assert lock.read_text().startswith(f"pid {first.pid},")

    status = subprocess.run([sys.executable, "-m", "batchgpt.cli", "status", str(job.job_path),
                             "--json"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["locked_by"] is None

    slow_sim.config.latency_s = 0.0
    second, second_err = start(job, "second")
    assert finish(second) == 0, second_err.read_text()
    assert_every_row_once(job)
    assert lock.read_text() == ""  # released at the end of the run
