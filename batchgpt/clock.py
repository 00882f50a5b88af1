"""Time as a dependency: the real clock for runs, a fake one for tests.

Anything in batchgpt that waits (the rate limiter, the runner's backoff) asks a
:class:`Clock` for the time and for sleeps instead of calling ``asyncio.sleep`` directly.
Production code gets :class:`SystemClock`; tests get :class:`FakeClock`, whose time moves
only when the test says so. A test can then assert *exactly* when something happened
("the 11th request went at t=1.1 s") without sleeping, without flakiness, and in
milliseconds of real time::

    clock = FakeClock()
    limiter = RateLimiter(rpm=600, tpm=None, clock=clock)
    task = asyncio.create_task(limiter.acquire(0))
    await clock.advance(0.1)          # wakes every sleeper due by t=0.1, in order
    assert task.done()
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """What a component that waits needs from time: a monotonic reading in seconds and
    a way to sleep on the same scale."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The event loop's clock.

    ``monotonic`` is the running loop's ``time()`` (the scale ``asyncio.sleep`` and
    ``call_at`` use), so a deadline computed from it and slept with ``sleep`` lands where
    it should. Outside a running loop it falls back to :func:`time.monotonic`, which is
    what the default loops use too, so an object built before the loop starts still
    reads consistent times.
    """

    __slots__ = ()

    def monotonic(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock for tests: time stands still until :meth:`advance` moves it.

    ``sleep(s)`` parks the caller until fake time reaches ``now + s``. :meth:`advance`
    walks time forward sleeper by sleeper, in deadline order (ties in the order they went
    to sleep); after waking each one it lets the event loop run until nothing is runnable
    (:meth:`run_until_idle`), so a woken task's follow-up work, including new sleeps that
    fall due before the target time, happens before time moves on. The result is the
    same interleaving on every run.

    ``sleep(0)`` (or a negative duration) just yields to the loop once, like
    ``asyncio.sleep(0)``. A cancelled sleeper is forgotten; cancelling never disturbs
    other sleepers.
    """

    __slots__ = ("_now", "_seq", "_sleepers")

    # How often run_until_idle yields when it can't see the loop's ready queue
    # (an event loop other than asyncio's own, such as uvloop).
    _BLIND_YIELDS = 100
    # Upper bound on yields while the ready queue stays non-empty: a task that spins on
    # sleep(0) forever would otherwise hang the test instead of failing it.
    _MAX_YIELDS = 100_000

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._seq = itertools.count()
        # (deadline, order, future): a heap, so the next deadline is always at [0]
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many tasks are asleep on this clock right now (cancelled ones excluded)."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    @property
    def next_deadline(self) -> float | None:
        """When the earliest sleeper wakes, or None if nobody sleeps."""
        self._drop_cancelled()
        return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking every sleeper due on the way."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        await self.advance_to(self._now + seconds)

    async def advance_to(self, when: float) -> None:
        """Move time forward to ``when`` (no-op if it is in the past), waking sleepers in
        deadline order and letting the loop settle after each."""
        await self.run_until_idle()
        while True:
            self._drop_cancelled()
            if not self._sleepers or self._sleepers[0][0] > when:
                break
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            fut.set_result(None)
            await self.run_until_idle()
        self._now = max(self._now, when)
        await self.run_until_idle()

    async def advance_to_next(self) -> bool:
        """Jump to the next sleeper's deadline and wake it (and any due at the same
        instant). Returns False, without moving time, when nobody sleeps: a handy loop
        condition for driving a task to completion."""
        await self.run_until_idle()
        deadline = self.next_deadline
        if deadline is None:
            return False
        await self.advance_to(deadline)
        return True

    async def run_until_idle(self) -> None:
        """Yield to the event loop until no callback is ready to run, i.e. every task is
        blocked on a sleep, a future, or I/O. Time does not move."""
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)  # asyncio's own loops: the ready deque
        if ready is None:
            for _ in range(self._BLIND_YIELDS):
                await asyncio.sleep(0)
            return
        for _ in range(self._MAX_YIELDS):
            await asyncio.sleep(0)
            if not ready:
                return
        raise RuntimeError("the event loop never went idle (a task busy-loops on sleep(0)?)")

    def _drop_cancelled(self) -> None:
        heap = self._sleepers
        while heap and heap[0][2].done():
            heapq.heappop(heap)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r}, sleepers={len(self._sleepers)})"
