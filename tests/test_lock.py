"""The per-job lock, between real processes: a second ``batchgpt run`` of a job that is
running exits 75 at once and names the holder; a lock left by a killed run is taken over.

The second run is started through a tiny wrapper that notes when batchgpt's imports are
done (``-c``: import the CLI, then call its ``main``), so "exits at once" is measured from
there and doesn't depend on how long importing the openai SDK takes on a loaded machine.
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
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from batchgpt.simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.conftest import JobFiles, articles, read_jsonl

ROWS = 200
TIMEOUT_S = 30.0

# Prints the monotonic clock once batchgpt is imported, then runs the CLI as usual.
TIMED_CLI = ("import sys, time; import batchgpt.cli as c; "
             "sys.stderr.write(f'IMPORTED {time.monotonic()}\\n'); sys.stderr.flush(); "
             "sys.argv = ['batchgpt', *sys.argv[1:]]; c.main()")


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


def start(job: JobFiles, name: str, timed: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    env = dict(os.environ, OPENAI_API_KEY="sk-test-key")
    env.pop("OPENAI_BASE_URL", None)
    err_path = job.dir / f"{name}.stderr"
    cmd = ([sys.executable, "-c", TIMED_CLI] if timed
           else [sys.executable, "-m", "batchgpt.cli"]) + ["run", str(job.job_path)]
    with err_path.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    return proc, err_path


def wait_for_lines(job: JobFiles, proc: subprocess.Popen[bytes], n: int) -> None:
    """Poll the output (another process writes it) until it has n lines."""
    deadline = time.monotonic() + TIMEOUT_S
    while not job.output.exists() or job.output.read_bytes().count(b"\n") < n:
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {n} lines"
        assert time.monotonic() < deadline, f"no {n} output lines after {TIMEOUT_S}s"
        time.sleep(0.005)


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
    before_first = datetime.now(timezone.utc).replace(microsecond=0)
    first, first_err = start(job, "first")
    wait_for_lines(job, first, 5)  # it holds the lock and is sending

    second, second_err = start(job, "second", timed=True)
    code = finish(second, timeout=15)
    exited = time.monotonic()
    err = second_err.read_text()
    assert code == 75, err
    assert first.poll() is None, "the first run had finished: nothing was tested"
    imported = float(re.search(r"IMPORTED ([0-9.]+)", err).group(1))  # type: ignore[union-attr]
    assert exited - imported < 1.0, f"exit 75 took {exited - imported:.2f}s after start-up"

    holder = re.search(r"pid (\d+), started (\S+)", err)
    assert holder, err
    assert int(holder.group(1)) == first.pid
    started = datetime.fromisoformat(holder.group(2))
    assert before_first <= started <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert "Traceback" not in err
    assert not (job.dir / "out" / "job.summary.json").exists()  # the second wrote nothing

    assert finish(first) == 0, first_err.read_text()
    assert_every_row_once(job)
    assert slow_sim.stats.requests == ROWS  # the second run sent nothing
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
