"""Runs against a simulator that misbehaves: 5xx, dropped connections, garbage bodies,
hangs, poison rows, a request bigger than the whole TPM limit, an exhausted quota, a bad
key.

Pacing under the job's limits is pinned down on a fake clock: end to end, against the
simulator, in tests/test_runner_clock.py, and in detail in tests/test_limiter.py. How
much of a limit the server enforces it keeps busy, and how many 429s it draws, depends on
the machine: benchmarks/utilisation.py measures it.

Every test drives a real run (the CLI in process, or the library) over HTTP and asserts on
the files written and on what the simulator received. The simulator's faults are drawn
from a hash of (seed, request body, how often that body was seen), so a seed fails the
same rows the same way whatever order concurrent requests arrive in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchgpt import JobConfig, RunOptions
from batchgpt.runner import RunResult, run_job
from batchgpt.simulator import FaultConfig, Simulator, SimulatorConfig, SimulatorThread
from tests.conftest import JobFiles, articles, user_texts

FAST_RETRY = {"initial_delay_s": 0.01, "max_delay_s": 0.05}

MakeSim = Callable[..., tuple[Simulator, JobFiles]]


@pytest.fixture(autouse=True, params=["aiohttp", "sdk"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every run here goes through each ``api.transport``: the same faults must have the
    same outcomes whichever sends the requests."""
    chosen: str = request.param
    write = JobFiles.write

    def with_transport(self: JobFiles, records: list[Any] | None = None,
                       **overrides: Any) -> Path:
        api = overrides.get("api", self.config["api"])
        overrides["api"] = {**api, "transport": chosen}
        return write(self, records, **overrides)

    monkeypatch.setattr(JobFiles, "write", with_transport)
    return chosen


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[MakeSim]:
    """``make_sim(seed=…, faults=FaultConfig(…), rpm=…)`` → a simulator of one's own and
    job files in tmp_path pointing at it. Stopped at the end of the test."""
    with contextlib.ExitStack() as stack:

        def make(**config: Any) -> tuple[Simulator, JobFiles]:
            s = stack.enter_context(SimulatorThread(SimulatorConfig(**config)))
            return s, JobFiles(tmp_path, s.base_url)

        yield make


def ids(lines: list[dict[str, Any]]) -> list[str]:
    return sorted(line["custom_id"] for line in lines)


def row_ids(n: int) -> list[str]:
    return [f"a{i:04d}" for i in range(1, n + 1)]


def assert_each_row_once(job: JobFiles, n: int) -> None:
    got = [line["custom_id"] for line in job.results()]
    duplicates = [cid for cid, k in Counter(got).items() if k > 1]
    assert not duplicates, f"rows in the output more than once: {duplicates}"
    assert sorted(got) == row_ids(n)
    assert all(line["error"] is None and line["response"]["status_code"] == 200
               for line in job.results())


def run_lib(path: Path, limit_s: float = 30.0) -> RunResult:
    """The library entry point, with a deadline: a run that hangs fails the test instead
    of hanging the suite."""

    async def go() -> RunResult:
        return await asyncio.wait_for(run_job(JobConfig.load(path), RunOptions()), limit_s)

    return asyncio.run(go())


# -- transient faults: everything ends up in the output exactly once ----------------------

TRANSIENT_MIXES = {
    "5xx": (FaultConfig(server_error_rate=0.3, overload_rate=0.1), {"server_error",
                                                                     "engine_overloaded"}),
    "dropped connections": (FaultConfig(drop_rate=0.2), {"connection_error"}),
    "garbage bodies": (FaultConfig(garbage_rate=0.2), {"invalid_response"}),
    "all at once": (FaultConfig(server_error_rate=0.1, overload_rate=0.05, drop_rate=0.1,
                                garbage_rate=0.1),
                    {"server_error", "engine_overloaded", "connection_error",
                     "invalid_response"}),
}
# How a dropped connection is labelled is pinned down separately (see
# test_a_dropped_connection_is_reported_as_a_connection_error_not_a_timeout): here it only
# has to be retried.
DROP_LABELS = {"connection_error", "timeout"}


@pytest.mark.parametrize(("faults", "codes"), TRANSIENT_MIXES.values(),
                         ids=TRANSIENT_MIXES.keys())
