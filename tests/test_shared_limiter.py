"""The Redis-shared limiter, against a real redis-server, in fake time.

Several :class:`SharedRateLimiter` on one key stand for several runs (each with its own
Redis connection, as separate processes have). Time is a FakeClock's, passed to the Lua
script, so every grant's instant is exact: the tests step the runs through time
(``ask``: one request, granted now or "wait this long") and count what was let through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from batchgpt.clock import FakeClock
from batchgpt.errors import RequestTooLarge
from batchgpt.limits.shared import SharedRateLimiter
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - a fixture

KEY = "batchgpt:limit:{test}"


@pytest.fixture
async def connect(redis_server: RedisServer) -> AsyncIterator[Callable[[], Redis]]:  # noqa: F811
    clients: list[Redis] = []

    def new() -> Redis:
        client = Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=2)
        clients.append(client)
        return client

    yield new
    for client in clients:
        await client.aclose()


def runs(connect: Callable[[], Redis], clock: FakeClock, n: int, **limits: Any
         ) -> list[SharedRateLimiter]:
    return [SharedRateLimiter(connect(), KEY, limits.get("rpm"), limits.get("tpm"),
                              clock=clock) for _ in range(n)]


async def settle(clock: FakeClock, tasks: list[asyncio.Task[None]]) -> None:
    """Yield to the loop until the tasks are all done or one sleeps on the clock (a Redis round
    trip is real I/O, which FakeClock.run_until_idle does not wait for)."""
    for _ in range(1_000_000):
        if clock.sleepers or all(t.done() for t in tasks):
            return
        await asyncio.sleep(0)
    raise AssertionError("the tasks neither finished nor slept")


async def step(clock: FakeClock, limiters: list[SharedRateLimiter], until: float,
               cost: int = 1, active: Callable[[int, float], bool] = lambda i, t: True,
               ) -> list[tuple[float, int]]:
    """Every run asks as soon as it may, until ``until``: the (time, run) of each grant."""
    next_at = [clock.monotonic()] * len(limiters)
    since = list(range(len(limiters)))  # ties go to the run that has waited longest
    grants: list[tuple[float, int]] = []
    while True:
        i = min(range(len(limiters)), key=lambda j: (next_at[j], since[j]))
        since[i] = max(since) + 1
        t = next_at[i]
        if t > until:
            return grants
        await clock.advance_to(t)
        if not active(i, t):
            next_at[i] = float("inf")
            continue
        wait = await limiters[i].ask(cost)
        assert wait is not None
        if wait == 0:
            grants.append((t, i))
        else:
            next_at[i] = t + wait


async def test_three_runs_on_one_key_share_one_limit_and_use_all_of_it(
        connect: Callable[[], Redis]) -> None:
    clock = FakeClock(1000.0)
    limiters = runs(connect, clock, 3, rpm=600)  # 10 a second, for all three together
    grants = await step(clock, limiters, until=1010.0)
    # No burst at the start: the shared bucket starts empty, and fills at 10 a second.
    assert len([g for g in grants if g[0] < 1001.0]) <= 10
    # Over any window, at most the rate times (window + 1 s burst): the server's limit holds.
    times = [t for t, _ in grants]
    for k, t in enumerate(times):
        in_window = sum(1 for u in times[k:] if u < t + 2.0)
        assert in_window <= 10 * 3 + 1, (t, in_window)
    # And the limit is used: 10 s at 10 a second, the first request after 0.1 s.
    assert len(grants) >= 99
    assert len(grants) <= 101
    # Each run gets a share (nobody is starved).
    for i in range(3):
        assert sum(1 for _, r in grants if r == i) >= 25


async def test_a_run_that_stops_leaves_its_share_to_the_others(
        connect: Callable[[], Redis]) -> None:
    clock = FakeClock(0.0)
    limiters = runs(connect, clock, 3, rpm=600)
    # Run 2 dies at t = 5: it holds nothing in Redis, so runs 0 and 1 get the whole limit.
    grants = await step(clock, limiters, until=15.0, active=lambda i, t: i != 2 or t < 5.0)
    after = [g for g in grants if g[0] >= 6.0]
    assert {r for _, r in after} == {0, 1}
    assert len(after) >= 89  # 9 s at 10 a second


async def test_a_pause_from_one_run_pauses_every_run(connect: Callable[[], Redis]) -> None:
    clock = FakeClock(0.0)
    a, b, c = runs(connect, clock, 3, rpm=600)
    await step(clock, [a, b, c], until=3.0)
    a.pause(5.0)  # a 429's retry-after, seen by run a
    await a.aclose()  # the pause is pushed to Redis in the background: let it land
    grants = await step(clock, [a, b, c], until=12.0)
    assert not [g for g in grants if g[0] < 8.0 - 1e-6]
    # Refill was frozen: no burst when the pause ends, the pace resumes.
    assert len([g for g in grants if g[0] < 9.0]) <= 11


async def test_the_servers_remaining_budget_is_shared(connect: Callable[[], Redis]) -> None:
    clock = FakeClock(0.0)
    a, b = runs(connect, clock, 2, rpm=600)
    await clock.advance(5.0)  # idle: the bucket is full (a second's worth)
    b.observe({"x-ratelimit-remaining-requests": "0"})
    await b.aclose()
    assert await a.ask(1) == pytest.approx(0.1)  # run a finds the bucket empty


async def test_tokens_and_requests_are_paced_together_and_the_tighter_binds(
        connect: Callable[[], Redis]) -> None:
    clock = FakeClock(0.0)
    limiters = runs(connect, clock, 2, rpm=6000, tpm=60_000)  # 100 req/s but 1,000 tok/s
    grants = await step(clock, limiters, until=10.0, cost=100)
    assert 95 <= len(grants) <= 101  # 10 a second, by tokens


async def test_a_request_larger_than_the_burst_waits_for_a_full_bucket_then_goes_into_debt(
        connect: Callable[[], Redis]) -> None:
    clock = FakeClock(0.0)
    (a,) = runs(connect, clock, 1, tpm=60_000)  # 1,000 tokens a second, 1 s burst
    assert await a.ask(5_000) == pytest.approx(1.0)  # empty at start: wait until full
    await clock.advance(1.0)
    assert await a.ask(5_000) == 0.0
    # The full bucket (1,000) went 4,000 into debt: paid back before 10 more may go.
    assert await a.ask(10) == pytest.approx(4.01)


async def test_a_request_larger_than_the_whole_limit_is_refused_at_once(
        connect: Callable[[], Redis]) -> None:
    clock = FakeClock(0.0)
    (a,) = runs(connect, clock, 1, tpm=60_000)
    with pytest.raises(RequestTooLarge):
        await a.acquire(60_001)


async def test_acquire_serves_a_runs_waiters_first_come_first_served(
        connect: Callable[[], Redis]) -> None:
    clock = FakeClock(0.0)
    (a,) = runs(connect, clock, 1, tpm=60_000)
    order: list[int] = []

    async def one(i: int, cost: int) -> None:
        await a.acquire(cost)
        order.append(i)

    tasks = [asyncio.create_task(one(0, 900)), asyncio.create_task(one(1, 10)),
             asyncio.create_task(one(2, 500))]
    while not all(t.done() for t in tasks):
        await settle(clock, tasks)
        await clock.advance_to_next()
    assert order == [0, 1, 2]  # the big one first is never overtaken by the small one


async def test_redis_lost_paces_locally_at_a_share_and_comes_back(
        redis_server: RedisServer, connect: Callable[[], Redis],  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0.0)
    a, b = runs(connect, clock, 2, rpm=600)
    await step(clock, [a, b], until=2.0)
    assert a.runs == 2
    redis_server.stop()
    assert await a.ask(1) is None  # lost: the fallback takes over
    assert not a.on_redis
    task = asyncio.create_task(a.acquire(1))  # paced locally, at 1/2 of the limit
    await settle(clock, [task])
    assert not task.done()  # the local bucket starts empty, as the shared one did
    await clock.advance(0.2)  # 5 a second: half of 600 RPM
    assert task.done()
    assert await a.ask(1) is None
    assert a.lost == 1
    lost = [r for r in caplog.records if "lost Redis" in r.getMessage()]
    assert len(lost) == 1 and "1/2 of the limit" in lost[0].getMessage()
    redis_server.start()
    await clock.advance(2.0)
    for _ in range(50):  # redis-py reconnects on the next command
        if await a.ask(1) is not None:
            break
    assert a.on_redis
    assert any("answers again" in r.getMessage() for r in caplog.records)
    await a.aclose()
