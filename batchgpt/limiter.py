"""Pacing requests under OpenAI's requests-per-minute and tokens-per-minute limits.

:class:`RateLimiter` decides *when* each request may be sent; it never sends anything.
The runner asks it for permission with the request's token cost, tells it what each
response's ``x-ratelimit-*`` headers said, and reports back-pressure (``retry-after``,
"slow down"). Two pure helpers turn the server's hints into seconds:
:func:`parse_go_duration` (``"1m30.5s"`` → 90.5) and :func:`parse_retry_after`.

Why our own limiter rather than aiolimiter or asyncio-throttle: see
``docs/decisions.md`` ("Rate limiter: asyncio-throttle vs aiolimiter vs our own"). In
short, neither paces two dimensions at once, neither serves waiters first come first
served with weights, both let a full window go at start-up when configured per minute,
and neither can be corrected by the server's headers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import deque
from collections.abc import Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import ClassVar

from .clock import Clock, SystemClock
from .errors import RequestTooLarge

__all__ = [
    "MAX_RETRY_AFTER_S",
    "RateLimiter",
    "header",
    "parse_go_duration",
    "parse_retry_after",
]

log = logging.getLogger("batchgpt")

# A wait hint longer than a day is not a hint but a broken or hostile server: no real limit
# (daily ones included) asks for more, and taken at face value it would park a row, or the
# whole run, forever.
MAX_RETRY_AFTER_S = 86_400.0

# Two instants closer than this are the same instant. Float arithmetic on refill times
# (t0 + deficit / rate) is off in the last bits; without a tolerance, a timer that fires
# exactly on time could find the bucket a hair short and re-arm for a femtosecond.
_EPSILON = 1e-6


class _Bucket:
    """One dimension (requests or tokens): a continuous-refill bucket.

    ``level`` is the budget available at clock time ``stamp``; it refills at ``rate``
    per second up to ``capacity`` (= rate × burst_s). It may go negative: that is debt
    run up by a request bigger than the capacity, paid back by refill before anything
    else goes. ``stamp`` may lie in the future: during a pause refill is frozen until
    the pause ends.
    """

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: float, burst_s: float, now: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = self.rate * burst_s
        self.level = 0.0  # empty at the start: see RateLimiter, "Start-up"
        self.stamp = now

    def level_at(self, when: float) -> float:
        if when <= self.stamp:
            return self.level
        return min(self.capacity, self.level + (when - self.stamp) * self.rate)

    def settle(self, now: float) -> None:
        if now > self.stamp:
            self.level = self.level_at(now)
            self.stamp = now

    def ready_at(self, cost: float, now: float) -> float:
        """The earliest time a request of ``cost`` may go: when the level reaches the
        cost, or, for a cost above the capacity, when the bucket is full."""
        start = max(now, self.stamp)
        need = min(cost, self.capacity)
        level = self.level_at(start)
        if level >= need:
            return start
        return start + (need - level) / self.rate

    def take(self, cost: float, now: float) -> None:
        self.settle(now)
        self.level -= cost

    def give_back(self, cost: float, now: float) -> None:
        self.settle(now)
        self.level = min(self.capacity, self.level + cost)

    def lower_to(self, remaining: float, now: float) -> None:
        self.settle(now)
        self.level = min(self.level, remaining)

    def freeze_until(self, until: float, now: float) -> None:
        self.settle(now)
        self.stamp = max(self.stamp, until)

    def set_rate(self, per_minute: float, burst_s: float, now: float) -> None:
        self.settle(now)  # what refilled so far refilled at the old rate
        self.rate = per_minute / 60.0
        self.capacity = self.rate * burst_s
        self.level = min(self.level, self.capacity)


class _Waiter:
    __slots__ = ("future", "tokens")

    def __init__(self, tokens: int, future: asyncio.Future[None]) -> None:
        self.tokens = tokens
        self.future = future


class RateLimiter:
    """RPM + TPM together: two continuous-refill buckets, one FCFS queue, one timer.

    ::

        limiter = RateLimiter(rpm=500, tpm=200_000)
        await limiter.acquire(tokens.request_cost(body))   # then send the request
        limiter.observe(response.headers)

    **Algorithm.** Each limited dimension is a bucket refilling continuously at
    ``limit / 60`` per second with capacity ``rate × burst_s``. A request costs one unit
    of the requests bucket and ``tokens`` units of the tokens bucket, and may go when
    *both* hold its cost; it then takes the cost from both. Whichever dimension is short
    decides the wait, so the tighter limit binds by itself. A cost larger than a bucket's
    capacity (a 20,000-token request at 300,000 TPM and a 1 s burst holds 5,000) may go
    once that bucket is *full* and drives it into debt; refill pays the debt back before
    anything else goes. The long-run rate stays exact and big requests are not starved.
    A request costing more than the whole per-minute limit could never be accepted by
    the server: :meth:`acquire` raises :class:`RequestTooLarge` at once.

    **Why a burst of only ``burst_s``.** OpenAI quantizes limits to short windows
    (60,000 RPM may be enforced as 1,000 per second), so a bucket holding a minute's
    worth, as the cookbook script and a per-minute aiolimiter/asyncio-throttle do, sends
    a burst the server rejects. With ``burst_s = 1`` the most that goes in any window of
    T seconds is ``rate × (T + 1)`` (plus the debt of one oversized request).

    **Start-up: the buckets start empty**, when the limiter is built. The first request
    waits ``min(cost, capacity) / rate`` (never more than ``burst_s``); from then on the
    pace is even. A bucket that started full would let ``rate × burst_s`` go at t = 0
    *and* refill another second's worth during the first second: twice the rate in the
    first window, which is what a limit enforced per second rejects (measured in
    ``benchmarks/limiter_compare.py``, recorded in ``docs/decisions.md``). Starting empty
    also assumes nothing about what a previous run or another process left in the
    server's budget. Build the limiter just before the run: idle time fills it.

    **First come, first served.** Waiters queue in arrival order and only the head may
    go; a large request at the head holds back smaller ones behind it, so it is never
    overtaken and never starved (aiolimiter serves the smallest amount first). There is
    no polling: a single timer sleeps until the exact moment the head can go, then
    admits every waiter that fits and re-arms for the next. A waiter cancelled while
    queued is dropped without touching the budget; one cancelled after it was admitted
    but before it resumed gives its budget back.

    **Server feedback.** :meth:`observe` reads any response's ``x-ratelimit-*`` headers:

    * ``x-ratelimit-limit-requests`` / ``-tokens``: the account's limits. They are
      *learned* when the limiter was built with ``None``, and they lower a configured
      limit that is higher than the server's (the server rejects anything above its
      own). A configured limit below the server's is kept: it may be deliberate.

      **A stated limit is believed only when it is plausible**, because batchgpt runs
      unattended against proxies it does not control and one lying header would
      otherwise decide the whole run: ``limit-requests: 0.001`` paces at one request
      every 17 hours (a run that stalls forever), ``limit-tokens: 1`` turns every row
      into a permanent ``request_too_large``. A value is ignored when it is below
      ``MIN_SERVER_RPM`` (1 request/min) or ``MIN_SERVER_TPM`` (1,000 tokens/min),
      above ``MAX_SERVER_RPM`` / ``MAX_SERVER_TPM`` (more than any account has; such
      a rate would also overflow the concurrency arithmetic), or more than
      ``MAX_LOWERING`` (100×) below the configured limit, or, with none configured,
      below the highest limit the server stated before (so a sequence of smaller lies
      cannot ratchet the limit down either). Each ignored header is logged once per
      limiter (logger ``"batchgpt"``, a warning naming the value and the limit kept);
      later lies of the same header are ignored silently. ``0`` is read as "not
      stated", as before, without a warning.
    * ``x-ratelimit-remaining-requests`` / ``-tokens``: requests/tokens the server will
      still accept right now, in the same units as a bucket's level. Another process on
      the same key spends from the same server budget, so when ``remaining`` is below
      our level, the level is lowered to ``remaining``; it is never raised (local
      accounting stays the ceiling: responses arrive out of order and late). No
      rescaling is needed between the server's minute-sized budget and our
      second-sized bucket: both count what may go *now*, and our level is at most one
      burst, so only a nearly exhausted server budget lowers it. A lying ``remaining``
      cannot stall a run: the lowest it can set is an empty bucket (negative,
      non-finite and malformed values are dropped), refill goes on at our own rate
      whatever it says, and nothing waits on the server's reset time. A server that
      says ``remaining: 0`` on every answer throws away less than one request's worth
      of refill per answer, and answers come only from requests sent, so it slows a
      run to no less than about half the limit (two thirds in
      ``tests/test_limiter.py``), never stops it.
    * ``x-ratelimit-reset-requests`` / ``-tokens``: not used for the level. For OpenAI
      it is the time until the server's whole minute is refilled, ``(limit −
      remaining) / (limit / 60 s)``, which adds nothing to limit and remaining and is
      rounded. :func:`parse_go_duration` reads it for callers who log it.

    **Back-pressure.** :meth:`pause` (from ``retry-after``) stops all dispatch until
    ``now + seconds`` and freezes refill meanwhile, so the queue resumes at the pace it
    had instead of with a burst (a server that says "wait" has no budget to spare for
    one) and every waiter is delayed by exactly the pause. :meth:`slow_down` (a 429 despite
    pacing, a 503 "slow down") multiplies the effective rate of both dimensions by
    0.7, down to 10 % of the limit; several calls within one second count once, since
    one overload typically fails every request in flight. :meth:`record_success` lets
    the rate climb back by 5 % of the limit per second of successes (additive increase,
    multiplicative decrease, as TCP does).

    ``None`` for a limit means no constraint in that dimension; with both ``None``,
    :meth:`acquire` returns at once unless a pause is in force.
    """

    __slots__ = (
        "_burst_s",
        "_clock",
        "_configured_rpm",
        "_configured_tpm",
        "_factor",
        "_last_recovery",
        "_last_slow_down",
        "_paused_until",
        "_queue",
        "_requests",
        "_rpm",
        "_server_rpm",
        "_server_rpm_peak",
        "_server_tpm",
        "_server_tpm_peak",
        "_timer",
        "_timer_at",
        "_tokens",
        "_tpm",
        "_waiting",
        "_warned",
    )

    SLOW_DOWN_FACTOR: ClassVar[float] = 0.7  # multiplicative decrease per slow_down()
    MIN_FACTOR: ClassVar[float] = 0.1  # never below 10 % of the limit
    SLOW_DOWN_COOLDOWN_S: ClassVar[float] = 1.0  # slow_down() calls this close count once
    RECOVERY_PER_S: ClassVar[float] = 0.05  # additive increase per second of successes
    # Plausible server-stated limits, per minute (see "Server feedback" above).
    MIN_SERVER_RPM: ClassVar[float] = 1.0
    MIN_SERVER_TPM: ClassVar[float] = 1_000.0
    MAX_SERVER_RPM: ClassVar[float] = 1e9
    MAX_SERVER_TPM: ClassVar[float] = 1e12
    MAX_LOWERING: ClassVar[float] = 100.0  # a header may lower a limit at most this many times

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        burst_s: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        _check_limit("rpm", rpm)
        _check_limit("tpm", tpm)
        if not (math.isfinite(burst_s) and burst_s > 0):
            raise ValueError(f"burst_s must be a positive number of seconds, not {burst_s!r}")
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._burst_s = float(burst_s)
        self._configured_rpm = rpm
        self._configured_tpm = tpm
        self._server_rpm: float | None = None
        self._server_tpm: float | None = None
        self._server_rpm_peak: float | None = None  # the highest limit the server stated
        self._server_tpm_peak: float | None = None
        self._warned: set[str] = set()  # header names already warned about
        self._rpm: float | None = None
        self._tpm: float | None = None
        self._requests: _Bucket | None = None
        self._tokens: _Bucket | None = None
        self._factor = 1.0
        self._last_slow_down = -math.inf
        self._last_recovery = -math.inf
        self._paused_until = -math.inf
        self._queue: deque[_Waiter] = deque()
        self._waiting = 0
        self._timer: asyncio.Task[None] | None = None
        self._timer_at = math.inf
        self._apply_limits(self._clock.monotonic())

    # -- public API ------------------------------------------------------------------

    @property
    def rpm(self) -> float | None:
        """Requests-per-minute limit in force (configured, learned from headers, or
        lowered to the server's), before any slow-down."""
        return self._rpm

    @property
    def tpm(self) -> float | None:
        """Tokens-per-minute limit in force, before any slow-down."""
        return self._tpm

    @property
    def effective_rpm(self) -> float | None:
        """The requests-per-minute rate actually paced at, after :meth:`slow_down`."""
        return None if self._rpm is None else self._rpm * self._factor

    @property
    def effective_tpm(self) -> float | None:
        """The tokens-per-minute rate actually paced at, after :meth:`slow_down`."""
        return None if self._tpm is None else self._tpm * self._factor

    @property
    def burst_s(self) -> float:
        return self._burst_s

    @property
    def waiting(self) -> int:
        """How many :meth:`acquire` calls are queued."""
        return self._waiting

    async def acquire(self, tokens: int) -> None:
        """Wait until one request costing ``tokens`` may be sent, and charge it.

        Callers are served in the order they called. Raises :class:`RequestTooLarge`
        at once when ``tokens`` exceeds the whole tokens-per-minute limit (the request
        could never be accepted), or later if a lowered limit makes a queued request
        too large.
        """
        if tokens < 0:
            raise ValueError(f"a request cannot cost {tokens} tokens")
        if self._tpm is not None and tokens > self._tpm:
            raise RequestTooLarge(tokens, self._tpm)
        if not self._queue:  # nobody ahead: go now if the budget allows
            now = self._clock.monotonic()
            if self._ready_at(tokens, now) <= now + _EPSILON:
                self._take(tokens, now)
                return
        waiter = _Waiter(tokens, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self._waiting += 1
        if len(self._queue) == 1:
            self._wake()
        try:
            await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def observe(self, headers: Mapping[str, str]) -> None:
        """Correct the budget from a response's ``x-ratelimit-*`` headers (see the class
        docstring for the mapping). Missing or malformed headers are ignored, and so are
        implausible limits (logged once per header name)."""
        now = self._clock.monotonic()
        limit_requests = self._plausible_limit(
            headers, "x-ratelimit-limit-requests", "requests", self._configured_rpm,
            self._server_rpm_peak, self.MIN_SERVER_RPM, self.MAX_SERVER_RPM, self._rpm)
        limit_tokens = self._plausible_limit(
            headers, "x-ratelimit-limit-tokens", "tokens", self._configured_tpm,
            self._server_tpm_peak, self.MIN_SERVER_TPM, self.MAX_SERVER_TPM, self._tpm)
        changed = False
        if limit_requests is not None and limit_requests != self._server_rpm:
            self._server_rpm = limit_requests
            self._server_rpm_peak = max(limit_requests, self._server_rpm_peak or 0.0)
            changed = True
        if limit_tokens is not None and limit_tokens != self._server_tpm:
            self._server_tpm = limit_tokens
            self._server_tpm_peak = max(limit_tokens, self._server_tpm_peak or 0.0)
            changed = True
        if changed:
            self._apply_limits(now)
        # Lowering a level only postpones the head; the armed timer fires no later than
        # needed and re-checks, so no wake-up is needed here.
        remaining = _header_number(headers, "x-ratelimit-remaining-requests")
        if remaining is not None and self._requests is not None:
            self._requests.lower_to(remaining, now)
        remaining = _header_number(headers, "x-ratelimit-remaining-tokens")
        if remaining is not None and self._tokens is not None:
            self._tokens.lower_to(remaining, now)

    def pause(self, seconds: float) -> None:
        """Send nothing until ``seconds`` from now (a ``retry-after``). Extends a current
        pause, never shortens it. Waiters keep their places; refill is frozen until the
        pause ends."""
        if math.isnan(seconds) or math.isinf(seconds):
            raise ValueError(f"cannot pause for {seconds!r} seconds")
        if seconds <= 0:
            return
        now = self._clock.monotonic()
        until = now + seconds
        if until <= self._paused_until:
            return
        self._paused_until = until
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.freeze_until(until, now)
        if self._queue:
            self._wake()

    def slow_down(self) -> None:
        """The server is overloaded or we are over a limit despite pacing: lower the
        effective rate to 70 % (floor: 10 % of the limit). Calls within
        ``SLOW_DOWN_COOLDOWN_S`` of the last effective one are ignored."""
        now = self._clock.monotonic()
        if now - self._last_slow_down < self.SLOW_DOWN_COOLDOWN_S:
            return
        self._last_slow_down = now
        self._last_recovery = now
        factor = max(self.MIN_FACTOR, self._factor * self.SLOW_DOWN_FACTOR)
        if factor != self._factor:
            self._factor = factor
            self._apply_rates(now)

    def record_success(self) -> None:
        """A request succeeded: after a slow-down, raise the effective rate by
        ``RECOVERY_PER_S`` of the limit per second since the last success (at most one
        second's worth per call, so a quiet spell is no evidence), up to 100 %."""
        if self._factor >= 1.0:
            return
        now = self._clock.monotonic()
        elapsed = min(max(0.0, now - self._last_recovery), 1.0)
        self._last_recovery = now
        if elapsed <= 0:
            return
        self._factor = min(1.0, self._factor + self.RECOVERY_PER_S * elapsed)
        self._apply_rates(now)

    def set_limits(self, rpm: float | None, tpm: float | None) -> None:
        """Replace the configured limits (None: unlimited, or whatever the server's
        headers report). A queued request that no longer fits under the new
        tokens-per-minute limit fails with :class:`RequestTooLarge`."""
        _check_limit("rpm", rpm)
        _check_limit("tpm", tpm)
        self._configured_rpm = rpm
        self._configured_tpm = tpm
        self._apply_limits(self._clock.monotonic())

    def __repr__(self) -> str:
        return (
            f"<RateLimiter rpm={self.effective_rpm!r}/{self._rpm!r} "
            f"tpm={self.effective_tpm!r}/{self._tpm!r} waiting={self._waiting}>"
        )

    # -- internals -------------------------------------------------------------------

    def _plausible_limit(
        self,
        headers: Mapping[str, str],
        name: str,
        unit: str,
        configured: float | None,
        peak: float | None,
        floor: float,
        ceiling: float,
        in_force: float | None,
    ) -> float | None:
        """The per-minute limit the header ``name`` states, or None when it states none
        or one not to be believed (then a warning, once per header name)."""
        value = _header_number(headers, name)
        if not value:  # absent, malformed, negative, or 0 ("not stated")
            return None
        if value < floor:
            why = f"below the floor of {_fmt(floor)} {unit}/min"
        elif value > ceiling:
            why = f"above {_fmt(ceiling)} {unit}/min, more than any account has"
        elif configured is not None and value * self.MAX_LOWERING < configured:
            why = (f"more than {self.MAX_LOWERING:g}x below the configured limit of "
                   f"{_fmt(configured)} {unit}/min")
        elif configured is None and peak is not None and value * self.MAX_LOWERING < peak:
            why = (f"more than {self.MAX_LOWERING:g}x below the {_fmt(peak)} {unit}/min the "
                   "server stated earlier")
        else:
            return value
        if name not in self._warned:
            self._warned.add(name)
            kept = ("no limit (none configured or learned yet)" if in_force is None
                    else f"the limit of {_fmt(in_force)} {unit}/min")
            log.warning("ignoring the server's %s: %g (%s); keeping %s. Later values of "
                        "this header that are as implausible are ignored without a warning.",
                        name, value, why, kept)
        return None

    def _ready_at(self, tokens: int, now: float) -> float:
        ready = max(now, self._paused_until)
        if self._requests is not None:
            ready = max(ready, self._requests.ready_at(1, now))
        if self._tokens is not None:
            ready = max(ready, self._tokens.ready_at(tokens, now))
        return ready

    def _take(self, tokens: int, now: float) -> None:
        if self._requests is not None:
            self._requests.take(1, now)
        if self._tokens is not None:
            self._tokens.take(tokens, now)

    def _wake(self) -> None:
        """Admit every waiter at the head of the queue that may go now; arm the timer
        for the moment the next one can. The only place waiters are admitted."""
        queue = self._queue
        now = self._clock.monotonic()
        ready = now
        while queue:
            head = queue[0]
            if head.future.done():  # cancelled, or failed by a lowered limit
                queue.popleft()
                continue
            ready = self._ready_at(head.tokens, now)
            if ready > now + _EPSILON:
                break
            queue.popleft()
            self._take(head.tokens, now)
            self._waiting -= 1
            head.future.set_result(None)
        if not queue:
            self._disarm()
            return
        if self._timer is not None:
            if self._timer_at <= ready + _EPSILON:
                return  # fires no later than needed; it re-checks then
            self._timer.cancel()
        self._timer_at = ready
        self._timer = asyncio.get_running_loop().create_task(self._fire(ready - now))

    async def _fire(self, delay: float) -> None:
        await self._clock.sleep(delay)
        if self._timer is asyncio.current_task():
            self._timer = None
            self._timer_at = math.inf
        self._wake()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiting acquire() was cancelled."""
        future = waiter.future
        if not future.done():  # cancelled by other means than Task.cancel(): be safe
            future.cancel()
        if future.cancelled():  # still queued: leave a tombstone that _wake skips
            self._waiting -= 1
            if self._queue and self._queue[0] is waiter:
                self._wake()
        elif future.exception() is None:
            # Admitted, then cancelled before it resumed: the request will not be sent,
            # so its budget goes back (otherwise a mass cancel at shutdown leaks it).
            now = self._clock.monotonic()
            if self._requests is not None:
                self._requests.give_back(1, now)
            if self._tokens is not None:
                self._tokens.give_back(waiter.tokens, now)
            if self._queue:
                self._wake()
        # else: failed with RequestTooLarge and was already counted out

    def _apply_limits(self, now: float) -> None:
        self._rpm = _lower(self._configured_rpm, self._server_rpm)
        self._tpm = _lower(self._configured_tpm, self._server_tpm)
        self._requests = self._rebuild(self._requests, self._rpm, now)
        self._tokens = self._rebuild(self._tokens, self._tpm, now)
        tpm = self._tpm
        if tpm is not None:
            for waiter in self._queue:
                if waiter.tokens > tpm and not waiter.future.done():
                    waiter.future.set_exception(RequestTooLarge(waiter.tokens, tpm))
                    self._waiting -= 1
        if self._queue:
            self._wake()

    def _apply_rates(self, now: float) -> None:
        self._requests = self._rebuild(self._requests, self._rpm, now)
        self._tokens = self._rebuild(self._tokens, self._tpm, now)
        if self._queue:
            self._wake()

    def _rebuild(self, bucket: _Bucket | None, limit: float | None, now: float) -> _Bucket | None:
        if limit is None:
            return None
        per_minute = limit * self._factor
        if bucket is None:  # a new bucket starts empty, and refills only after a pause
            return _Bucket(per_minute, self._burst_s, max(now, self._paused_until))
        bucket.set_rate(per_minute, self._burst_s, now)
        return bucket


def _check_limit(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number or None, not {value!r}")


def _fmt(limit: float) -> str:
    """A limit for a log line: ``600``, ``1,000,000``, ``0.5`` (configured limits may be
    ints, learned ones are floats)."""
    limit = float(limit)
    if limit.is_integer() and abs(limit) < 1e15:
        return f"{int(limit):,}"
    return f"{limit:g}"


def _lower(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


# -- header and message parsing --------------------------------------------------------

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNIT = r"(?:ns|us|µs|μs|ms|s|m|h)"  # "ms" before "m" and "s": alternation is ordered
_GO_DURATION = re.compile(rf"(?:{_NUMBER}{_UNIT})+")
_GO_PART = re.compile(rf"({_NUMBER})({_UNIT})")
_BARE_NUMBER = re.compile(_NUMBER)
_TRY_AGAIN_GO = re.compile(rf"try again in\s*((?:{_NUMBER}{_UNIT})+)(?![a-z])", re.IGNORECASE)
_TRY_AGAIN_WORDS = re.compile(
    rf"try again in\s*({_NUMBER})\s*(milliseconds?|msecs?|seconds?|secs?|minutes?|mins?)\b",
    re.IGNORECASE,
)
_WORD_UNITS = {"mil": 1e-3, "mse": 1e-3, "sec": 1.0, "min": 60.0}  # by first three letters


def parse_go_duration(text: str | None) -> float | None:
    """Seconds in a Go ``time.Duration`` string, as OpenAI writes ``x-ratelimit-reset-*``:
    ``"1s"``, ``"6m0s"``, ``"12ms"``, ``"9.816s"``, ``"1m30.5s"``, ``"1h2m3s"``.

    Units ``h m s ms us µs ns``; a sign is allowed (Go allows negative durations).
    Lenient where that is harmless: surrounding blanks are ignored and a bare number
    (``"0"``, ``"1.5"``) is taken as seconds, as some compatible servers send. Anything
    else (empty, ``"soon"``, ``"5x"``, ``"1s2"``) gives None, never an exception.
    """
    if not isinstance(text, str):
        return None
    body = text.strip()
    sign = 1.0
    if body[:1] in ("+", "-"):
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if _BARE_NUMBER.fullmatch(body):
        seconds = float(body)
    elif _GO_DURATION.fullmatch(body):
        seconds = sum(float(n) * _UNITS[u] for n, u in _GO_PART.findall(body))
    else:
        return None
    return sign * seconds if math.isfinite(seconds) else None


def parse_retry_after(
    headers: Mapping[str, str],
    message: str | None = None,
    *,
    now: float | None = None,
) -> float | None:
    """How long the server asked us to wait, in seconds, or None if it didn't say.

    In order of precedence: ``retry-after-ms`` (milliseconds, OpenAI's non-standard
    header, more precise), ``retry-after`` (seconds, or an HTTP date, taken relative to
    ``now``, a Unix time defaulting to ``time.time()``), and finally a phrase in the
    error message such as "Please try again in 9.816s" / "in 120ms" / "in 1m30s" /
    "in 20 seconds".

    A malformed, negative, non-finite (``nan``, ``inf``, ``1e999``) or absurd value
    (longer than ``MAX_RETRY_AFTER_S``, a day) falls through to the next source, so the
    result is always None or a finite number of seconds in ``[0, MAX_RETRY_AFTER_S]``
    that a caller may sleep on; never an exception, whatever the server sent.
    """
    value = header(headers, "retry-after-ms")
    if value is not None:
        ms = _number(value)
        if ms is not None and _plausible_wait(ms / 1000.0):
            return ms / 1000.0
    value = header(headers, "retry-after")
    if value is not None:
        seconds = _number(value)
        if seconds is None:
            seconds = _http_date_delay(value, now)
        if seconds is not None and _plausible_wait(seconds):
            return seconds
    if message:
        match = _TRY_AGAIN_GO.search(message)
        if match:
            seconds = parse_go_duration(match.group(1))
            if seconds is not None and _plausible_wait(seconds):
                return seconds
        match = _TRY_AGAIN_WORDS.search(message)
        if match:
            seconds = float(match.group(1)) * _WORD_UNITS[match.group(2)[:3].lower()]
            if _plausible_wait(seconds):
                return seconds
    return None


def _plausible_wait(seconds: float) -> bool:
    return math.isfinite(seconds) and 0.0 <= seconds <= MAX_RETRY_AFTER_S


def _http_date_delay(value: str, now: float | None) -> float | None:
    try:
        when = parsedate_to_datetime(value.strip())
        if when.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses naive
            when = when.replace(tzinfo=timezone.utc)
        stamp = when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    current = time.time() if now is None else now
    return max(0.0, stamp - current)


# Header mappings that match names case-insensitively themselves (the transports'
# response headers register theirs): a header they lack is not looked for again key by
# key, which cost more than the rest of reading the rate-limit headers of a reply.
CASE_INSENSITIVE: set[type] = set()


def header(headers: Mapping[str, str], name: str) -> str | None:
    """``headers[name]`` for a lower-case ``name``, whatever the mapping's key case:
    httpx and aiohttp headers match case-insensitively themselves, a plain dict may
    not."""
    value = headers.get(name)
    if value is None and type(headers) not in CASE_INSENSITIVE:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


def _number(value: object) -> float | None:
    """A finite, non-negative number from a header value, else None."""
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    value = header(headers, name)
    return None if value is None else _number(value)