def test_transient_faults_are_retried_until_every_row_is_in_the_output_once(
    make_sim: MakeSim, cli: Any, faults: FaultConfig, codes: set[str]
) -> None:
    n = 40
    s, job = make_sim(seed=7, faults=faults)
    path = job.write(articles(n), retry={"max_attempts": 10, **FAST_RETRY})
    result = cli("run", path)
    assert result.exit_code == 0, result.output

    assert_each_row_once(job, n)
    assert not job.failures.exists()
    summary = job.summary()
    assert summary["outcome"] == "completed"
    assert summary["requests"] == {"total": n, "succeeded": n, "failed": 0, "pending": 0,
                                   "not_in_input": 0}
    run = summary["this_run"]
    retries = run["requests"]["retries"]
    assert retries > 0
    # Every retry is one more request the server saw; nothing was sent unseen or twice.
    assert retries == s.stats.requests - n
    assert run["requests"]["sent"] == s.stats.requests
    errors = run["errors_by_code"]
    assert sum(errors.values()) == retries
    if "connection_error" in codes:
        assert s.stats.by_status.get(0, 0) > 0  # the server did drop connections
        dropped = sum(v for k, v in errors.items() if k in DROP_LABELS)
        assert dropped == s.stats.by_status[0]
        assert set(errors) - DROP_LABELS == codes - DROP_LABELS
    else:
        assert set(errors) == codes
    # Each distinct request body was answered 200 with a chat.completion exactly once.
    assert s.stats.by_status.get(200, 0) - errors.get("invalid_response", 0) == n


def test_a_dropped_connection_is_reported_as_a_connection_error_not_a_timeout(
    make_sim: MakeSim, cli: Any
) -> None:
    s, job = make_sim(faults=FaultConfig(drop_rate=1.0))
    path = job.write(articles(2), retry={"max_attempts": 2, **FAST_RETRY})
    result = cli("run", path)
    assert result.exit_code == 6, result.output
    assert s.stats.by_status == {0: 4}
    for line in job.failed():
        err = line["error"]
        assert err["retryable"] is True and err["attempts"] == 2
        assert err["message"].startswith("connection failed")
        assert err["code"] == "connection_error"
    assert job.summary()["this_run"]["errors_by_code"] == {"connection_error": 4}


def test_hangs_past_the_timeout_are_abandoned_and_retried(make_sim: MakeSim, cli: Any) -> None:
    n = 20
    s, job = make_sim(seed=3, faults=FaultConfig(hang_rate=0.2))
    path = job.write(articles(n), timeout_s=0.3, retry={"max_attempts": 8, **FAST_RETRY})
    result = cli("run", path)
    assert result.exit_code == 0, result.output

    assert_each_row_once(job, n)
    assert not job.failures.exists()
    run = job.summary()["this_run"]
    assert run["errors_by_code"].get("timeout", 0) > 0
    assert run["requests"]["retries"] == s.stats.requests - n


# -- row-level failures -----------------------------------------------------------------------


def test_poison_rows_fail_alone_with_the_servers_error_and_are_not_retried(
    make_sim: MakeSim, cli: Any
) -> None:
    s, job = make_sim(seed=11, faults=FaultConfig(server_error_rate=0.2))
    records = articles(12)
    poison = {"a0004", "a0009"}
    for r in records:
        if r["id"] in poison:
            r["text"] = "This row is __POISON__ for the model."
    path = job.write(records, retry={"max_attempts": 10, **FAST_RETRY})
    result = cli("run", path)
    assert result.exit_code == 3, result.output

    assert ids(job.results()) == sorted(set(row_ids(12)) - poison)
    failed = job.failed()
    assert ids(failed) == sorted(poison)
    for line in failed:
        err = line["error"]
        assert err["status"] == 400
        assert err["code"] == "context_length_exceeded"
        assert err["attempts"] == 1
        assert err["retryable"] is False
        assert "maximum context length" in err["message"]
        assert line["response"]["status_code"] == 400
        assert line["response"]["request_id"].startswith("req_")
    # Sent once each: a 400 is not retried, even in a run that retries 500s.
    sent = Counter(user_texts(s))
    assert sent["Summarize: This row is __POISON__ for the model."] == len(poison)
    summary = job.summary()
    assert summary["outcome"] == "failed_rows"
    assert summary["requests"] == {"total": 12, "succeeded": 10, "failed": 2, "pending": 0,
                                   "not_in_input": 0}
    assert summary["failed_by_code"] == {"context_length_exceeded": 2}


