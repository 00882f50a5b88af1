"""mode: batch against the sandbox's Files and Batches endpoints, over HTTP, with the real
openai SDK: submit then collect, --wait, expiry, cancel, poison and retryable lines,
failed validation, the enqueued-token limit, the budget, cost at Batch prices, and a kill
at each step between upload, create and record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batchgpt.config import JobConfig
from batchgpt.errors import ExitCode
from batchgpt.modes.batch import Step
from batchgpt.simulator import Simulator
from batchgpt.simulator.batches import BatchEndpoints
from tests.conftest import JobFiles, articles

BATCH = {"mode": "batch", "batch": {"poll_interval_s": 0.01}}


def endpoints(sim: Simulator) -> BatchEndpoints:
    assert sim.batches is not None
    return sim.batches


def batch_job(job: JobFiles, n: int = 10, **overrides: Any) -> Path:
    return job.write(articles(n), **{**BATCH, **overrides})


def ids(lines: list[dict[str, Any]]) -> list[str]:
    return [line["custom_id"] for line in lines]


def assert_no_row_submitted_twice(sim: Simulator) -> None:
    twice = {cid: n for cid, n in endpoints(sim).carried.items() if n > 1}
    assert not twice, f"submitted more than once: {twice}"


def test_a_run_submits_and_returns_5_and_a_later_run_collects(job: JobFiles, sim: Simulator,
                                                              cli: Any) -> None:
    bx = endpoints(sim)
    bx.config.delay_s = 3600
    path = batch_job(job)
    first = cli("run", path)
    assert first.exit_code == ExitCode.BATCH_PENDING == 5, first.output
    assert "10 rows in 1 batch are still running at the provider" in first.output
    assert "run again later, or use --wait" in first.output
    assert job.results() == []
    assert sum(bx.carried.values()) == 10
    assert job.summary()["outcome"] == "batch_pending"
    assert job.summary()["batches_running"] == 1

    status = cli("status", path)
    assert "batches" in status.output and "submitted (validating)" not in status.output
    assert "batch-sbx" in status.output and "10 rows" in status.output

    again = cli("run", path)  # still running: nothing submitted twice
    assert again.exit_code == 5
    assert_no_row_submitted_twice(sim)

    bx.advance(3600)
    done = cli("run", path)
    assert done.exit_code == 0, done.output
    assert sorted(ids(job.results())) == [f"a{i:04d}" for i in range(1, 11)]
    assert_no_row_submitted_twice(sim)
    summary = job.summary()
    assert summary["outcome"] == "completed"
    assert summary["rows_by_mode"] == {"online": 0, "batch": 10}
    assert bx.files == {}, "the input, output and error files are deleted once collected"
    assert cli("run", path).output.count("nothing to do") == 1


def test_wait_polls_until_every_row_is_settled(job: JobFiles, sim: Simulator,
                                               cli: Any) -> None:
    result = cli("run", batch_job(job), "--wait")
    assert result.exit_code == 0, result.output
    assert len(job.results()) == 10
    assert_no_row_submitted_twice(sim)
    line = job.results()[0]
    assert line["response"]["status_code"] == 200 and line["error"] is None
    assert line["id"].startswith("batch_req_")  # the answer tag, as online


def test_an_expired_batch_keeps_its_finished_lines_and_only_the_rest_is_resubmitted(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    bx = endpoints(sim)
    bx.config.expire_rate = 1.0
    bx.config.expire_done_fraction = 0.4
    path = batch_job(job)
    assert cli("run", path).exit_code == 5
    bx.config.expire_rate = 0.0
    second = cli("run", path)  # collects 4, resubmits the 6 that expired
    assert second.exit_code == 5, second.output
    assert len(job.results()) == 4
    assert "expired: 4 rows succeeded, 0 failed, 6 to send again" in second.output
    third = cli("run", path)
    assert third.exit_code == 0, third.output
    carried = endpoints(sim).carried
    assert sorted(carried.values()) == [1] * 4 + [2] * 6
    assert sorted(ids(job.results())) == sorted(carried)
    assert len(job.results()) == 10  # exactly once each


def test_cancel_collects_what_the_batches_finished(job: JobFiles, sim: Simulator,
                                                  cli: Any) -> None:
    bx = endpoints(sim)
    bx.config.delay_s = 1000
    path = batch_job(job)
    assert cli("run", path).exit_code == 5
    bx.advance(500)  # half-way through when cancelled
    cancelled = cli("cancel", path)
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancelled: 5 rows succeeded, 0 failed, 5 to send again" in cancelled.output
    assert len(job.results()) == 5
    assert job.summary()["stopped"] == "cancelled"
    bx.config.delay_s = 0
    assert cli("run", path, "--wait").exit_code == 0
    assert len(job.results()) == 10
    assert sorted(bx.carried.values()) == [1] * 5 + [2] * 5


def test_poison_rows_in_the_error_file_fail_for_good_and_the_rest_succeed(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    rows = articles(6)
    rows[2]["text"] = "__POISON__ this one is refused."
    job.write(rows, **BATCH)
    result = cli("run", job.job_path, "--wait")
    assert result.exit_code == ExitCode.ROWS_FAILED, result.output
    assert len(job.results()) == 5
    (failed,) = job.failed()
    assert failed["custom_id"] == "a0003"
    assert failed["error"]["code"] == "poison" and failed["error"]["retryable"] is False
    assert failed["response"]["status_code"] == 400
    assert_no_row_submitted_twice(sim)  # a permanent error is not resubmitted


def test_retryable_error_lines_are_resubmitted_until_max_attempts(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    sim.config.faults.server_error_rate = 1.0
    path = batch_job(job, 3, retry={"max_attempts": 2})
    result = cli("run", path, "--wait")
    assert result.exit_code == ExitCode.ROWS_RETRYABLE, result.output
    assert endpoints(sim).carried == Counter({"a0001": 2, "a0002": 2, "a0003": 2})
    assert {f["error"]["code"] for f in job.failed()} == {"server_error"}
    assert all(f["error"]["retryable"] and f["error"]["attempts"] == 2 for f in job.failed())


def test_a_batch_that_fails_validation_is_reported_and_only_the_named_line_fails(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    rows = articles(4)
    rows[1]["text"] = "__INVALID_BATCH__"
    job.write(rows, **BATCH)
    result = cli("run", job.job_path, "--wait")
    assert result.exit_code == ExitCode.ROWS_FAILED, result.output
    assert "failed validation at the provider: invalid_request" in result.output
    assert "(line 2)" in result.output
    (failed,) = job.failed()
    assert failed["custom_id"] == "a0002"
    assert sorted(ids(job.results())) == ["a0001", "a0003", "a0004"]


def test_token_limit_exceeded_is_resubmitted_later_in_smaller_parts(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    bx = endpoints(sim)
    path = batch_job(job, 8)
    # About 4 rows' prompts fit in the provider's queue at once.
    one_row = 4 * 0 + _prompt_tokens(job, path) // 8
    bx.config.enqueued_token_limit = one_row * 4 + 1
    codes = []
    for _ in range(12):
        result = cli("run", path)
        codes.append(result.exit_code)
        if result.exit_code != 5:
            break
    assert codes[-1] == 0, codes
    assert sorted(ids(job.results())) == [f"a{i:04d}" for i in range(1, 9)]
    assert_no_row_submitted_twice(sim)  # a refused batch ran none of its rows


def _prompt_tokens(job: JobFiles, path: Path) -> int:
    from batchgpt.plan import make_plan
    from batchgpt.source import InputFile

    cfg = JobConfig.load(path)
    return make_plan(cfg, InputFile(cfg), None, retry_failed=False, limit=None).prompt_tokens


def test_batch_queue_tokens_caps_what_is_enqueued_at_once(job: JobFiles, sim: Simulator,
                                                          cli: Any) -> None:
    path = batch_job(job, 9)
    per_row = _prompt_tokens(job, path) // 9
    batch_job(job, 9, limits={"batch_queue_tokens": per_row * 3 + 2})
    assert cli("run", path).exit_code == 5
    assert sum(endpoints(sim).carried.values()) == 3
    result = cli("run", path, "--wait")
    assert result.exit_code == 0, result.output
    assert len(job.results()) == 9
    assert_no_row_submitted_twice(sim)


def test_cost_is_priced_at_batch_prices(job: JobFiles, sim: Simulator, cli: Any) -> None:
    result = cli("run", batch_job(job, 4), "--wait")
    assert result.exit_code == 0
    usage = [line["response"]["body"]["usage"] for line in job.results()]
    prompt = sum(u["prompt_tokens"] for u in usage)
    completion = sum(u["completion_tokens"] for u in usage)
    # gpt-4o-mini at Batch prices: $0.075 per 1M prompt tokens, $0.30 per 1M completion.
    by_hand = (prompt * 0.075 + completion * 0.30) / 1_000_000
    summary = job.summary()
    assert summary["cost_usd"] == pytest.approx(by_hand, rel=1e-12)
    assert summary["this_run"]["cost_usd"] == pytest.approx(by_hand, rel=1e-12)
    online = (prompt * 0.15 + completion * 0.60) / 1_000_000
    assert summary["cost_usd"] == pytest.approx(online / 2, rel=1e-12)
    status = json.loads(cli("status", job.job_path, "--json").output)
    assert status["cost_usd"] == pytest.approx(by_hand, rel=1e-12)


def test_the_budget_counts_each_submissions_worst_case_before_submitting(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    # Each row's worst case at Batch prices: its prompt estimate plus max_tokens 50 (the
    # six rows are alike). A cap of 2.5 of them submits 2, whatever they turn out to cost.
    path = batch_job(job, 6)
    prompt = _prompt_tokens(job, path) // 6
    worst = (prompt * 0.075 + 50 * 0.30) / 1_000_000
    cap = worst * 2.5
    batch_job(job, 6, limits={"max_cost_usd": cap})
    first = cli("run", path)
    assert first.exit_code == ExitCode.BATCH_PENDING, first.output
    assert "at Batch prices" in first.output
    assert sum(endpoints(sim).carried.values()) == 2
    # Collected, the two cost less than their worst case: the next run spends what is left.
    second = cli("run", path, "--wait")
    assert second.exit_code == ExitCode.BUDGET, second.output
    spent = job.summary()["cost_usd"]
    assert 2 < len(job.results()) < 6 and spent <= cap
    assert sum(endpoints(sim).carried.values()) == len(job.results())
    assert_no_row_submitted_twice(sim)


def run_killed_at(path: Path, step: Step, tmp_path: Path) -> None:
    """A run of the job in a child process that dies (os._exit) at ``step``, as a kill."""
    script = tmp_path / "killed_run.py"
    script.write_text(
        "import os, sys\n"
        "from batchgpt.modes import batch\n"
        "from batchgpt import run_job_sync\n"
        "batch.STEP_HOOK = lambda s: os._exit(9) if s.value == sys.argv[2] else None\n"
        "run_job_sync(sys.argv[1])\n"
        "sys.exit(0)\n")
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-key"}
    env.pop("OPENAI_BASE_URL", None)
    killed = subprocess.run([sys.executable, str(script), str(path), step.value], env=env,
                            cwd=Path(__file__).parent.parent, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr


@pytest.mark.parametrize("step", [Step.PREPARED, Step.UPLOADED, Step.UPLOAD_RECORDED,
                                  Step.CREATED])
def test_a_kill_between_upload_create_and_record_never_submits_a_row_twice(
        job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path, step: Step) -> None:
    path = batch_job(job, 5)
    run_killed_at(path, step, tmp_path)
    codes = [cli("run", path).exit_code for _ in range(3)]
    assert codes[-1] == 0, codes
    assert sorted(ids(job.results())) == [f"a{i:04d}" for i in range(1, 6)]
    assert_no_row_submitted_twice(sim)
    assert endpoints(sim).files == {}, "a file that never became a batch is deleted"
    if step in (Step.UPLOADED, Step.UPLOAD_RECORDED):
        assert endpoints(sim).deleted  # the orphan upload among them


def test_mode_batch_is_a_job_file_key_with_its_own_block(tmp_path: Path) -> None:
    from batchgpt.errors import ConfigError

    path = tmp_path / "j.yaml"
    path.write_text("input: in.jsonl\noutput: out.jsonl\nmode: batch\nbatch:\n"
                    "  max_lines: 60000\n")
    with pytest.raises(ConfigError, match=r"j.yaml:5: .*max_lines"):
        JobConfig.load(path)
    path.write_text("input: in.jsonl\noutput: out.jsonl\nmode: bulk\n")
    with pytest.raises(ConfigError, match="mode"):
        JobConfig.load(path)


def test_export_and_show_price_a_batch_answer_at_batch_prices(job: JobFiles, sim: Simulator,
                                                             cli: Any) -> None:
    assert cli("run", batch_job(job, 1), "--wait").exit_code == 0
    (line,) = job.results()
    usage = line["response"]["body"]["usage"]
    by_hand = (usage["prompt_tokens"] * 0.075 + usage["completion_tokens"] * 0.30) / 1e6
    shown = json.loads(cli("show", job.job_path, "a0001", "--json").output)
    assert shown["cost_usd"] == pytest.approx(by_hand, rel=1e-12)
    exported = json.loads(cli("export", job.job_path).output.splitlines()[0])
    assert exported["cost_usd"] == pytest.approx(by_hand, rel=1e-12)


def test_a_provider_refusal_stops_the_run_with_its_message_and_a_rerun_submits_once(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    sim.config.faults.api_key = "sk-the-right-key"
    path = batch_job(job, 3)
    refused = cli("run", path)
    assert refused.exit_code == ExitCode.ERROR, refused.output
    assert "the provider refused to answer the Batch API" in refused.output
    assert "HTTP 401" in refused.output and "sk-test-key" not in refused.output
    assert job.summary()["stopped"] == "provider"
    sim.config.faults.api_key = None
    assert cli("run", path, "--wait").exit_code == 0
    assert len(job.results()) == 3
    assert_no_row_submitted_twice(sim)


def test_metrics_count_rows_by_mode(job: JobFiles, sim: Simulator, cli: Any,
                                    tmp_path: Path) -> None:
    metrics = tmp_path / "m.prom"
    path = batch_job(job, 2)
    assert cli("run", path, "--metrics-file", metrics).exit_code == 5
    text = metrics.read_text()
    assert 'batchgpt_batches_running{job="job"} 1.0' in text
    assert 'batchgpt_run_outcome{job="job",outcome="batch_pending"} 1.0' in text
    assert cli("run", path, "--metrics-file", metrics).exit_code == 0
    text = metrics.read_text()
    assert 'batchgpt_rows_by_mode{job="job",mode="batch"} 2.0' in text
    assert 'batchgpt_rows_by_mode{job="job",mode="online"} 0.0' in text


def test_batches_running_when_the_state_folder_is_lost_are_adopted_not_resubmitted(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    import shutil

    bx = endpoints(sim)
    bx.config.delay_s = 3600
    path = batch_job(job, 4)
    assert cli("run", path).exit_code == 5
    shutil.rmtree(job.output.with_name("job.state"))
    bx.advance(3600)
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert "adopted, so its rows are collected, not submitted again" in result.output
    assert len(job.results()) == 4
    assert_no_row_submitted_twice(sim)
    assert bx.files == {}


def test_wait_stops_on_a_signal_and_leaves_the_batches_running(job: JobFiles,
                                                                sim: Simulator) -> None:
    import asyncio
    import signal

    from batchgpt.runner import RunOptions, run_job

    endpoints(sim).config.delay_s = 3600
    handlers: list[Any] = []
    frames: list[dict[str, Any]] = []

    def progress(figures: dict[str, Any]) -> None:
        frames.append(figures)
        handlers[0](signal.SIGTERM)  # as a SIGTERM while --wait polls

    options = RunOptions(wait=True, progress=progress, expose_signal_handler=handlers.append)
    result = asyncio.run(run_job(JobConfig.load(batch_job(job, 3)), options))
    assert result.exit_code == ExitCode.SIGTERM
    assert frames[0]["in_flight"] == 3  # rows at the provider
    assert result.report is not None and result.report.batches_running == 1
    assert sum(endpoints(sim).carried.values()) == 3


def test_fresh_is_refused_while_batches_run(job: JobFiles, sim: Simulator, cli: Any) -> None:
    endpoints(sim).config.delay_s = 3600
    path = batch_job(job, 2)
    assert cli("run", path).exit_code == 5
    refused = cli("run", path, "--fresh", "--yes")
    assert refused.exit_code == ExitCode.ERROR
    assert "batchgpt cancel" in refused.output
    assert Path(job.output).exists() is False or job.results() == []


def test_dry_run_estimates_at_batch_prices(job: JobFiles, sim: Simulator, cli: Any) -> None:
    online = json.loads(cli("run", job.write(articles(5)), "--dry-run", "--json").output)
    batch = json.loads(cli("run", batch_job(job, 5), "--dry-run", "--json").output)
    assert batch["mode"] == "batch" and online["mode"] == "online"
    assert batch["cost_usd"]["max"] == pytest.approx(online["cost_usd"]["max"] / 2)
    assert batch["cost_usd"]["min"] == pytest.approx(online["cost_usd"]["min"] / 2)


def test_a_kill_after_collecting_before_the_ledger_knows_writes_nothing_twice(
        job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path) -> None:
    rows = articles(4)
    rows[0]["text"] = "__POISON__ refused"
    path = job.write(rows, **BATCH)
    assert cli("run", path).exit_code == 5
    run_killed_at(path, Step.COLLECT_WRITTEN, tmp_path)  # lines written, ledger not told
    assert len(job.results()) == 3
    again = cli("run", path)
    assert again.exit_code == ExitCode.ROWS_FAILED, again.output
    assert sorted(ids(job.results())) == ["a0002", "a0003", "a0004"]  # once each
    assert ids(job.failed()) == ["a0001"]
    summary = job.summary()
    assert summary["requests"] == {"total": 4, "succeeded": 3, "failed": 1, "pending": 0,
                                   "not_in_input": 0}
    assert summary["this_run"]["requests"]["succeeded"] == 0
    assert_no_row_submitted_twice(sim)
    assert endpoints(sim).files == {}
