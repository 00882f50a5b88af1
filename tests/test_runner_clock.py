"""The runner on a FakeClock, against the real simulator over HTTP: retry backoff, the
concurrency resizing done by the housekeeping tick, the grace period after a signal, and
pacing by the job's limits happen at exact fake times, and nothing here sleeps.

The simulator runs on the test's own event loop. Time in the run moves only when a test
advances the clock; requests still travel over real HTTP, so between two moves of the
clock a test waits for what it expects the server or the run to have done (a request
arrived, a worker went to sleep) by polling that condition. Each poll has a real-time
deadline, and each test a real-time bound as a whole: both are safety nets against a hang,
never assertions about time. Where a request must stay unanswered, the simulator hangs it
(for an hour of real time) and the job's timeout is ten minutes, so only the test ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from batchgpt import JobConfig, RunOptions
from batchgpt.clock import FakeClock
from batchgpt.runner import HOUSEKEEPING_S, RunResult, run_job
from batchgpt.simulator import FaultConfig, Simulator, SimulatorConfig
from tests.conftest import JobFiles, articles, user_texts

SAFETY_S = 20.0  # real seconds: a poll that would otherwise wait forever fails after this
TEST_BOUND_S = 60.0  # real seconds: a test that would otherwise hang fails after this
HANG = FaultConfig(hang_rate=1.0, hang_s=3600.0)
P = ParamSpec("P")


def bounded(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, Coroutine[Any, Any, None]]:
    """Fail the test instead of hanging the suite if it never finishes."""

    @functools.wraps(test)
    async def run(*args: P.args, **kwargs: P.kwargs) -> None:
        await asyncio.wait_for(test(*args, **kwargs), TEST_BOUND_S)

    return run


async def until(what: str, cond: Callable[[], bool],
                running: asyncio.Task[RunResult] | None = None) -> None:
    """Poll ``cond`` on the real loop (fake time stands still meanwhile); fail if the run
    given ends first, or at the safety deadline."""
    deadline = time.monotonic() + SAFETY_S
    while not cond():
        if running is not None and running.done():
            pytest.fail(f"the run ended before {what}: {running.result()!r}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Run:
    """One ``run_job`` as a task on a FakeClock, which the test steers."""

    def __init__(self, job: JobFiles, **options: Any) -> None:
        self.clock = FakeClock()
        # (fake time, requests in flight) at each housekeeping tick, from the progress
        # figures; in flight counts the concurrency slots in use.
        self.ticks: list[tuple[float, int]] = []
        self._handlers: list[Callable[[int], None]] = []
        opts = RunOptions(clock=self.clock, progress=self._progress,
                          expose_signal_handler=self._handlers.append, **options)
        self.task = asyncio.create_task(run_job(JobConfig.load(job.job_path), opts))

    def _progress(self, figures: dict[str, Any]) -> None:
        self.ticks.append((figures["elapsed_s"], figures["in_flight"]))

    async def until(self, what: str, cond: Callable[[], bool]) -> None:
        """Let real I/O happen (fake time stands still) until ``cond`` holds, while the
        run goes on."""
        await until(what, cond, self.task)

    def signal(self, signum: int) -> None:
        """What SIGINT/SIGTERM would do to the run, without signalling pytest's process."""
        (handler,) = self._handlers
        handler(signum)

    async def result(self) -> RunResult:
        return await self.task


@pytest.fixture
async def server() -> AsyncIterator[Simulator]:
    """The simulator, on the event loop the run uses."""
    sim = Simulator(SimulatorConfig())
    await sim.start()
    yield sim
    await sim.stop()


@pytest.fixture
def job(tmp_path: Path, server: Simulator) -> JobFiles:
    return JobFiles(tmp_path, server.base_url)


@pytest.fixture
async def start(server: Simulator) -> AsyncIterator[Callable[..., Run]]:
    """``start(job, **RunOptions)`` → a Run. Runs that a failed test left going are
    cancelled before the simulator stops."""
    runs: list[Run] = []

    def make(job: JobFiles, **options: Any) -> Run:
        run = Run(job, **options)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(run.task, SAFETY_S)


def received(server: Simulator, n: int) -> Callable[[], bool]:
    return lambda: server.stats.requests >= n


def sleepers_besides_housekeeping(run: Run) -> int:
    """Tasks asleep on the run's clock other than the housekeeping loop, which always is."""
    return run.clock.sleepers - 1


# -- retry backoff ------------------------------------------------------------------------