def test_failures_file_keeps_the_servers_error_body_as_sent(job: JobFiles, cli: Any) -> None:
    path = job.write([{"id": "p1", "text": "__POISON__"}])
    assert cli("run", path).exit_code == 3
    (line,) = job.failed()
    assert line["response"]["body"] == {"error": {
        "message": line["error"]["message"], "type": "invalid_request_error",
        "param": "messages", "code": "context_length_exceeded"}}


def test_a_row_bigger_than_the_whole_tpm_limit_fails_alone_without_being_sent(
    make_sim: MakeSim,
) -> None:
    s, job = make_sim()
    records = articles(8)
    huge = "Enormous. " + "word " * 40_000  # ~50,000 tokens against a 30,000 TPM limit
    records[3]["text"] = huge
    path = job.write(records, limits={"tpm": 30_000, "concurrency": 4})
    result = run_lib(path)  # returns at all: the run does not wait for a budget that never comes

    assert result.exit_code == 3
    assert result.outcome == "failed_rows"
    assert ids(job.results()) == sorted(set(row_ids(8)) - {"a0004"})
    (failed,) = job.failed()
    assert failed["custom_id"] == "a0004"
    err = failed["error"]
    assert err["code"] == "request_too_large"
    assert "30000" in err["message"] and "tokens-per-minute" in err["message"]
    assert err["retryable"] is False
    assert err["attempts"] == 0  # never sent
    assert failed["response"] is None
    assert s.stats.requests == 7
    assert not any("Enormous." in text for text in user_texts(s))


def test_a_row_the_server_calls_too_large_fails_alone_with_the_same_code(
    make_sim: MakeSim,
) -> None:
    """No limits in the job: they are learned from the server's headers, so the first
    (huge) row goes out before any header is seen and the server refuses it."""
    s, job = make_sim(tpm=30_000)
    records = articles(6)
    records[0]["text"] = "Enormous. " + "word " * 40_000
    path = job.write(records, limits={"concurrency": 4})
    result = run_lib(path)

    assert result.exit_code == 3
    assert ids(job.results()) == row_ids(6)[1:]
    (failed,) = job.failed()
    err = failed["error"]
    assert failed["custom_id"] == "a0001"
    assert err["status"] == 429
    assert err["code"] == "request_too_large"
    assert "Request too large" in err["message"] and "Limit 30000" in err["message"]
    assert err["retryable"] is False and err["attempts"] == 1
    assert sum("Enormous." in text for text in user_texts(s)) == 1  # not retried
    assert job.summary()["failed_by_code"] == {"request_too_large": 1}


# -- run-level stops ---------------------------------------------------------------------------


def test_quota_error_stops_the_run_without_a_retry_storm_and_a_rerun_resumes(
    make_sim: MakeSim, cli: Any
) -> None:
    n, quota, concurrency = 60, 10, 4
    s, job = make_sim(faults=FaultConfig(quota_after=quota))
    path = job.write(articles(n), limits={"concurrency": concurrency})
    result = cli("run", path)
    assert result.exit_code == 1, result.output

    summary = job.summary()
    assert summary["outcome"] == "stopped"
    assert summary["stopped"] == "quota"
    assert "quota" in summary["message"]
    # Only what was already in flight when the first quota error came back was answered.
    assert 1 <= s.stats.by_status.get(429, 0) <= concurrency
    assert s.stats.requests <= quota + concurrency
    done_first = ids(job.results())
    assert len(done_first) == quota
    assert not job.failures.exists()  # the rows were not at fault: they stay pending
    assert summary["requests"] == {"total": n, "succeeded": quota, "failed": 0,
                                   "pending": n - quota, "not_in_input": 0}

    s.config.faults.quota_after = None  # the account is topped up
    s.reset_stats()
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert_each_row_once(job, n)
    assert s.stats.requests == n - quota  # never re-sent what succeeded
    texts = {f"Summarize: {a['text']}": a["id"] for a in articles(n)}
    assert not {texts[t] for t in user_texts(s)} & set(done_first)
    assert job.summary()["outcome"] == "completed"


