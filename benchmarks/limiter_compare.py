"""asyncio-throttle vs aiolimiter vs batchgpt's RateLimiter, on the real clock.

Run: ``python benchmarks/limiter_compare.py`` (about 40 s; needs the ``bench`` extra:
aiolimiter, asyncio-throttle). The numbers and the decision they led to are in
docs/decisions.md, "Rate limiter: asyncio-throttle vs aiolimiter vs our own".

The limit is 600 requests per minute (10/s). The two libraries take a count and a
period, so each is tried the two ways a user would write 600/min: per minute
(600, 60) and per second (10, 1). Measured:

1. start-up: when the first acquisition completes, how many complete within 100 ms,
   the most in any 1 s and any 100 ms window, and the rate achieved over 3 s and in
   the steady part (1-3 s), with 700 callers waiting from t=0;
2. fairness with weights (60,000 tokens/min): 20 small requests (10 tokens), then one
   large (900), then a stream of small ones arriving at 95 % and at 105 % of the limit
   (a busy runner always has callers waiting). How long the large one waits, and how
   many requests got through while an earlier caller was still waiting
   (first-come-first-served violations);
3. CPU: 2,000 callers waiting at 100/s; process CPU seconds over 3 s of wall time and
   how often each limiter's scheduler woke up.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace

import asyncio_throttle.throttler as throttle_module
from aiolimiter import AsyncLimiter
from asyncio_throttle.throttler import Throttler

from batchgpt.clock import SystemClock
from batchgpt.limiter import RateLimiter

Acquire = Callable[[int], Awaitable[None]]  # weight -> wait
RUN_S = 3.0


class Wakes:
    """How often each limiter's scheduler woke up: asyncio-throttle's polls (each call
    to ``asyncio.sleep(retry_interval)`` in its module), aiolimiter's ``_wake_next``
    calls, our limiter's timer sleeps."""

    count = 0


async def _counting_sleep(delay: float) -> None:
    Wakes.count += 1
    await asyncio.sleep(delay)


def count_throttle_polls() -> None:
    """asyncio-throttle reaches asyncio.sleep through its module's ``asyncio`` name: give
    that module a stand-in namespace, leaving the real asyncio.sleep alone."""
    setattr(throttle_module, "asyncio", SimpleNamespace(sleep=_counting_sleep))  # noqa: B010


class CountingAsyncLimiter(AsyncLimiter):
    __slots__ = ()

    def _wake_next(self, *args: object) -> None:
        Wakes.count += 1
        super()._wake_next(*args)


class CountingClock(SystemClock):
    __slots__ = ()

    async def sleep(self, seconds: float) -> None:
        Wakes.count += 1
        await super().sleep(seconds)


# -- the contestants ----------------------------------------------------------------


def throttle(rate: int, period: float) -> Acquire:
    limiter = Throttler(rate_limit=rate, period=period)

    async def acquire(weight: int) -> None:
        await limiter.acquire()  # type: ignore[no-untyped-call]  # no weights

    return acquire


def aio(rate: float, period: float) -> Acquire:
    limiter = CountingAsyncLimiter(rate, period)

    async def acquire(weight: int) -> None:
        await limiter.acquire(weight)

    return acquire


def ours(rpm: float | None, tpm: float | None) -> Acquire:
    limiter = RateLimiter(rpm, tpm, clock=CountingClock())

    async def acquire(weight: int) -> None:
        await limiter.acquire(weight)

    return acquire


# -- 1 + 2: start-up burst and achieved rate -------------------------------------------


@dataclass
class PaceResult:
    name: str
    first_ms: float
    in_100ms: int
    max_1s: int
    max_100ms: int
    max_100ms_steady: int
    rate_3s: float
    rate_steady: float