@bounded
async def test_retry_backoff_waits_exactly_the_delays_of_the_policy_on_the_clock(
    server: Simulator, job: JobFiles, start: Callable[..., Run]
) -> None:
    server.config.faults = FaultConfig(server_error_rate=1.0)
    job.write(articles(1), retry={"max_attempts": 3, "initial_delay_s": 10, "multiplier": 2,
                                  "max_delay_s": 60, "jitter": 0})
    run = start(job)
    clock = run.clock

    # Attempt 1 at t=0 is answered 500; the worker sleeps 10 s before attempt 2.
    await run.until("the first 500 and the backoff sleep",
                    lambda: server.stats.by_status.get(500) == 1
                    and sleepers_besides_housekeeping(run) == 1)
    await clock.advance_to(9.999)
    assert server.stats.requests == 1
    assert sleepers_besides_housekeeping(run) == 1  # still asleep: nothing was sent early
    await clock.advance_to(10.0)
    await run.until("the second attempt", lambda: server.stats.requests == 2)

    # Attempt 2 at t=10 is answered 500 too; the next delay is 10 × 2 = 20 s.
    await run.until("the second 500 and the backoff sleep",
                    lambda: server.stats.by_status.get(500) == 2
                    and sleepers_besides_housekeeping(run) == 1)
    server.config.faults = FaultConfig()  # the server recovers
    await clock.advance_to(29.999)
    assert server.stats.requests == 2
    assert sleepers_besides_housekeeping(run) == 1
    await clock.advance_to(30.0)

    result = await run.result()
    assert (result.outcome, result.exit_code) == ("completed", 0)
    assert server.stats.requests == 3
    assert server.stats.by_status == {500: 2, 200: 1}
    assert [line["custom_id"] for line in job.results()] == ["a0001"]
    summary = job.summary()
    assert summary["this_run"]["requests"]["retries"] == 2
    assert summary["this_run"]["errors_by_code"] == {"server_error": 2}
    assert summary["wall_time_s"] == 30.0  # the run's time is the clock's


# -- concurrency resizing -----------------------------------------------------------------

@pytest.mark.parametrize(("server_rpm", "in_flight"), [(None, 11), (60, 4)],
                         ids=["server states no limits: every row", "server states 60 rpm: 4"])
@bounded
async def test_concurrency_changes_on_the_housekeeping_tick_after_the_first_answer(
    server: Simulator, job: JobFiles, start: Callable[..., Run], server_rpm: int | None,
    in_flight: int,
) -> None:
    """With no limits in the job, one request goes first. The simulator refuses the first
    row at once (its poison marker: a 400 with the rate-limit headers) and hangs every
    other: the run learns a latency, and the server's limits, from that one answer, and
    nothing else ever finishes. The slot count moves only on the next 0.5 s tick: to the
    cap (1,024) when the server states no limits, so every pending row goes, or to what
    60 rpm needs at this latency (⌈rate × latency × 1.5⌉ + 2, at least 4) when it does."""
    server.config.rpm = server_rpm
    server.config.window_s = 60.0  # the server admits a minute's worth at once: no 429s
    server.config.faults = HANG
    rows = articles(12)
    rows[0]["text"] = "__POISON__"
    job.write(rows, limits={}, timeout_s=600)
    run = start(job)
    clock = run.clock

    # The first answer is in when the second row holds the one slot: on the wire (no
    # limits), or asleep until the learned 60 rpm lets it go (at t=1).
    await run.until("the first answer, and the second row under way",
                    lambda: server.stats.by_status.get(400) == 1
                    and server.stats.in_flight + sleepers_besides_housekeeping(run) == 1)
    assert clock.monotonic() == 0.0 and run.ticks == []

    await clock.advance_to(HOUSEKEEPING_S)
    # At the tick one slot was in use, by the second row, with ten rows waiting.
    assert run.ticks == [(0.5, 1)]
    # (At 60 rpm, learned from the 400's headers, what goes next is paced at one a
    # second: t = 1, 2, 3, 4.)
    await clock.advance_to(10.0)
    await run.until(f"{in_flight} requests hanging in the server",
                    lambda: server.stats.in_flight == in_flight)
    assert run.ticks[1] == (1.0, in_flight)
    assert {n for _, n in run.ticks[1:]} == {in_flight}
    assert server.stats.requests == 1 + in_flight  # the limiter allows more; the slots don't

    run.signal(signal.SIGTERM)
    run.signal(signal.SIGTERM)  # abandon the hung requests
    result = await run.result()
    assert result.outcome == "interrupted"
    assert server.stats.requests == 1 + in_flight
    assert job.summary()["requests"] == {"total": 12, "succeeded": 0, "failed": 1,
                                         "pending": 11, "not_in_input": 0}


