"""End to end: the CLI against the real simulator over HTTP; assertions on the files
written and on what the simulator received."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from batchgpt.simulator import Simulator
from tests.conftest import JobFiles, articles, read_jsonl, user_texts

REPO = Path(__file__).resolve().parent.parent


def test_run_answers_every_row_once_in_batch_output_format(job: JobFiles, sim: Simulator,
                                                           cli: Any) -> None:
    path = job.write(articles(30))
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    lines = job.results()
    assert sorted(r["custom_id"] for r in lines) == [f"a{i:04d}" for i in range(1, 31)]
    first = lines[0]
    assert set(first) == {"id", "custom_id", "response", "error"}
    assert first["id"].startswith("batch_req_")
    assert first["error"] is None
    assert first["response"]["status_code"] == 200
    assert first["response"]["request_id"].startswith("req_")
    assert first["response"]["body"]["object"] == "chat.completion"
    assert sim.stats.requests == 30
    assert sorted(user_texts(sim)) == sorted(f"Summarize: {a['text']}" for a in articles(30))
    summary = job.summary()
    assert summary["requests"] == {"total": 30, "succeeded": 30, "failed": 0, "pending": 0,
                                   "not_in_input": 0}
    assert summary["outcome"] == "completed"
    usage = summary["usage"]
    bodies = [r["response"]["body"]["usage"] for r in lines]
    assert usage["prompt_tokens"] == sum(u["prompt_tokens"] for u in bodies)
    assert usage["completion_tokens"] == sum(u["completion_tokens"] for u in bodies)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert not job.failures.exists()
    assert "done: 30 rows succeeded" in result.output


def test_rerun_sends_nothing_and_says_so(job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(10))
    assert cli("run", path).exit_code == 0
    before = job.output.read_bytes()
    sim.reset_stats()
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 0
    assert "nothing to do: all 10 rows already succeeded" in result.output
    assert job.output.read_bytes() == before
    assert job.summary()["usage"]["total_tokens"] > 0  # cumulative, not this run's zero


def test_new_rows_appended_to_input_are_picked_up_by_the_next_run(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = job.write(articles(5))
    assert cli("run", path).exit_code == 0
    job.write(articles(8))
    sim.reset_stats()
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests == 3
    assert sorted(r["custom_id"] for r in job.results()) == [f"a{i:04d}" for i in range(1, 9)]


def test_limit_sends_only_the_first_pending_rows(job: JobFiles, sim: Simulator,
                                                 cli: Any) -> None:
    path = job.write(articles(10))
    result = cli("run", path, "--limit", "3")
    assert result.exit_code == 0, result.output
    assert sorted(r["custom_id"] for r in job.results()) == ["a0001", "a0002", "a0003"]
    assert job.summary()["requests"]["pending"] == 7
    assert cli("run", path, "--limit", "3").exit_code == 0
    assert len(job.results()) == 6
    assert sim.stats.requests == 6


def test_fresh_discards_results_and_starts_over(job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(4))
    assert cli("run", path).exit_code == 0
    result = cli("run", path, "--fresh")  # no TTY and no --yes: refuses
    assert result.exit_code == 2
    assert sim.stats.requests == 4
    result = cli("run", path, "--fresh", "--yes")
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 8
    assert len(job.results()) == 4


def test_permanent_failures_go_to_the_failures_file_and_stay_failed_until_retry_failed(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    records = articles(6)
    records[2]["text"] = "This one is __POISON__ and too long."
    records[4]["text"] = "Another __POISON__ row."
    path = job.write(records)
    result = cli("run", path)
    assert result.exit_code == 3, result.output
    assert sorted(r["custom_id"] for r in job.results()) == ["a0001", "a0002", "a0004", "a0006"]
    failed = job.failed()
    assert sorted(f["custom_id"] for f in failed) == ["a0003", "a0005"]
    err = failed[0]["error"]
    assert err["code"] == "context_length_exceeded"
    assert err["status"] == 400
    assert err["attempts"] == 1  # a 400 is not retried
    assert failed[0]["response"]["status_code"] == 400
    assert job.summary()["requests"]["failed"] == 2
    assert job.summary()["outcome"] == "failed_rows"

    sim.reset_stats()
    assert cli("run", path).exit_code == 3
    assert sim.stats.requests == 0  # failed permanently: not re-sent by default

    sim.config.faults.poison_marker = None  # the server now accepts them
    result = cli("run", path, "--retry-failed")
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 2
    assert len(job.results()) == 6
    assert not job.failures.exists()


def test_changed_request_is_sent_again_and_replaces_its_result(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    records = articles(5)
    path = job.write(records)
    assert cli("run", path).exit_code == 0
    records[1]["text"] = "A corrected text for the second article."
    job.write(records)
    sim.reset_stats()
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert user_texts(sim) == ["Summarize: A corrected text for the second article."]
    results = job.results()
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == [f"a{i:04d}" for i in range(1, 6)]  # never twice
    second = next(r for r in results if r["custom_id"] == "a0002")
    assert "corrected" in second["response"]["body"]["choices"][0]["message"]["content"]
    assert job.summary()["plan"]["changed"] == 1


def test_on_change_keep_keeps_the_old_result(job: JobFiles, sim: Simulator, cli: Any) -> None:
    records = articles(3)
    path = job.write(records)
    assert cli("run", path).exit_code == 0
    sim.reset_stats()
    path = job.write(records, params={"max_tokens": 80}, on_change="keep")
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests == 0


def test_on_change_error_refuses_before_sending(job: JobFiles, sim: Simulator, cli: Any) -> None:
    records = articles(3)
    path = job.write(records)
    assert cli("run", path).exit_code == 0
    sim.reset_stats()
    path = job.write(records, params={"max_tokens": 80}, on_change="error")
    result = cli("run", path)
    assert result.exit_code == 1
    assert "3 rows changed" in result.output
    assert sim.stats.requests == 0


def test_relative_paths_resolve_against_the_job_folder(job: JobFiles, cli: Any,
                                                       monkeypatch: Any, tmp_path: Path) -> None:
    path = job.write(articles(2))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli("run", path).exit_code == 0
    assert len(job.results()) == 2
    assert not (elsewhere / "out").exists()


def test_status_reads_state_without_network(job: JobFiles, sim: Simulator, cli: Any) -> None:
    records = articles(5)
    records[0]["text"] = "__POISON__"
    path = job.write(records)
    assert cli("status", path).output.count("not started") == 1
    cli("run", path, "--limit", "3")
    sim.reset_stats()
    result = cli("status", path, "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["requests"] == {"total": 5, "succeeded": 2, "failed": 1, "pending": 2,
                                "changed": 0, "changed_kept": 0, "retryable": 0,
                                "to_send": 2, "not_in_input": 0}
    assert info["failed_by_code"] == {"context_length_exceeded": 1}
    assert info["last_run"]["outcome"] == "failed_rows"
    assert info["locked_by"] is None
    assert info["cost_usd"] is not None and info["cost_usd"] > 0
    assert sim.stats.requests == 0
    text = cli("status", path).output
    assert "succeeded  2" in text and "context_length_exceeded 1" in text


def test_sample_job_runs_in_the_sandbox(tmp_path: Path, cli: Any) -> None:
    """The README's quick start: the shipped job against the built-in simulator."""
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    shutil.copytree(REPO / "sample_data", tmp_path / "sample_data")
    n = sum(1 for line in (tmp_path / "sample_data" / "articles.jsonl").open() if line.strip())
    result = cli("run", tmp_path / "jobs" / "summarize.yaml", "--sandbox")
    assert result.exit_code == 0, result.output
    out = read_jsonl(tmp_path / "out" / "summarize.jsonl")
    assert len(out) == n >= 100
    assert len({r["custom_id"] for r in out}) == n
    assert all(r["response"]["body"]["choices"][0]["message"]["content"].startswith("[sandbox]")
               for r in out)
    result = cli("run", tmp_path / "jobs" / "summarize.yaml", "--sandbox")
    assert result.exit_code == 0
    assert "nothing to do" in result.output