def test_bad_api_key_stops_the_run_at_once(make_sim: MakeSim, cli: Any) -> None:
    concurrency = 4
    s, job = make_sim(faults=FaultConfig(api_key="sk-right"))  # the env holds sk-test-key
    path = job.write(articles(30), limits={"concurrency": concurrency})
    result = cli("run", path)
    assert result.exit_code == 1, result.output

    summary = job.summary()
    assert summary["outcome"] == "stopped"
    assert summary["stopped"] == "authentication"
    assert 1 <= s.stats.requests <= concurrency  # no retry storm
    assert set(s.stats.by_status) == {401}
    assert job.results() == []
    assert not job.failures.exists()
    assert summary["requests"]["pending"] == 30


def test_a_wrong_base_url_stops_the_run_instead_of_failing_every_row(
    make_sim: MakeSim, cli: Any
) -> None:
    s, job = make_sim()
    wrong = s.base_url.removesuffix("/v1") + "/v2"  # answered 404 "Invalid URL"
    path = job.write(articles(30), limits={"concurrency": 4}, api={"base_url": wrong})
    result = cli("run", path)
    assert result.exit_code == 1, result.output
    summary = job.summary()
    assert summary["outcome"] == "stopped"
    assert summary["stopped"] == "invalid URL"
    assert "Invalid URL" in summary["message"]
    # Nothing is marked failed for good: fixing the URL and rerunning sends every row.
    assert not job.failures.exists()
    assert summary["requests"] == {"total": 30, "succeeded": 0, "failed": 0, "pending": 30,
                                   "not_in_input": 0}
    assert summary["this_run"]["requests"]["sent"] <= 4

    path = job.write(api={"base_url": s.base_url})
    assert cli("run", path).exit_code == 0
    assert_each_row_once(job, 30)
    assert s.stats.requests == 30


# -- running out of retries ----------------------------------------------------------------


def test_rows_that_ran_out_of_retries_are_retried_by_the_next_run_without_retry_failed(
    make_sim: MakeSim, cli: Any
) -> None:
    n = 20
    s, job = make_sim(seed=5, faults=FaultConfig(server_error_rate=0.7))
    path = job.write(articles(n), retry={"max_attempts": 2, **FAST_RETRY})
    result = cli("run", path)
    assert result.exit_code == 6, result.output

    failed = job.failed()
    succeeded = ids(job.results())
    assert failed and succeeded  # the seed gives both outcomes
    assert sorted(ids(failed) + succeeded) == row_ids(n)
    for line in failed:
        err = line["error"]
        assert err["retryable"] is True
        assert err["attempts"] == 2
        assert err["status"] == 500
        assert err["code"] == "server_error"
    summary = job.summary()
    assert summary["requests"]["failed"] == len(failed)
    # Each row that ran out was sent max_attempts times.
    assert s.stats.by_status[500] >= 2 * len(failed)

    s.config.faults.server_error_rate = 0.0
    s.reset_stats()
    result = cli("run", path)  # no --retry-failed
    assert result.exit_code == 0, result.output
    assert s.stats.requests == len(failed)
    assert_each_row_once(job, n)
    assert not job.failed()
    assert job.summary()["plan"]["retried"] == len(failed)


def test_an_extreme_backoff_multiplier_neither_crashes_a_worker_nor_loses_a_row(
    make_sim: MakeSim, cli: Any
) -> None:
    """multiplier ** attempt overflows a float after ~52 attempts at 1e6; a worker that
    died of it used to leave its row pending while the run said "completed", exit 0."""
    s, job = make_sim(faults=FaultConfig(server_error_rate=1.0))
    path = job.write(articles(2), retry={"max_attempts": 60, "initial_delay_s": 0.001,
                                         "max_delay_s": 0.002, "multiplier": 1e6})
    result = cli("run", path)
    assert result.exit_code == 6, result.output
    assert s.stats.requests == 120
    failed = job.failed()
    assert ids(failed) == row_ids(2)
    assert all(f["error"]["attempts"] == 60 and f["error"]["retryable"] for f in failed)
    assert job.summary()["requests"] == {"total": 2, "succeeded": 0, "failed": 2, "pending": 0,
                                         "not_in_input": 0}