# -- pacing -------------------------------------------------------------------------------

@bounded
async def test_the_jobs_rpm_paces_the_requests_the_server_receives(
    server: Simulator, job: JobFiles, start: Callable[..., Run]
) -> None:
    """600 rpm: the server receives the k-th request at t = 0.1·k s, in input order, and
    none earlier (the limiter starts empty: no start-up burst). How much of a real limit
    this keeps busy, and how many 429s it draws, is measured in benchmarks/utilisation.py."""
    n = 12
    job.write(articles(n), limits={"rpm": 600, "concurrency": 16})
    run = start(job)
    clock = run.clock
    texts = [f"Summarize: {a['text']}" for a in articles(n)]

    await clock.advance_to(0.05)
    assert server.stats.requests == 0
    for k in range(1, n + 1):
        due = 0.1 * k
        await clock.advance_to(due - 0.001)
        assert server.stats.requests == k - 1, f"request {k} came before t={due:.1f}"
        await clock.advance_to(due + 0.001)
        await run.until(f"request {k}", received(server, k))
        assert user_texts(server) == texts[:k]

    result = await run.result()
    assert (result.outcome, result.exit_code) == ("completed", 0)
    assert sorted(line["custom_id"] for line in job.results()) == [a["id"] for a in articles(n)]
    assert server.stats.by_status == {200: n}


# -- signals and the grace period ---------------------------------------------------------

@bounded
async def test_a_signal_gives_hung_requests_the_grace_period_then_leaves_their_rows_pending(
    server: Simulator, job: JobFiles, start: Callable[..., Run]
) -> None:
    server.config.faults = HANG
    job.write(articles(6), limits={"concurrency": 4}, timeout_s=600)
    run = start(job, grace_s=30.0)
    clock = run.clock
    await run.until("4 requests hanging in the server", lambda: server.stats.in_flight == 4)
    await clock.advance_to(2.0)

    run.signal(signal.SIGTERM)  # at t=2: the grace period ends at t=32
    await clock.advance_to(31.999)
    assert not run.task.done()  # still waiting for the requests in flight
    assert server.stats.in_flight == 4 and server.stats.requests == 4
    await clock.advance_to(32.0)

    result = await run.result()
    assert (result.outcome, result.exit_code) == ("interrupted", 143)
    summary = job.summary()
    assert summary["message"].startswith("SIGTERM received")
    assert summary["requests"] == {"total": 6, "succeeded": 0, "failed": 0, "pending": 6,
                                   "not_in_input": 0}
    assert job.results() == [] and job.failed() == []
    # Nothing new was sent after the signal; the hung requests were dropped, unanswered.
    assert server.stats.requests == 4
    await until("the server to see the abandoned connections close",
                lambda: server.stats.in_flight == 0)
    assert server.stats.by_status == {0: 4}

    # Nothing was lost: the next run sends every row, once.
    server.config.faults = FaultConfig()
    server.reset_stats()
    again = start(job)
    result = await again.result()
    assert (result.outcome, result.exit_code) == ("completed", 0)
    assert sorted(line["custom_id"] for line in job.results()) == [a["id"] for a in articles(6)]
    assert server.stats.requests == 6


@bounded
async def test_a_second_signal_abandons_hung_requests_without_waiting_for_the_grace_period(
    server: Simulator, job: JobFiles, start: Callable[..., Run]
) -> None:
    server.config.faults = HANG
    job.write(articles(6), limits={"concurrency": 4}, timeout_s=600)
    run = start(job, grace_s=30.0)
    await run.until("4 requests hanging in the server", lambda: server.stats.in_flight == 4)

    run.signal(signal.SIGINT)
    run.signal(signal.SIGINT)
    result = await run.result()  # the clock never moves: the grace period never ends
    assert run.clock.monotonic() == 0.0
    assert (result.outcome, result.exit_code) == ("interrupted", 130)
    assert job.summary()["requests"]["pending"] == 6
    assert server.stats.requests == 4
    await until("the server to see the abandoned connections close",
                lambda: server.stats.in_flight == 0)
    assert server.stats.by_status == {0: 4}
