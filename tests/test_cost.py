"""Cost before (dry run), during (budget cap) and after (summary, metrics file)."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from batchgpt.simulator import Simulator
from tests.conftest import JobFiles, articles


def test_cost_of_a_known_model_matches_hand_arithmetic(job: JobFiles, sim: Simulator,
                                                        cli: Any) -> None:
    path = job.write(articles(12))
    assert cli("run", path).exit_code == 0
    usages = [r["response"]["body"]["usage"] for r in job.results()]
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    expected = (prompt * 0.15 + completion * 0.60) / 1_000_000  # gpt-4o-mini, USD per 1M
    summary = job.summary()
    assert abs(summary["cost_usd"] - expected) < 1e-9
    assert abs(summary["this_run"]["cost_usd"] - expected) < 1e-9


def test_pricing_override_in_the_job_file_wins(job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(3), pricing={"gpt-4o-mini": {"input": 1.0, "output": 2.0}})
    assert cli("run", path).exit_code == 0
    u = job.summary()["usage"]
    expected = (u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0) / 1_000_000
    assert abs(job.summary()["cost_usd"] - expected) < 1e-9


def test_unknown_model_runs_with_cost_unknown(job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(3), model="my-local-llama")
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    summary = job.summary()
    assert summary["cost_usd"] is None
    assert summary["cost_unknown_models"] == ["my-local-llama"]
    assert "add a `pricing:` block" in result.output


def test_dry_run_estimates_and_sends_nothing(job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(10), limits={"rpm": 60})
    result = cli("run", path, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    est = json.loads(result.stdout)
    assert sim.stats.requests == 0
    assert not job.output.exists()
    assert est["pending"] == 10
    assert est["max_completion_tokens"] == 10 * 50
    assert est["estimated_prompt_tokens"] > 0
    low, high = est["cost_usd"]["min"], est["cost_usd"]["max"]
    assert 0 < low < high
    assert est["min_wall_time_s"] == 10.0  # 10 rows at 60 requests a minute
    text = cli("run", path, "--dry-run").output
    assert "nothing sent" in text and "to send" in text
    assert sim.stats.requests == 0
    # After a real run, the dry run counts what is left.
    assert cli("run", path, "--limit", "4").exit_code == 0
    est = json.loads(cli("run", path, "--dry-run", "--json").stdout)
    assert est["already_done"] == 4 and est["pending"] == 6


def test_budget_stops_dispatch_before_the_cap_and_a_higher_cap_continues(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    pricing = {"gpt-4o-mini": {"input": 1000.0, "output": 1000.0}}  # $0.001 a token
    path = job.write(articles(40), pricing=pricing, limits={"concurrency": 4,
                                                            "max_cost_usd": 0.5})
    result = cli("run", path)
    assert result.exit_code == 4, result.output
    summary = job.summary()
    assert summary["outcome"] == "stopped" and summary["stopped"] == "budget"
    spent = summary["cost_usd"]
    assert spent <= 0.5
    worst_row = (30 + 50) * 0.001  # a generous bound on one row: prompt + max_tokens
    assert spent >= 0.5 - 5 * worst_row  # stopped within one in-flight wave of the cap
    done = summary["requests"]["succeeded"]
    assert 0 < done < 40
    path = job.write(limits={"concurrency": 4, "max_cost_usd": 100})
    assert cli("run", path).exit_code == 0
    ids = [r["custom_id"] for r in job.results()]
    assert len(ids) == len(set(ids)) == 40
    assert sim.stats.requests == 40


def test_budget_with_an_unknown_price_refuses_to_start(job: JobFiles, sim: Simulator,
                                                       cli: Any) -> None:
    path = job.write(articles(2), model="mystery-model", limits={"max_cost_usd": 1})
    result = cli("run", path)
    assert result.exit_code == 1
    assert "price of model 'mystery-model' is unknown" in result.output
    assert sim.stats.requests == 0


def test_summary_has_latency_errors_and_rates(job: JobFiles, sim: Simulator, cli: Any) -> None:
    records = articles(8)
    records[0]["text"] = "__POISON__"
    path = job.write(records)
    assert cli("run", path).exit_code == 3
    run = job.summary()["this_run"]
    assert run["errors_by_code"] == {"context_length_exceeded": 1}
    lat = run["latency_s"]
    assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert run["achieved_rpm"] > 0 and run["achieved_tpm"] > 0
    assert set(job.summary()["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens",
                                           "cached_tokens", "reasoning_tokens"}


def test_metrics_file_parses_with_prometheus_client(job: JobFiles, sim: Simulator, cli: Any
                                                    ) -> None:
    records = articles(5)
    records[1]["text"] = "__POISON__"
    path = job.write(records)
    metrics = job.dir / "job.prom"
    assert cli("run", path, "--metrics-file", metrics).exit_code == 3
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    rows = {s.labels["status"]: s.value for s in families["batchgpt_rows"].samples}
    assert rows == {"succeeded": 4.0, "failed": 1.0, "pending": 0.0}
    assert families["batchgpt_cost_usd"].samples[0].value > 0
    outcome = {s.labels["outcome"]: s.value for s in families["batchgpt_run_outcome"].samples}
    assert outcome["failed_rows"] == 1.0