def test_second_example_job_runs_in_the_sandbox(tmp_path: Path, cli: Any) -> None:
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    shutil.copytree(REPO / "sample_data", tmp_path / "sample_data")
    for name in ("classify_reviews", "support_replies"):
        result = cli("run", tmp_path / "jobs" / f"{name}.yaml", "--sandbox")
        assert result.exit_code == 0, result.output
        out = read_jsonl(tmp_path / "out" / f"{name}.jsonl")
        assert out and all(r["error"] is None for r in out)


def test_api_key_never_appears_in_any_file_or_message(tmp_path: Path, cli: Any,
                                                      monkeypatch: Any) -> None:
    from batchgpt.simulator import FaultConfig, SimulatorConfig, SimulatorThread

    secret = "sk-live-SECRET-0123456789abcdef"
    with SimulatorThread(SimulatorConfig(faults=FaultConfig(api_key="sk-other"))) as s:
        job = JobFiles(tmp_path, s.base_url)
        monkeypatch.setenv("MY_KEY", secret)
        path = job.write(articles(3), api={"base_url": s.base_url, "api_key_env": "MY_KEY"})
        result = cli("run", path, "--log-file", tmp_path / "run.log")
        assert result.exit_code == 1  # 401 stops the run
        assert "API key was refused" in result.output
        assert s.stats.requests <= 8  # no retry storm: at most what was in flight
    assert secret not in result.output
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_missing_api_key_exits_1_before_sending(job: JobFiles, sim: Simulator, cli: Any,
                                                monkeypatch: Any) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    path = job.write(articles(2), api={"base_url": None})
    result = cli("run", path)
    assert result.exit_code == 1
    assert "OPENAI_API_KEY" in result.output and "--sandbox" in result.output


def test_library_api_runs_a_job(job: JobFiles, sim: Simulator) -> None:
    from batchgpt import JobConfig, RunOptions, run_job_sync

    path = job.write(articles(3))
    result = run_job_sync(JobConfig.load(path), RunOptions())
    assert result.exit_code == 0 and result.outcome == "completed"
    assert result.summary["requests"]["succeeded"] == 3


def test_version_and_schema(cli: Any) -> None:
    from batchgpt import __version__

    assert cli("--version").output.strip() == f"batchgpt {__version__}"
    schema = json.loads(cli("schema").stdout)
    assert {"input", "output", "limits", "params"} <= set(schema["properties"])


def test_usage_error_exits_2(cli: Any) -> None:
    assert cli("run").exit_code == 2
    assert cli("run", "x.yaml", "--limit", "0").exit_code == 2


