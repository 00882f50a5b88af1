"""Sharded jobs: ``run --shard K/N`` runs one part of the rows, ``merge`` joins the parts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchgpt.shard import Shard, part_output, shard_of
from batchgpt.simulator import Simulator
from tests.conftest import JobFiles, articles, read_jsonl
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - a fixture


def part(job: JobFiles, k: int, n: int, what: str = "jsonl") -> Path:
    return job.output.with_name(f"job.part-{k}-of-{n}.{what}")


def test_a_rows_shard_is_a_stable_hash_of_its_id_the_same_on_every_machine() -> None:
    # BLAKE2b (8-byte digest, big-endian) of the id's UTF-8, modulo N, not Python's salted
    # hash(): pinned, since a part's rows must stay its rows across runs and machines.
    assert shard_of("a0001", 1000) == 845
    assert shard_of("ünïcode-id", 1000) == 510
    assert shard_of("a0001", 1) == 0


def test_every_id_is_in_exactly_one_part() -> None:
    counts = [0, 0, 0]
    for i in range(3000):
        counts[shard_of(f"id-{i}", 3)] += 1
    assert sum(counts) == 3000
    assert min(counts) > 900  # and the parts are about even


def test_part_paths_are_named_after_the_output() -> None:
    assert part_output(Path("out/x.jsonl"), Shard(2, 8)) == Path("out/x.part-2-of-8.jsonl")
    assert part_output(Path("out/x"), Shard(0, 1)) == Path("out/x.part-0-of-1")


def test_shard_must_be_k_of_n_counted_from_zero(job: JobFiles, cli: Any) -> None:
    job.write(articles(3))
    for bad, says in (("3/3", "K must be 0 to 2"), ("x", "K/N"), ("1/0", "N must be"),
                      ("-1/3", "K/N")):
        result = cli("run", job.job_path, "--shard", bad)
        assert result.exit_code == 2, (bad, result.output)
        assert says in result.output, (bad, result.output)
    assert not job.output.parent.exists()


def run_parts(job: JobFiles, cli: Any, n: int, *extra: str) -> None:
    for k in range(n):
        result = cli("run", job.job_path, "--shard", f"{k}/{n}", *extra)
        assert result.exit_code == 0, result.output


def test_shards_then_merge_give_each_id_once_and_totals_that_are_the_sum_of_the_parts(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    rows = articles(30)
    job.write(rows)
    run_parts(job, cli, 3)
    assert sim.stats.requests == 30  # each row sent once, by its own part
    parts = [read_jsonl(part(job, k, 3)) for k in range(3)]
    for k, lines in enumerate(parts):
        assert lines and all(shard_of(line["custom_id"], 3) == k for line in lines)
        assert (job.output.parent / f"job.part-{k}-of-3.state").is_dir()
    assert not job.output.exists()  # the parts don't touch the job's own output

    result = cli("merge", job.job_path)
    assert result.exit_code == 0, result.output
    assert "merged 3 parts: 30 results" in result.output
    merged = [line["custom_id"] for line in job.results()]
    assert sorted(merged) == sorted(r["id"] for r in rows)  # each id once
    summaries = [json.loads(part(job, k, 3, "summary.json").read_text()) for k in range(3)]
    total = job.summary()
    for key in ("total", "succeeded", "failed", "pending"):
        assert total["requests"][key] == sum(s["requests"][key] for s in summaries)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert total["usage"][key] == sum(s["usage"][key] for s in summaries)
    assert abs(total["cost_usd"] - sum(s["cost_usd"] for s in summaries)) < 1e-12
    assert total["outcome"] == "completed"

    # Run again and merge again: nothing sent, the same merge.
    run_parts(job, cli, 3)
    assert sim.stats.requests == 30
    assert cli("merge", job.job_path).exit_code == 0
    assert sorted(line["custom_id"] for line in job.results()) == sorted(merged)


def test_merge_refuses_naming_the_missing_and_incomplete_parts(
        job: JobFiles, cli: Any) -> None:
    job.write(articles(30))
    result = cli("merge", job.job_path)
    assert result.exit_code == 1 and "no parts of job" in result.output

    assert cli("run", job.job_path, "--shard", "0/3").exit_code == 0
    assert cli("run", job.job_path, "--shard", "1/3", "--limit", "1").exit_code == 0
    result = cli("merge", job.job_path)
    assert result.exit_code == 1
    assert "missing parts: 2/3" in result.output
    assert "incomplete parts: 1/3" in result.output and "pending" in result.output
    assert not job.output.exists() and not job.summary_path.exists()

    assert cli("run", job.job_path, "--shard", "1/3").exit_code == 0
    assert cli("run", job.job_path, "--shard", "2/3").exit_code == 0
    assert cli("merge", job.job_path).exit_code == 0
    assert len(job.results()) == 30


def test_merge_refuses_to_overwrite_an_unsharded_runs_output(job: JobFiles, cli: Any) -> None:
    job.write(articles(6))
    assert cli("run", job.job_path).exit_code == 0  # an unsharded run: out/job.jsonl
    refused = cli("run", job.job_path, "--shard", "0/2")  # a part would pay for it again
    assert refused.exit_code == 1 and "unsharded run" in refused.output
    # Parts made while it was away (or by an older batchgpt): merge refuses too.
    aside = job.dir / "aside"
    aside.mkdir()
    for name in ("job.jsonl", "job.state"):
        (job.output.parent / name).rename(aside / name)
    run_parts(job, cli, 2)
    for name in ("job.jsonl", "job.state"):
        (aside / name).rename(job.output.parent / name)
    result = cli("merge", job.job_path)
    assert result.exit_code == 1
    assert "holds the results of an unsharded run" in result.output
    assert len(job.results()) == 6


def test_each_part_checks_the_whole_input(job: JobFiles, sim: Simulator, cli: Any) -> None:
    rows = articles(10)
    rows[7] = dict(rows[7], id=rows[2]["id"])  # a duplicate, whichever parts they fall in
    job.write(rows)
    for k in range(2):
        result = cli("run", job.job_path, "--shard", f"{k}/2")
        assert result.exit_code == 1
        assert "duplicate id" in result.output
    assert sim.stats.requests == 0


def test_a_shared_budget_holds_across_the_parts_of_a_job(
        job: JobFiles, sim: Simulator, cli: Any, redis_server: RedisServer) -> None:  # noqa: F811
    # A part's ~20 rows cost about $0.00025: one part fits under the cap, two don't.
    job.write(articles(40), limits={"concurrency": 1, "max_cost_usd": 0.0003,
                                    "redis_url": redis_server.url, "shared_budget": True})
    codes = [cli("run", job.job_path, "--shard", f"{k}/2").exit_code for k in range(2)]
    spent = [json.loads(part(job, k, 2, "summary.json").read_text())["cost_usd"]
             for k in range(2)]
    assert codes[1] == 4  # the second part stopped by what the first one spent
    assert sum(spent) <= 0.0003 + 1e-9  # together, not each, under the cap


def test_without_a_shared_budget_each_part_has_the_whole_cap(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    job.write(articles(40), limits={"concurrency": 1, "max_cost_usd": 0.0003})
    for k in range(2):
        assert cli("run", job.job_path, "--shard", f"{k}/2").exit_code in (0, 4)
    spent = [json.loads(part(job, k, 2, "summary.json").read_text())["cost_usd"]
             for k in range(2)]
    assert sum(spent) > 0.0003  # what shared_budget is for


def test_shared_budget_needs_a_redis(job: JobFiles, sim: Simulator, cli: Any,
                                     monkeypatch: Any) -> None:
    monkeypatch.delenv("BATCHGPT_REDIS_URL", raising=False)
    job.write(articles(3), limits={"max_cost_usd": 1.0, "shared_budget": True})
    result = cli("run", job.job_path)
    assert result.exit_code == 1
    assert "limits.shared_budget needs a Redis" in result.output
    assert sim.stats.requests == 0


def test_a_redis_url_that_is_not_one_is_refused_naming_its_line(job: JobFiles, sim: Simulator,
                                                                cli: Any) -> None:
    job.write(articles(3), limits={"redis_url": "http://user:pw-secret@127.0.0.1:6379"})
    result = cli("run", job.job_path)
    assert result.exit_code == 1
    assert "job.yaml:" in result.output and "limits.redis_url must be a redis://" in result.output
    assert "pw-secret" not in result.output
    assert sim.stats.requests == 0


def test_a_redis_urls_password_is_never_shown() -> None:
    from batchgpt.limits import redact_url

    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:[REDACTED]@host:6379/0"
    assert redact_url("rediss://app:s3cret@host/1") == "rediss://app:[REDACTED]@host/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_part_rerun_after_rows_were_appended_sends_only_its_new_rows(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    # A part's resume may start after the input's verified prefix: the rows of the other
    # parts in it are not this part's, and appended rows are sent by their own part only.
    job.write(articles(30))
    run_parts(job, cli, 3)
    assert sim.stats.requests == 30
    run_parts(job, cli, 3)  # a no-op for every part
    assert sim.stats.requests == 30
    with job.input.open("a", encoding="utf-8") as fh:
        for record in articles(9, start=31):
            fh.write(json.dumps(record) + "\n")
    sent_by_part = []
    for k in range(3):
        before = sim.stats.requests
        assert cli("run", job.job_path, "--shard", f"{k}/3").exit_code == 0
        sent_by_part.append(sim.stats.requests - before)
    new_ids = [f"a{i:04d}" for i in range(31, 40)]
    assert sent_by_part == [sum(shard_of(i, 3) == k for i in new_ids) for k in range(3)]
    assert cli("merge", job.job_path).exit_code == 0
    assert sorted(r["custom_id"] for r in read_jsonl(job.output)) == \
        [f"a{i:04d}" for i in range(1, 40)]
