"""RateLimiter on a FakeClock: every assertion is about fake time, nothing sleeps.

Numbers used throughout: rpm=600 is 10 requests per second, so with the default 1 s
burst the requests bucket holds 10 and refills one every 0.1 s; tpm=6,000 is 100 tokens
per second, bucket of 100.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from batchgpt.clock import Clock, FakeClock, SystemClock
from batchgpt.errors import RequestTooLarge
from batchgpt.limiter import RateLimiter, parse_go_duration, parse_retry_after

approx = pytest.approx


class Harness:
    """Starts acquire() calls as tasks and records when (fake time) and in which order
    each one got through."""

    def __init__(self, clock: FakeClock, limiter: RateLimiter) -> None:
        self.clock = clock
        self.limiter = limiter
        self.admitted: list[tuple[str, float]] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, tokens: int = 0) -> asyncio.Task[None]:
        async def run() -> None:
            await self.limiter.acquire(tokens)
            self.admitted.append((name, self.clock.monotonic()))

        task = asyncio.create_task(run(), name=name)
        self.tasks[name] = task
        return task

    async def start_many(self, n: int, tokens: int = 0, prefix: str = "r") -> None:
        for i in range(n):
            self.start(f"{prefix}{i}", tokens)
        await self.clock.run_until_idle()

    @property
    def order(self) -> list[str]:
        return [name for name, _ in self.admitted]

    def at(self, name: str) -> float:
        return dict(self.admitted)[name]

    def count_by(self, when: float) -> int:
        return sum(1 for _, t in self.admitted if t <= when + 1e-9)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make(clock: FakeClock) -> AsyncIterator[Callable[..., Harness]]:
    harnesses: list[Harness] = []

    def factory(rpm: float | None, tpm: float | None, **kwargs: Any) -> Harness:
        h = Harness(clock, RateLimiter(rpm, tpm, clock=clock, **kwargs))
        harnesses.append(h)
        return h

    yield factory
    for h in harnesses:  # leave no pending task behind for the next test's loop
        for task in h.tasks.values():
            task.cancel()
        await asyncio.gather(*h.tasks.values(), return_exceptions=True)
        assert h.limiter.waiting == 0
    assert clock.sleepers == 0, "a limiter timer outlived its waiters"


# -- even pacing ----------------------------------------------------------------------


async def test_buckets_start_empty_so_the_first_request_waits_one_interval(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    await h.start_many(3)
    assert h.admitted == []
    await clock.advance(0.1)
    assert h.order == ["r0"] and h.at("r0") == approx(0.1)
    await clock.advance(0.2)
    assert h.order == ["r0", "r1", "r2"]
    assert [t for _, t in h.admitted] == approx([0.1, 0.2, 0.3])


async def test_pacing_is_even_with_no_start_up_burst(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    await h.start_many(50)
    await clock.advance(3.0)
    times = [t for _, t in h.admitted]
    assert times == approx([0.1 * (i + 1) for i in range(30)])


async def test_a_minute_admits_the_limit_and_no_more(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    await h.start_many(700)
    await clock.advance(60.0)
    assert 600 <= h.count_by(60.0) <= 600 + 10  # rate × 60 s, plus at most one burst
    assert h.count_by(60.0) == 600  # an empty start adds no burst at all


async def test_no_one_second_window_holds_more_than_rate_plus_burst(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    await clock.advance(5.0)  # idle: the bucket fills to one burst (10)
    await h.start_many(200)
    await clock.advance(15.0)
    times = [t for _, t in h.admitted]
    worst = max(sum(1 for u in times if t <= u < t + 1.0 - 1e-9) for t in times)
    # the burst of 10 at t=5, then 9 more at 5.1 … 5.9: one burst plus one second of
    # refill, never a minute's worth
    assert worst == 19


async def test_an_idle_limiter_releases_one_burst_then_paces(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    await clock.advance(30.0)  # a long idle spell saves up one burst only
    await h.start_many(20)
    assert h.count_by(30.0) == 10
    await clock.advance(0.1)
    assert h.count_by(30.1) == 11
    await clock.advance(0.5)
    assert h.count_by(30.6) == 16


async def test_burst_s_sets_the_size_of_the_burst(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None, burst_s=0.5)
    await clock.advance(10.0)
    await h.start_many(20)
    assert h.count_by(10.0) == 5


async def test_a_limit_below_one_request_per_burst_still_paces_exactly(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(6, None)  # one request per 10 s; the bucket holds only 0.1 of a request
    await clock.advance(100.0)
    await h.start_many(4)
    assert h.count_by(100.0) == 1  # a full bucket lets one go, into debt
    await clock.advance(30.0)
    assert [t for _, t in h.admitted] == approx([100.0, 110.0, 120.0, 130.0])


# -- first come, first served ---------------------------------------------------------


async def test_waiters_are_served_in_arrival_order_with_mixed_sizes(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, 6000)
    sizes = [30, 90, 5, 60, 1, 100, 2, 45]
    for i, size in enumerate(sizes):
        h.start(f"w{i}", size)
    await clock.advance(30.0)
    assert h.order == [f"w{i}" for i in range(len(sizes))]


async def test_large_request_at_head_is_not_overtaken(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, 6000)
    h.start("big", 100)  # needs the whole bucket: 1 s from empty
    h.start("small", 1)  # would fit after 0.01 s, but queues behind
    await clock.advance(0.5)
    assert h.admitted == []
    await clock.advance(0.5)
    assert h.order == ["big"]
    assert h.at("big") == approx(1.0)
    await clock.advance(0.01)
    assert h.at("small") == approx(1.01)


async def test_large_request_is_not_starved_by_a_stream_of_small_ones(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, 6000)
    h.start("big", 100)
    for i in range(200):  # small requests keep arriving, 1 every 5 ms
        h.start(f"s{i}", 1)
        await clock.advance(0.005)
    assert h.order[0] == "big"
    assert h.at("big") == approx(1.0)


async def test_request_larger_than_the_bucket_goes_when_full_and_runs_into_debt(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, 6000)  # bucket 100 tokens, refill 100/s
    h.start("huge", 500)  # 5 bursts' worth, but within the per-minute limit
    h.start("next", 10)
    await clock.advance(1.0)
    assert h.at("huge") == approx(1.0)  # full bucket: goes, level 100 - 500 = -400
    await clock.advance(4.0)
    assert h.order == ["huge"]  # debt first...
    await clock.advance(0.1)
    assert h.at("next") == approx(5.1)  # ...then 10 more tokens: long-run rate exact


# -- both dimensions ------------------------------------------------------------------


async def test_rpm_binds_when_requests_are_cheap(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, 60_000)  # 10 requests/s, 1,000 tokens/s
    await h.start_many(100, tokens=10)  # 100 tokens/s at 10/s: tokens never short
    await clock.advance(5.0)
    assert h.count_by(5.0) == 50


async def test_tpm_binds_when_requests_are_expensive(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, 60_000)
    await h.start_many(100, tokens=500)  # 2 requests/s fit in 1,000 tokens/s
    await clock.advance(5.0)
    assert [t for _, t in h.admitted] == approx([0.5 * (i + 1) for i in range(10)])


async def test_zero_token_requests_are_limited_by_rpm_alone(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, 6000)
    await h.start_many(20, tokens=0)
    await clock.advance(1.0)
    assert h.count_by(1.0) == 10


async def test_unlimited_limiter_admits_at_once_without_a_timer(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, None)
    await h.start_many(1000, tokens=10**9)
    assert h.count_by(0.0) == 1000
    assert clock.sleepers == 0


async def test_unlimited_dimension_is_no_constraint(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, 6000)  # no rpm: zero-token requests all go
    await h.start_many(500, tokens=0)
    assert h.count_by(0.0) == 500


# -- requests that can never fit ------------------------------------------------------


async def test_oversize_request_raises_at_once_and_leaves_the_queue_alone(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, 6000)
    await h.start_many(5, tokens=10)
    assert h.limiter.waiting == 5
    with pytest.raises(RequestTooLarge) as caught:
        await h.limiter.acquire(6001)
    assert caught.value.cost == 6001 and caught.value.limit == 6000
    assert h.limiter.waiting == 5
    await clock.advance(0.5)
    assert [t for _, t in h.admitted] == approx([0.1, 0.2, 0.3, 0.4, 0.5])


async def test_request_of_exactly_the_tpm_limit_is_accepted(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, 6000)
    h.start("all", 6000)
    await clock.advance(1.0)
    assert h.at("all") == approx(1.0)


async def test_negative_cost_is_a_bug(make: Callable[..., Harness]) -> None:
    h = make(600, 6000)
    with pytest.raises(ValueError):
        await h.limiter.acquire(-1)


# -- server headers -------------------------------------------------------------------


async def test_headers_lower_the_budget_when_the_server_has_less(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, 60_000)
    await clock.advance(5.0)  # our buckets are full: 10 requests, 1,000 tokens
    h.limiter.observe(
        {"x-ratelimit-remaining-requests": "3", "x-ratelimit-remaining-tokens": "900"}
    )
    await h.start_many(20, tokens=1)
    assert h.count_by(5.0) == 3  # another process spent the rest
    await clock.advance(0.1)
    assert h.count_by(5.1) == 4  # refill continues at our rate


async def test_token_remaining_header_lowers_the_token_budget(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, 6000)
    await clock.advance(5.0)
    h.limiter.observe({"x-ratelimit-remaining-tokens": "0"})
    await h.start_many(1, tokens=50)
    await clock.advance(0.49)
    assert h.admitted == []
    await clock.advance(0.01)
    assert h.at("r0") == approx(5.5)


async def test_headers_never_raise_the_budget_above_local_accounting(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    h.limiter.observe(
        {"x-ratelimit-remaining-requests": "599", "x-ratelimit-limit-requests": "600"}
    )
    await h.start_many(5)
    assert h.admitted == []  # still empty at t=0
    await clock.advance(0.5)
    assert h.count_by(0.5) == 5


async def test_header_names_match_case_insensitively(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    await clock.advance(5.0)
    h.limiter.observe({"X-RateLimit-Remaining-Requests": "1"})
    await h.start_many(5)
    assert h.count_by(5.0) == 1


async def test_limits_are_learned_from_headers_when_unknown(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, None)
    h.limiter.observe(
        {
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-limit-tokens": "6000",
            "x-ratelimit-remaining-requests": "599",
            "x-ratelimit-remaining-tokens": "5900",
            "x-ratelimit-reset-requests": "100ms",
            "x-ratelimit-reset-tokens": "1s",
        }
    )
    assert (h.limiter.rpm, h.limiter.tpm) == (600, 6000)
    await h.start_many(5, tokens=10)
    await clock.advance(0.5)  # learned buckets start empty, like configured ones
    assert [t for _, t in h.admitted] == approx([0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(RequestTooLarge):
        await h.limiter.acquire(6001)


async def test_limits_learned_during_a_pause_start_empty_when_it_ends(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, None)
    h.limiter.pause(5.0)
    await h.start_many(3)
    await clock.advance(1.0)
    h.limiter.observe({"x-ratelimit-limit-requests": "600"})
    await clock.advance(4.0)
    assert h.admitted == []
    await clock.advance(0.3)
    assert [t for _, t in h.admitted] == approx([5.1, 5.2, 5.3])


async def test_server_limit_lowers_a_higher_configured_limit(
    make: Callable[..., Harness],
) -> None:
    h = make(10_000, 1_000_000)
    h.limiter.observe({"x-ratelimit-limit-requests": "500", "x-ratelimit-limit-tokens": "2000000"})
    assert (h.limiter.rpm, h.limiter.tpm) == (500, 1_000_000)


async def test_lowered_tpm_fails_queued_requests_that_no_longer_fit(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, 100_000)
    big = h.start("big", 50_000)
    h.start("small", 10)
    await clock.run_until_idle()
    h.limiter.observe({"x-ratelimit-limit-tokens": "30000"})
    await clock.run_until_idle()
    with pytest.raises(RequestTooLarge):
        await big
    assert h.limiter.waiting == 1
    await clock.advance(0.02)
    assert h.order == ["small"]


async def test_malformed_headers_are_ignored(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    await clock.advance(5.0)
    h.limiter.observe(
        {
            "x-ratelimit-limit-requests": "lots",
            "x-ratelimit-remaining-requests": "-3",
            "x-ratelimit-limit-tokens": "nan",
            "x-ratelimit-remaining-tokens": "",
        }
    )
    assert (h.limiter.rpm, h.limiter.tpm) == (600, None)
    await h.start_many(20)
    assert h.count_by(5.0) == 10


# -- pause, slow down, recover --------------------------------------------------------


async def test_pause_delays_every_waiter_by_exactly_the_pause(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    await h.start_many(10)
    await clock.advance(0.35)  # r0..r2 went at 0.1, 0.2, 0.3
    h.limiter.pause(5.0)
    await clock.advance(10.0)
    expected = [0.1, 0.2, 0.3] + [0.1 * (i + 1) + 5.0 for i in range(3, 10)]
    assert h.order == [f"r{i}" for i in range(10)]
    assert [t for _, t in h.admitted] == approx(expected)


async def test_pause_extends_but_never_shortens(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, None)
    h.limiter.pause(5.0)
    await clock.advance(1.0)
    h.limiter.pause(2.0)  # ends at 3 s: inside the current pause, ignored
    await h.start_many(1)
    await clock.advance(3.9)
    assert h.admitted == []
    h.limiter.pause(4.0)  # now 4.9 + 4 = 8.9: extends
    await clock.advance(3.9)
    assert h.admitted == []
    await clock.advance(0.1)
    assert h.at("r0") == approx(8.9)


async def test_pause_holds_an_unlimited_limiter_too(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, None)
    h.limiter.pause(2.0)
    await h.start_many(3)
    await clock.advance(1.999)
    assert h.admitted == []
    await clock.advance(0.001)
    assert h.order == ["r0", "r1", "r2"]


async def test_slow_down_lowers_the_rate_to_70_percent_with_a_floor_of_10_percent(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    limiter = make(1000, 100_000).limiter
    limiter.slow_down()
    assert limiter.effective_rpm == approx(700)
    assert limiter.effective_tpm == approx(70_000)
    assert (limiter.rpm, limiter.tpm) == (1000, 100_000)
    for _ in range(20):
        await clock.advance(1.0)
        limiter.slow_down()
    assert limiter.effective_rpm == approx(100)


async def test_slow_down_calls_from_one_overload_count_once(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    limiter = make(1000, None).limiter
    for _ in range(30):  # every request in flight failed at once
        limiter.slow_down()
    assert limiter.effective_rpm == approx(700)
    await clock.advance(1.0)
    limiter.slow_down()
    assert limiter.effective_rpm == approx(490)


async def test_slowed_limiter_paces_at_the_effective_rate(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    for _ in range(3):
        h.limiter.slow_down()
        await clock.advance(1.0)
    assert h.limiter.effective_rpm == approx(600 * 0.343)  # 3.43 requests/s
    await h.start_many(100)
    assert h.count_by(3.0) == 3  # the bucket shrank with the rate: 3.43 requests
    await clock.advance(10.0)
    assert h.count_by(13.0) == 3 + 34  # then 3.43/s: 34 in 10 s instead of 100


async def test_record_success_recovers_the_rate_gradually(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    limiter = make(1000, None).limiter
    limiter.slow_down()
    assert limiter.effective_rpm == approx(700)
    for _ in range(10):  # a success every 0.1 s for 1 s: +5 % of the limit
        await clock.advance(0.1)
        limiter.record_success()
    assert limiter.effective_rpm == approx(750)
    await clock.advance(60.0)  # a quiet minute is no evidence: at most 1 s counts
    limiter.record_success()
    assert limiter.effective_rpm == approx(800)
    for _ in range(100):
        await clock.advance(0.5)
        limiter.record_success()
    assert limiter.effective_rpm == approx(1000)  # capped at 100 %


async def test_record_success_at_full_rate_changes_nothing(make: Callable[..., Harness]) -> None:
    limiter = make(1000, 5000).limiter
    limiter.record_success()
    assert (limiter.effective_rpm, limiter.effective_tpm) == (1000, 5000)


async def test_set_limits_changes_the_pace_for_waiters(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(60, None)  # one a second
    await h.start_many(10)
    await clock.advance(1.0)
    assert h.count_by(1.0) == 1
    h.limiter.set_limits(600, None)  # ten a second from now on
    await clock.advance(1.0)
    assert h.count_by(2.0) == 10
    h.limiter.set_limits(None, None)
    await clock.run_until_idle()
    assert h.count_by(2.0) == 10 and h.limiter.waiting == 0


# -- cancellation and timers ----------------------------------------------------------


async def test_cancelled_head_leaves_the_queue_and_the_next_proceeds(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(None, 6000)
    big = h.start("big", 100)
    h.start("small", 10)
    await clock.advance(0.05)
    big.cancel()
    await clock.run_until_idle()
    assert h.limiter.waiting == 1
    await clock.advance(0.05)
    assert h.at("small") == approx(0.1)  # as if "big" had never asked


async def test_cancelled_waiter_in_the_middle_keeps_the_others_in_order(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, None)
    await h.start_many(5)
    h.tasks["r2"].cancel()
    await clock.advance(1.0)
    assert h.order == ["r0", "r1", "r3", "r4"]
    assert [t for _, t in h.admitted] == approx([0.1, 0.2, 0.3, 0.4])


async def test_cancelling_after_admission_gives_the_budget_back(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(60, 6000)
    first = h.start("first", 50)
    h.start("second", 50)
    await clock.advance(0.5)  # tokens for "first" are there; its request is not (1/s)
    assert h.admitted == []
    h.limiter.set_limits(None, 6000)  # admits "first" now, synchronously...
    first.cancel()  # ...but it is cancelled before it could send anything
    await clock.run_until_idle()
    assert h.order == ["second"]  # its 50 tokens went back to "second"
    assert h.at("second") == approx(0.5)


async def test_one_timer_sleeps_however_many_wait(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(600, 60_000)
    await h.start_many(2000, tokens=5)
    assert h.limiter.waiting == 2000
    assert clock.sleepers == 1
    assert clock.next_deadline == approx(0.1)
    await clock.advance(1.0)
    assert clock.sleepers == 1 and h.limiter.waiting == 1990


async def test_last_waiter_cancelled_disarms_the_timer(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    h = make(60, None)
    task = h.start("only")
    await clock.run_until_idle()
    assert clock.sleepers == 1
    task.cancel()
    await clock.run_until_idle()
    assert clock.sleepers == 0 and h.limiter.waiting == 0


async def test_random_traffic_stays_fcfs_and_under_both_limits(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    rng = random.Random(20240601)
    h = make(600, 6000)  # 10 requests/s, 100 tokens/s, 1 s bursts
    costs: dict[str, int] = {}
    cancelled: set[str] = set()
    for i in range(300):
        name = f"w{i}"
        costs[name] = rng.choice([0, 1, 5, 20, 60, 150, 400])
        h.start(name, costs[name])
        if rng.random() < 0.1:
            await clock.run_until_idle()
            victim = f"w{rng.randrange(i + 1)}"
            if not h.tasks[victim].done():
                h.tasks[victim].cancel()
                cancelled.add(victim)
        await clock.advance(rng.choice([0.0, 0.01, 0.1, 0.5]))
    await clock.advance(600.0)
    assert h.order == [n for n in costs if n not in cancelled]  # arrival order
    times = [t for _, t in h.admitted]
    for i, start in enumerate(times):
        for width in (0.5, 1.0, 10.0):
            inside = [n for n, t in h.admitted[i:] if t < start + width - 1e-9]
            assert len(inside) <= 10 * (width + 1) + 1e-9
            # one burst + refill, plus the debt of at most one oversized request
            assert sum(costs[n] for n in inside) <= 100 * (width + 1) + 400


# -- construction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rpm", "tpm", "burst_s"),
    [(0, None, 1.0), (-5, None, 1.0), (None, float("inf"), 1.0), (60, 60, 0.0), (60, 60, -1.0)],
)
def test_nonsense_limits_are_rejected(rpm: float | None, tpm: float | None, burst_s: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rpm, tpm, burst_s=burst_s, clock=FakeClock())


def test_a_limiter_can_be_built_outside_an_event_loop() -> None:
    limiter = RateLimiter(600, 6000)
    assert limiter.rpm == 600 and limiter.waiting == 0


async def test_system_clock_runs_on_the_loop_clock() -> None:
    clock: Clock = SystemClock()
    assert clock.monotonic() == approx(asyncio.get_running_loop().time(), abs=0.01)
    await clock.sleep(0)


# -- the fake clock -------------------------------------------------------------------


async def test_fake_clock_wakes_sleepers_in_deadline_order(clock: FakeClock) -> None:
    woke: list[tuple[str, float]] = []

    async def nap(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    tasks = [asyncio.create_task(nap(n, s)) for n, s in [("c", 3.0), ("a", 1.0), ("b", 2.0)]]
    await clock.advance(2.5)
    assert woke == [("a", 1.0), ("b", 2.0)]
    assert clock.monotonic() == 2.5
    assert await clock.advance_to_next() and woke[-1] == ("c", 3.0)
    assert not await clock.advance_to_next()
    await asyncio.gather(*tasks)


async def test_fake_clock_forgets_cancelled_sleepers(clock: FakeClock) -> None:
    task = asyncio.create_task(clock.sleep(1.0))
    await clock.run_until_idle()
    assert clock.sleepers == 1
    task.cancel()
    await clock.run_until_idle()
    assert clock.sleepers == 0 and clock.next_deadline is None


# -- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("9.816s", 9.816),
        ("1m30.5s", 90.5),
        ("1h2m3s", 3723.0),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("100ns", 1e-7),
        ("0", 0.0),
        ("0s", 0.0),
        (".5s", 0.5),
        ("2.s", 2.0),
        ("-1.5s", -1.5),
        ("+2s", 2.0),
        (" 17ms ", 0.017),
        ("20", 20.0),  # bare number: seconds (compatible servers)
        ("", None),
        ("   ", None),
        ("soon", None),
        ("5x", None),
        ("1s2", None),
        ("s", None),
        ("1 s", None),
        ("1S", None),
        ("--1s", None),
        ("1e3s", None),
        ("1.2.3s", None),
        (None, None),
    ],
)
def test_parse_go_duration(text: str | None, seconds: float | None) -> None:
    result = parse_go_duration(text)
    if seconds is None:
        assert result is None
    else:
        assert result == approx(seconds)


@pytest.mark.parametrize(
    ("headers", "message", "seconds"),
    [
        ({"retry-after-ms": "1500"}, None, 1.5),
        ({"retry-after-ms": "250", "retry-after": "7"}, None, 0.25),  # ms wins
        ({"retry-after": "7"}, None, 7.0),
        ({"Retry-After": "2.5"}, None, 2.5),
        ({"retry-after": "0"}, None, 0.0),
        ({"retry-after-ms": "junk", "retry-after": "3"}, None, 3.0),  # falls through
        ({"retry-after": "-3"}, "Please try again in 2s.", 2.0),
        ({}, "Rate limit reached ... Please try again in 9.816s. Visit ...", 9.816),
        ({}, "Please try again in 120ms.", 0.12),
        ({}, "Please try again in 1m30s.", 90.0),
        ({}, "please TRY AGAIN IN 6m0s", 360.0),
        ({}, "Please try again in 20 seconds.", 20.0),
        ({}, "Please try again in 1 minute.", 60.0),
        ({}, "Please try again in 500 milliseconds", 0.5),
        ({"retry-after": "4"}, "Please try again in 9s", 4.0),  # header wins
        ({}, "Rate limit reached for requests.", None),
        ({}, None, None),
        ({"retry-after": "whenever"}, None, None),
        ({"x-request-id": "req_1"}, "try again in a while", None),
    ],
)
def test_parse_retry_after(
    headers: dict[str, str], message: str | None, seconds: float | None
) -> None:
    result = parse_retry_after(headers, message)
    if seconds is None:
        assert result is None
    else:
        assert result == approx(seconds)


def test_parse_retry_after_reads_an_http_date_relative_to_now() -> None:
    headers = {"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}
    now = 1445412500.0  # 2015-10-21 07:28:20 UTC
    assert parse_retry_after(headers, None, now=now) == approx(10.0)
    assert parse_retry_after(headers, None, now=now + 60) == 0.0  # in the past: go now


# -- a server that lies in its headers ------------------------------------------------

LYING_LIMITS = {
    "requests 0.001/min": ("x-ratelimit-limit-requests", "0.001"),
    "requests 1e-300/min": ("x-ratelimit-limit-requests", "1e-300"),
    "requests just under the floor": ("x-ratelimit-limit-requests", "0.99"),
    "requests above any account": ("x-ratelimit-limit-requests", "1e300"),
    "tokens 1/min": ("x-ratelimit-limit-tokens", "1"),
    "tokens just under the floor": ("x-ratelimit-limit-tokens", "999"),
    "tokens above any account": ("x-ratelimit-limit-tokens", "1e13"),
}


def limiter_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "batchgpt" and r.levelno == logging.WARNING]


@pytest.mark.parametrize(("name", "value"), LYING_LIMITS.values(), ids=LYING_LIMITS.keys())
async def test_an_implausible_limit_header_is_ignored_and_logged_once(
    make: Callable[..., Harness], clock: FakeClock, caplog: pytest.LogCaptureFixture,
    name: str, value: str,
) -> None:
    """Believed, 0.001 requests/min stalls a run for good and 1 token/min fails every row
    as too large; a limiter that learns its limits must not learn these."""
    h = make(None, None)
    for _ in range(50):  # the server says it on every answer
        h.limiter.observe({name: value})
    assert (h.limiter.rpm, h.limiter.tpm) == (None, None)
    await h.start_many(20, tokens=5_000)  # neither stalled nor too large
    assert h.count_by(0.0) == 20
    (warning,) = limiter_warnings(caplog)
    assert name in warning and f"{float(value):g}" in warning
    assert "keeping no limit" in warning


async def test_a_header_far_below_the_configured_limit_is_ignored_and_the_limit_kept(
    make: Callable[..., Harness], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    h = make(600, 100_000)
    h.limiter.observe({"x-ratelimit-limit-requests": "5",  # 120x below
                       "x-ratelimit-limit-tokens": "999.9"})  # 100.01x below
    assert (h.limiter.rpm, h.limiter.tpm) == (600, 100_000)
    await h.start_many(10)
    await clock.advance(1.0)
    assert h.count_by(1.0) == 10  # still 10 a second
    warnings = limiter_warnings(caplog)
    assert len(warnings) == 2
    requests = next(w for w in warnings if "limit-requests" in w)
    assert ": 5 " in requests and "configured limit of 600" in requests
    assert "keeping the limit of 600 requests/min" in requests
    tokens = next(w for w in warnings if "limit-tokens" in w)
    assert "999.9" in tokens and "keeping the limit of 100,000 tokens/min" in tokens


async def test_a_header_exactly_100_times_below_the_configured_limit_is_believed(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h = make(600, 100_000)
    h.limiter.observe({"x-ratelimit-limit-requests": "6", "x-ratelimit-limit-tokens": "1000"})
    assert (h.limiter.rpm, h.limiter.tpm) == (6, 1000)
    assert limiter_warnings(caplog) == []


async def test_small_lies_cannot_ratchet_a_learned_limit_down(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing configured, the highest limit the server ever stated is the yardstick,
    not the last one: 50x lower twice in a row would otherwise be 2,500x lower."""
    h = make(None, None)
    h.limiter.observe({"x-ratelimit-limit-requests": "10000"})
    h.limiter.observe({"x-ratelimit-limit-requests": "200"})  # 50x: believed
    assert h.limiter.rpm == 200
    h.limiter.observe({"x-ratelimit-limit-requests": "4"})  # 2,500x below the peak
    assert h.limiter.rpm == 200
    h.limiter.observe({"x-ratelimit-limit-requests": "20000"})  # a raise is believed
    assert h.limiter.rpm == 20000
    (warning,) = limiter_warnings(caplog)
    assert "10,000 requests/min the server stated earlier" in warning
    assert "keeping the limit of 200 requests/min" in warning