def max_in_window(times: list[float], width: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def pace(name: str, make: Callable[[], Acquire], prefill_s: float = 0.0) -> PaceResult:
    acquire = make()
    if prefill_s:
        await asyncio.sleep(prefill_s)
    loop = asyncio.get_running_loop()
    times: list[float] = []
    start = loop.time()

    async def one() -> None:
        await acquire(1)
        times.append(loop.time() - start)

    tasks = [asyncio.create_task(one()) for _ in range(700)]
    await asyncio.sleep(RUN_S)
    await cancel(tasks)
    done = [t for t in times if t <= RUN_S]
    return PaceResult(
        name=name,
        first_ms=min(done) * 1000 if done else float("nan"),
        in_100ms=sum(1 for t in done if t <= 0.1),
        max_1s=max_in_window(done, 1.0),
        max_100ms=max_in_window(done, 0.1),
        max_100ms_steady=max_in_window([t for t in done if t >= 1.0], 0.1),
        rate_3s=len(done) / RUN_S,
        rate_steady=sum(1 for t in done if 1.0 <= t < RUN_S) / (RUN_S - 1.0),
    )


# -- 3: fairness with weights ------------------------------------------------------------


@dataclass
class FairResult:
    name: str
    large_wait: float | None  # None: still waiting when the run ended
    violations: int
    small_max_wait: float
    admitted: int


async def fairness(name: str, acquire: Acquire, load: float) -> FairResult:
    """Tokens/s limit 1,000. 20 smalls (10) queue at t=0, then the large (900), then
    smalls arrive on a fixed schedule at ``load`` × the limit for 3 s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    arrivals: list[float] = []
    admitted: list[float | None] = []
    weights: list[int] = []

    async def one(i: int, weight: int) -> None:
        await acquire(weight)
        admitted[i] = loop.time() - start

    tasks: list[asyncio.Task[None]] = []

    def arrive(weight: int) -> None:
        arrivals.append(loop.time() - start)
        admitted.append(None)
        weights.append(weight)
        tasks.append(asyncio.create_task(one(len(arrivals) - 1, weight)))

    for _ in range(20):
        arrive(10)
    arrive(900)
    large = 20
    interval = 10 / (1000 * load)
    k = 1
    while start + k * interval < start + RUN_S:
        await asyncio.sleep(start + k * interval - loop.time())
        arrive(10)
        k += 1
    await cancel(tasks)
    # A violation: request j got through while an earlier caller i was still waiting.
    violations = 0
    for j, tj in enumerate(admitted):
        if tj is None:
            continue
        if any(
            arrivals[i] < arrivals[j] and (admitted[i] is None or (admitted[i] or 0) > tj)
            for i in range(j)
        ):
            violations += 1
    large_at = admitted[large]
    small_waits = [
        (t if t is not None else RUN_S) - a
        for a, t, w in zip(arrivals, admitted, weights, strict=True)
        if w == 10 and a < RUN_S - 1.0
    ]
    return FairResult(
        name=name,
        large_wait=None if large_at is None else large_at - arrivals[large],
        violations=violations,
        small_max_wait=max(small_waits),
        admitted=sum(1 for t in admitted if t is not None),
    )


# -- 4: CPU while many wait --------------------------------------------------------------


@dataclass
class CpuResult:
    name: str
    cpu_s: float
    admitted: int
    wakeups: int


async def cpu(name: str, make: Callable[[], Acquire]) -> CpuResult:
    acquire = make()
    admitted = 0

    async def one() -> None:
        nonlocal admitted
        await acquire(1)
        admitted += 1

    tasks = [asyncio.create_task(one()) for _ in range(2000)]
    for _ in range(3):
        await asyncio.sleep(0)  # everyone has called acquire()
    gc.collect()
    before_count, before_admitted = Wakes.count, admitted
    cpu0 = time.process_time()
    await asyncio.sleep(RUN_S)
    cpu_s = time.process_time() - cpu0
    result = CpuResult(name, cpu_s, admitted - before_admitted, Wakes.count - before_count)
    await cancel(tasks)
    return result


async def cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- report ------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, rule, *body])


async def main() -> None:
    wall0 = time.perf_counter()
    count_throttle_polls()
    print("Limit 600 requests/min (10/s); 700 callers from t=0; 3 s per row.\n")
    paces = [
        await pace("asyncio-throttle Throttler(600, 60)", lambda: throttle(600, 60)),
        await pace("asyncio-throttle Throttler(10, 1)", lambda: throttle(10, 1)),
        await pace("aiolimiter AsyncLimiter(600, 60)", lambda: aio(600, 60)),
        await pace("aiolimiter AsyncLimiter(10, 1)", lambda: aio(10, 1)),
        await pace("batchgpt RateLimiter(600, None), starts empty", lambda: ours(600, None)),
        await pace(
            "batchgpt RateLimiter(600, None), built 1 s early (= starts full)",
            lambda: ours(600, None),
            prefill_s=1.0,
        ),
    ]
    print(
        table(
            [
                "limiter",
                "1st (ms)",
                "≤100 ms",
                "max/1 s",
                "max/100 ms",
                "max/100 ms after 1 s",
                "avg 0-3 s /s",
                "steady 1-3 s /s",
            ],
            [
                [
                    r.name,
                    f"{r.first_ms:.0f}",
                    str(r.in_100ms),
                    str(r.max_1s),
                    str(r.max_100ms),
                    str(r.max_100ms_steady),
                    f"{r.rate_3s:.1f}",
                    f"{r.rate_steady:.1f}",
                ]
                for r in paces
            ],
        )
    )

    print("\nWeighted fairness: 1,000 tokens/s; 20 × 10 tokens, then 1 × 900, then 10-token")
    print("requests arriving at 95 % / 105 % of the limit for 3 s.\n")
    fair: list[tuple[str, FairResult]] = []
    for load in (0.95, 1.05):
        fair.append(
            (f"{load:.0%}", await fairness("aiolimiter AsyncLimiter(1000, 1)", aio(1000, 1), load))
        )
        fair.append(
            (
                f"{load:.0%}",
                await fairness("batchgpt RateLimiter(None, 60000)", ours(None, 60_000), load),
            )
        )
    rows = [
        [
            r.name,
            load,
            "starved (> 3 s)" if r.large_wait is None else f"{r.large_wait:.2f}",
            str(r.violations),
            f"{r.small_max_wait:.2f}",
            str(r.admitted),
        ]
        for load, r in fair
    ]
    rows.append(["asyncio-throttle", "any", "n/a (no weights)", "n/a", "n/a", "n/a"])
    print(
        table(
            [
                "limiter",
                "load",
                "large waits (s)",
                "FCFS violations",
                "small max wait (s)",
                "admitted",
            ],
            rows,
        )
    )

    print("\nCPU: 2,000 callers waiting at 100/s, 3 s of wall time.\n")
    cpus = [
        await cpu("asyncio-throttle Throttler(100, 1)", lambda: throttle(100, 1)),
        await cpu("aiolimiter AsyncLimiter(100, 1)", lambda: aio(100, 1)),
        await cpu("batchgpt RateLimiter(6000, None)", lambda: ours(6000, None)),
    ]
    print(
        table(
            ["limiter", "CPU s / 3 s", "admitted", "scheduler wake-ups"],
            [[r.name, f"{r.cpu_s:.3f}", str(r.admitted), str(r.wakeups)] for r in cpus],
        )
    )
    print(f"\n(total {time.perf_counter() - wall0:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main())
