"""Review of issue 14 (shared limits, sharded jobs): each test is a defect found, fixed."""

from __future__ import annotations

from typing import Any

import pytest

from batchgpt.simulator import Simulator
from tests.conftest import JobFiles, articles
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - a fixture


def run_parts(job: JobFiles, cli: Any, n: int) -> list[int]:
    return [cli("run", job.job_path, "--shard", f"{k}/{n}").exit_code for k in range(n)]


def test_a_part_of_another_sharding_refuses_rather_than_paying_for_every_row_again(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    job.write(articles(20))
    assert run_parts(job, cli, 2) == [0, 0]
    assert sim.stats.requests == 20
    result = cli("run", job.job_path, "--shard", "0/3")
    assert result.exit_code == 1, result.output
    assert "2 shards" in result.output and "job.part-" in result.output
    assert sim.stats.requests == 20  # nothing paid twice


def test_an_unsharded_run_refuses_beside_the_parts_rather_than_paying_for_them_again(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    job.write(articles(20))
    assert run_parts(job, cli, 2) == [0, 0]
    result = cli("run", job.job_path)
    assert result.exit_code == 1, result.output
    assert "--shard" in result.output
    assert sim.stats.requests == 20


def test_an_unsharded_run_after_a_merge_still_refuses_so_a_later_merge_loses_nothing(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    job.write(articles(20))
    assert run_parts(job, cli, 2) == [0, 0]
    assert cli("merge", job.job_path).exit_code == 0
    job.write(articles(30))  # 10 new rows: an unsharded run would send them into
    result = cli("run", job.job_path)  # out/job.jsonl, which the next merge overwrites
    assert result.exit_code == 1, result.output
    assert sim.stats.requests == 20


def test_parts_refuse_beside_an_unsharded_runs_results_rather_than_paying_again(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    job.write(articles(20))
    assert cli("run", job.job_path).exit_code == 0
    assert sim.stats.requests == 20
    result = cli("run", job.job_path, "--shard", "0/2")
    assert result.exit_code == 1, result.output
    assert "unsharded" in result.output
    assert sim.stats.requests == 20


def test_parts_of_the_same_count_as_the_merge_run_again_and_merge_again(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    job.write(articles(20))
    assert run_parts(job, cli, 2) == [0, 0]
    assert cli("merge", job.job_path).exit_code == 0
    job.write(articles(30))
    assert run_parts(job, cli, 2) == [0, 0]  # the job's output is the merge of these parts
    assert sim.stats.requests == 30
    assert cli("merge", job.job_path).exit_code == 0
    assert len(job.results()) == 30


def test_merge_refuses_a_part_whose_input_rows_are_not_all_done(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    job.write(articles(20))
    assert run_parts(job, cli, 2) == [0, 0]
    job.write(articles(30))  # 10 rows the parts never saw: their summaries say "complete"
    result = cli("merge", job.job_path)
    assert result.exit_code == 1, result.output
    assert "incomplete parts" in result.output and "pending" in result.output
    assert not job.output.exists()
    assert run_parts(job, cli, 2) == [0, 0]
    assert cli("merge", job.job_path).exit_code == 0
    assert len(job.results()) == 30 and job.summary()["requests"]["total"] == 30


def test_a_redis_password_given_in_the_urls_query_is_never_shown(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    from batchgpt.limits import redact_url

    assert "hunter2" not in redact_url("redis://127.0.0.1:6379/0?password=hunter2")
    assert "hunter2" not in redact_url("unix:///run/redis.sock?db=0&password=hunter2")
    for url in ("unix:///nonexistent/redis.sock?password=hunter2",
                "redis://127.0.0.1:6379/0?password=hunter2&db=x"):
        job.write(articles(3), limits={"redis_url": url})
        result = cli("run", job.job_path)
        assert result.exit_code == 1, result.output
        assert "hunter2" not in result.output, result.output
    assert sim.stats.requests == 0


def test_a_shared_budget_is_refused_in_batch_mode_rather_than_silently_not_shared(
        job: JobFiles, sim: Simulator, cli: Any, redis_server: RedisServer) -> None:  # noqa: F811
    # mode: batch never connects to Redis: each part would have the whole cap to itself.
    job.write(articles(6), mode="batch", batch={"poll_interval_s": 0.01},
              limits={"max_cost_usd": 1.0, "redis_url": redis_server.url,
                      "shared_budget": True})
    result = cli("run", job.job_path, "--shard", "0/2")
    assert result.exit_code == 1, result.output
    assert "shared_budget" in result.output and "job.yaml:" in result.output
    assert sim.batches is not None and sum(sim.batches.carried.values()) == 0


async def test_a_run_of_large_requests_is_not_starved_by_a_run_of_small_ones(
        redis_server: RedisServer) -> None:  # noqa: F811
    # Two runs on one key, 1,000 tokens a second: run a's requests need a full bucket,
    # run b's a tenth of one. Both ask as soon as they may (ties to a). Without an order
    # across runs, b takes each tenth as it refills and a never goes.
    from redis.asyncio import Redis

    from batchgpt.clock import FakeClock
    from batchgpt.limits.shared import SharedRateLimiter

    clock = FakeClock(0.0)
    clients = [Redis.from_url(redis_server.url, socket_timeout=2) for _ in range(2)]
    a, b = (SharedRateLimiter(c, "batchgpt:limit:{starve}", None, 60_000, clock=clock)
            for c in clients)
    cost, next_at = {0: 1000, 1: 100}, {0: 0.0, 1: 0.0}
    tokens: dict[int, list[float]] = {0: [], 1: []}
    while True:
        i = min(next_at, key=lambda j: (next_at[j], j))
        t = next_at[i]
        if t > 30.0:
            break
        await clock.advance_to(t)
        wait = await (a, b)[i].ask(cost[i])
        assert wait is not None
        if wait == 0:
            tokens[i].append(t)
        else:
            next_at[i] = t + wait
    for c in clients:
        await c.aclose()
    # First come, first served across runs, as within one: they take turns.
    assert len(tokens[0]) >= 20 and len(tokens[1]) >= 20, tokens
    # and together they keep to the limit: 30 s at 1,000 a second, plus the 1 s burst
    assert 1000 * len(tokens[0]) + 100 * len(tokens[1]) <= 31_000


async def test_a_queued_run_that_dies_holds_the_others_back_no_more_than_50_ms(
        redis_server: RedisServer) -> None:  # noqa: F811
    from redis.asyncio import Redis

    from batchgpt.clock import FakeClock
    from batchgpt.limits.shared import SharedRateLimiter

    clock = FakeClock(0.0)
    clients = [Redis.from_url(redis_server.url, socket_timeout=2) for _ in range(2)]
    a, b = (SharedRateLimiter(c, "batchgpt:limit:{dies}", 600, None, clock=clock)
            for c in clients)
    assert await a.ask(1) == pytest.approx(0.1)  # a queues for t = 0.1, then dies
    t, wait = 0.0, await b.ask(1)
    while wait:
        assert wait is not None
        t += wait
        await clock.advance_to(t)
        wait = await b.ask(1)
    for c in clients:
        await c.aclose()
    # b goes once a is late for its time (a stall would end in a burst the server rejects)
    assert 0.1 < t <= 0.1 + 0.05 + 0.02


def test_merge_still_takes_parts_copied_without_their_state_folders(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    import shutil

    job.write(articles(20))
    assert run_parts(job, cli, 2) == [0, 0]
    for k in range(2):  # parts from other machines: their files, not their state
        shutil.rmtree(job.output.with_name(f"job.part-{k}-of-2.state"))
    result = cli("merge", job.job_path)
    assert result.exit_code == 0, result.output
    assert len(job.results()) == 20
    assert not job.output.with_name("job.part-0-of-2.state").exists()  # merge only reads