async def test_each_header_warns_once_per_limiter(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    lies = {"x-ratelimit-limit-requests": "0.5", "x-ratelimit-limit-tokens": "3"}
    first, second = make(None, None).limiter, make(None, None).limiter
    for _ in range(10):
        first.observe(lies)
        first.observe({"x-ratelimit-limit-requests": "0.25"})  # another lie, same header
    second.observe(lies)
    assert len(limiter_warnings(caplog)) == 4  # two headers × two limiters


async def test_a_zero_limit_reads_as_not_stated_without_a_warning(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h = make(600, None)
    h.limiter.observe({"x-ratelimit-limit-requests": "0", "x-ratelimit-limit-tokens": "0"})
    assert (h.limiter.rpm, h.limiter.tpm) == (600, None)
    assert limiter_warnings(caplog) == []


async def test_remaining_zero_on_every_answer_with_an_absurd_reset_never_stalls(
    make: Callable[..., Harness], clock: FakeClock
) -> None:
    """Eight workers in a loop: wait for the limiter, 'send' (50 ms of fake latency), get
    an answer that says nothing is left and that the budget resets in 11 years. Each
    answer can throw away less than one request's worth of refill and answers come only
    from requests sent, so the pace stays at least half the limit."""
    limiter = make(600, None).limiter  # 10 a second
    lie = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "99999h"}
    sent: list[float] = []

    async def worker() -> None:
        while True:
            await limiter.acquire(0)
            sent.append(clock.monotonic())
            await clock.sleep(0.05)
            limiter.observe(lie)

    tasks = [asyncio.create_task(worker()) for _ in range(8)]
    await clock.advance(60.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert 300 <= len(sent) <= 600  # at least half the limit; never more than the limit
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert max(gaps) <= 0.2 + 1e-9  # and steadily: no gap longer than two intervals


@pytest.mark.parametrize(
    ("headers", "message", "seconds"),
    [
        ({"retry-after": "nan"}, None, None),
        ({"retry-after": "inf"}, None, None),
        ({"retry-after": "-inf"}, None, None),
        ({"retry-after": "1e309"}, None, None),  # overflows to inf
        ({"retry-after": "1e308"}, None, None),  # finite, but no server means it
        ({"retry-after": "-1"}, None, None),
        ({"retry-after": "86401"}, None, None),  # more than a day
        ({"retry-after": "86400"}, None, 86_400.0),  # a daily limit: still a hint
        ({"retry-after-ms": "1e308"}, None, None),
        ({"retry-after-ms": "NaN", "retry-after": "3"}, None, 3.0),  # falls through
        ({"retry-after-ms": "-5", "retry-after": "2"}, None, 2.0),
        ({"retry-after-ms": "99999999999", "retry-after": "2"}, None, 2.0),
        ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, None, None),
        ({"retry-after": "Mon, 01 Jan 0001 00:00:00 GMT"}, None, 0.0),  # in the past: go
        ({"retry-after": "1e400"}, "Please try again in 2s.", 2.0),
        ({}, "Please try again in 99999999h.", None),
        ({}, "Please try again in 99999999999999999999 seconds.", None),
        ({}, "Please try again in 99999999h. Or try again in 5 seconds.", 5.0),
        ({"retry-after": "\x00\udcff" * 1000}, None, None),
    ],
)
def test_parse_retry_after_drops_what_no_server_can_mean(
    headers: dict[str, str], message: str | None, seconds: float | None
) -> None:
    """Whatever the headers say, the answer is None or a finite wait of at most a day that
    a caller may sleep on: never NaN, never negative, never an exception."""
    result = parse_retry_after(headers, message, now=1_700_000_000.0)
    if seconds is None:
        assert result is None
    else:
        assert result == approx(seconds)
