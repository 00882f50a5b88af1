"""``limits.shared_budget``: one cap for every run of a job, against a real redis-server.

Two :class:`SharedBudget` on one job's keys stand for two runs (two parts of a sharded
job, each with its own connection and its own spend from its own index).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from redis import Redis

from batchgpt.budget import Verdict
from batchgpt.limits.budget import SharedBudget
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - a fixture

PREFIX = "batchgpt:budget:{test}"
TTL_S = 90


@pytest.fixture
def budget(redis_server: RedisServer) -> Iterator[Callable[..., SharedBudget]]:  # noqa: F811
    made: list[SharedBudget] = []

    def new(part: str, spent_before: float = 0.0, cap: float = 1.0) -> SharedBudget:
        client = Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=2)
        b = SharedBudget(cap, spent_before, client, PREFIX, part, ttl_s=TTL_S,
                         url=redis_server.url)
        made.append(b)
        return b

    yield new
    for b in made:
        b.close()


def test_one_cap_for_every_run_of_the_job(budget: Callable[..., SharedBudget]) -> None:
    a, b = budget("part-0"), budget("part-1")
    verdict, held = a.admit(0.6)
    assert verdict is Verdict.ADMIT and held is not None
    # b has nothing in flight: what a holds is not b's to wait for, so b stops (exit 4).
    assert b.admit(0.6) == (Verdict.REFUSE, None)
    assert b.admit(0.3)[0] is Verdict.ADMIT
    a.settle(held, 0.1)  # a's row cost 0.1: 0.5 of its reservation comes back
    assert b.admit(0.5)[0] is Verdict.ADMIT
    assert b.spent == pytest.approx(0.1)  # the job's spend, a's included
    assert b.remaining == pytest.approx(0.1)


def test_what_earlier_runs_of_each_part_spent_counts(budget: Callable[..., SharedBudget]
                                                     ) -> None:
    a = budget("part-0", spent_before=0.7)
    a.admit(0.0)  # any operation records the part's spend
    b = budget("part-1", spent_before=0.2)
    assert b.admit(0.2)[0] is Verdict.REFUSE
    assert b.admit(0.1)[0] is Verdict.ADMIT


def test_a_dead_runs_reservations_expire_by_themselves(
        budget: Callable[..., SharedBudget], redis_server: RedisServer) -> None:  # noqa: F811
    a, b = budget("part-0"), budget("part-1")
    a.admit(0.9)
    client = Redis.from_url(redis_server.url)
    (key,) = list(client.scan_iter(PREFIX + ":run:*"))
    assert 0 < client.ttl(key) <= TTL_S  # renewed by each of the run's operations
    assert b.admit(0.5)[0] is Verdict.REFUSE
    client.delete(key)  # what the TTL does once the run that held it is gone
    assert b.admit(0.5)[0] is Verdict.ADMIT
    client.close()


def test_redis_lost_leaves_each_run_its_share_of_what_was_left(
        budget: Callable[..., SharedBudget], redis_server: RedisServer,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    a, b = budget("part-0"), budget("part-1")
    a.admit(0.2)
    b.admit(0.2)
    a.admit(0.0)  # a last heard from Redis with both runs holding reservations
    redis_server.stop()
    # 0.6 was left between two runs holding reservations: a may still reserve 0.3.
    assert a.admit(0.3)[0] is Verdict.ADMIT
    assert a.admit(0.05)[0] is Verdict.WAIT  # over its share, rows in flight: wait
    assert len([r for r in caplog.records if "lost Redis" in r.getMessage()]) == 1
