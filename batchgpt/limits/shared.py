"""RPM and TPM shared by every run on one account, through Redis.

Two jobs each told 1,200 RPM, against an account that allows 1,200 RPM, drew 3.5 % 429s
and used 92 % of the limit: each paced as if alone. :class:`SharedRateLimiter` keeps the
pacing of :class:`~batchgpt.limiter.RateLimiter` (the same interface, the same buckets,
the same no-burst start, FCFS within a process, oversize handling) but keeps the buckets
in Redis, where every run naming the same Redis and the same account and model draws from
them, atomically, in one Lua script per request.

**The buckets in Redis are GCRA**: a bucket is one number, its *theoretical arrival
time* ``tat``: the level at time ``t`` is ``capacity − (tat − t) × rate`` (full once
``tat ≤ t``). The local limiter's rules carry over one for one:

* a request of cost ``c`` may go once the level reaches ``need = min(c, capacity)``,
  i.e. at ``tat − burst_s + need / rate`` (so a cost above the capacity waits for a full
  bucket and then drives it into debt);
* taking it sets ``tat = max(tat, now) + c / rate``;
* a bucket first seen starts empty: ``tat = now + burst_s`` (no start-up burst, for the
  first run and for a run after the key expired);
* a pause until ``u`` freezes refill: ``tat`` moves by the pause, and nothing goes before
  ``u`` (one run's ``retry-after`` pauses every run);
* a server's ``x-ratelimit-remaining-*`` lowers the level: ``tat ≥ now + burst_s −
  remaining / rate``.
* a request that must wait queues, across runs, by when it first waited: no other run
  takes from the buckets before the head of that queue has gone (else a run of small
  requests, taking each bit of refill, starves a run whose requests need a full bucket),
  unless the head is 50 ms late for its time (dead, cancelled, slow): then the others go
  on, so a dead run stalls nobody into a burst.

Each caller passes its own rates (its configured or learned limit times its own slow-down
factor), so a run that slowed down after 429s takes a larger slice of time per request
and the aggregate slows down with it. Time is Redis's own (``TIME``), so machines whose
clocks disagree still share one timeline; tests pass a :class:`~batchgpt.clock.FakeClock`'s
time instead.

**Nothing is reserved per run**, so a run that dies holds nothing: the others simply find
the buckets refilled. The keys expire after a minute of silence (longer while a debt is
being paid back). A set of the runs seen in the last 30 s (a sorted set scored by time)
tells each run how many share the limit: the share it falls back to when Redis is lost.

**Redis lost mid-run**: the run goes on with a local :class:`RateLimiter` at its share of
the limit (1 / the runs seen), says so once, tries Redis again every second at most, and
says so once when it is back. A request's Redis round trip is bounded by the client's
socket timeout; nothing waits on Redis forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from batchgpt.clock import Clock, SystemClock
from batchgpt.errors import RequestTooLarge
from batchgpt.limiter import RateLimiter, _header_number

__all__ = ["ACQUIRE_LUA", "SharedRateLimiter"]

log = logging.getLogger("batchgpt")

KEY_TTL_S = 60  # a limiter key nobody used for this long is forgotten (it restarts empty)
PRESENCE_S = 30  # a run not heard from for this long no longer counts in the share
RECONNECT_S = 1.0  # while Redis is lost, try it again at most this often
_EPSILON = 1e-6
# Order across runs: a request that must wait queues, and the other runs take nothing until
# the head of the queue has gone (else a run of small requests starves one of large ones),
# or is this late for its time (dead, cancelled, slow: the others go on, without a stall
# that would end in a burst). A place its run does not come back for lapses after GRACE.
CLAIM_HOLD_S = 0.05
CLAIM_GRACE_S = 1.0
CLAIM_STEP_S = 0.01  # a run behind a head whose time has come asks again after this

# Shared prologue: the time, and the state of both buckets.
_PROLOGUE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local rrate = tonumber(ARGV[2])
local trate = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 'rt', 'tt', 'pu')
local pu = tonumber(s[3]) or 0
local start = math.max(now, pu)
local rt = tonumber(s[1])
local tt = tonumber(s[2])
if rrate > 0 and not rt then rt = start + burst end
if trate > 0 and not tt then tt = start + burst end
local function save()
  local far = math.max(rt or now, tt or now, pu) - now
  if rt then redis.call('HSET', KEYS[1], 'rt', string.format('%.17g', rt)) end
  if tt then redis.call('HSET', KEYS[1], 'tt', string.format('%.17g', tt)) end
  redis.call('HSET', KEYS[1], 'pu', string.format('%.17g', pu))
  redis.call('PEXPIRE', KEYS[1], math.ceil((far + @TTL@) * 1000))
end
"""

#: One request: KEYS = (buckets, runs, queue order, queue deadlines); ARGV = (now or "",
#: requests/s or 0, tokens/s or 0, burst_s, tokens, run id). Returns {granted (0/1), wait
#: in seconds as a string, runs}.
ACQUIRE_LUA = _PROLOGUE + """
local cost = tonumber(ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - @PRESENCE@)
redis.call('EXPIRE', KEYS[2], @TTL@)
local runs = redis.call('ZCARD', KEYS[2])
local ready = start
if rrate > 0 then
  ready = math.max(ready, rt - burst + math.min(1, rrate * burst) / rrate)
end
if trate > 0 then
  ready = math.max(ready, tt - burst + math.min(cost, trate * burst) / trate)
end
-- Order across runs: a run whose request must wait queues (KEYS[3], by when it first
-- waited; KEYS[4], until when it counts as waiting), and no other run takes from the
-- buckets before the head of the queue has gone.
local me = ARGV[6]
local head, head_at = nil, now
while true do
  local first = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #first == 0 then break end
  local untl = tonumber(redis.call('HGET', KEYS[4], first[1])) or 0
  if untl > now then
    head, head_at = first[1], untl - @CLAIM_GRACE@
    break
  end
  redis.call('ZREM', KEYS[3], first[1])
  redis.call('HDEL', KEYS[4], first[1])
end
local held = head and head ~= me and now < head_at + @CLAIM_HOLD@
if held or ready > now + @EPS@ then
  local at = ready
  if held then at = math.max(ready, head_at) end
  redis.call('ZADD', KEYS[3], 'NX', now, me)
  redis.call('HSET', KEYS[4], me, string.format('%.17g', at + @CLAIM_GRACE@))
  redis.call('EXPIRE', KEYS[3], @TTL@)
  redis.call('EXPIRE', KEYS[4], @TTL@)
  save()
  return {0, string.format('%.17g', math.max(at - now, @CLAIM_STEP@)), runs}
end
if head then
  redis.call('ZREM', KEYS[3], me)
  redis.call('HDEL', KEYS[4], me)
end
if rrate > 0 then rt = math.max(rt, now) + 1 / rrate end
if trate > 0 then tt = math.max(tt, now) + cost / trate end
save()
return {1, '0', runs}
"""

#: A pause: ARGV = (now, requests/s, tokens/s, burst_s, seconds). Extends, never shortens.
PAUSE_LUA = _PROLOGUE + """
local untl = now + tonumber(ARGV[5])
if untl > start then
  local shift = untl - start
  if rt then rt = math.max(rt, start) + shift end
  if tt then tt = math.max(tt, start) + shift end
  pu = untl
end
save()
return 1
"""

#: The server's remaining budget: ARGV = (now, requests/s, tokens/s, burst_s, remaining
#: requests or "", remaining tokens or ""). Lowers a level, never raises it.
REMAINING_LUA = _PROLOGUE + """
local rr = tonumber(ARGV[5])
local tr = tonumber(ARGV[6])
if rr and rt and rrate > 0 then
  rt = math.max(rt, start + burst - math.min(rr, rrate * burst) / rrate)
end
if tr and tt and trate > 0 then
  tt = math.max(tt, start + burst - math.min(tr, trate * burst) / trate)
end
save()
return 1
"""



def _lua(text: str) -> str:
    return (text.replace("@TTL@", str(KEY_TTL_S)).replace("@PRESENCE@", str(PRESENCE_S))
            .replace("@EPS@", repr(_EPSILON)).replace("@CLAIM_STEP@", repr(CLAIM_STEP_S))
            .replace("@CLAIM_GRACE@", repr(CLAIM_GRACE_S))
            .replace("@CLAIM_HOLD@", repr(CLAIM_HOLD_S)))


ACQUIRE_LUA, PAUSE_LUA, REMAINING_LUA = (_lua(ACQUIRE_LUA), _lua(PAUSE_LUA),
                                         _lua(REMAINING_LUA))


class SharedRateLimiter:
    """:class:`~batchgpt.limiter.RateLimiter`'s interface over buckets kept in Redis.

    ::

        limiter = SharedRateLimiter(redis, "batchgpt:limit:{3f2a…}", rpm=500, tpm=200_000)
        await limiter.acquire(tokens.request_cost(body))
        limiter.observe(response.headers)
        ...
        await limiter.aclose()   # waits for the pushes observe/pause started

    A local :class:`RateLimiter` (never waited on while Redis answers) does what needs no
    sharing: it reads the headers (learned and lowered limits, the plausibility checks),
    keeps the slow-down factor, and so gives the rates this run asks Redis to pace it at.
    A second one, at this run's share of the limit, paces while Redis is lost.

    Waiters are served first come, first served through an :class:`asyncio.Lock` (whose
    waiters are woken in order): only the head asks Redis, and sleeps exactly as long as
    the script says before asking again. A waiter cancelled while its Redis call is on the
    wire may have been granted a request it will not send: one request's worth, at most,
    per cancelled waiter (a shutdown), which the buckets pay back within a second.
    """

    def __init__(self, redis: Redis, key: str, rpm: float | None, tpm: float | None, *,
                 burst_s: float = 1.0, clock: Clock | None = None, url: str = "redis") -> None:
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._local = RateLimiter(rpm, tpm, burst_s=burst_s, clock=self._clock)
        self._redis = redis
        self._key = key
        self._runs_key = key + ":runs"
        self._run_id = uuid.uuid4().hex
        self._url = url
        # Redis time unless the clock is a test's: then every run passes the same fake time.
        self._server_time = isinstance(self._clock, SystemClock)
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._pause = redis.register_script(PAUSE_LUA)
        self._remaining = redis.register_script(REMAINING_LUA)
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._runs = 1  # runs sharing the limit, as last seen
        self._fallback: RateLimiter | None = None  # pacing while Redis is lost
        self._probe: asyncio.Task[None] | None = None  # pings a lost Redis
        self._pushes: set[asyncio.Task[Any]] = set()
        self.lost = 0  # times Redis was lost (for tests and the log)

    # -- what the runner reads --------------------------------------------------------------
    @property
    def rpm(self) -> float | None:
        return self._local.rpm

    @property
    def tpm(self) -> float | None:
        return self._local.tpm

    @property
    def effective_rpm(self) -> float | None:
        return self._local.effective_rpm

    @property
    def effective_tpm(self) -> float | None:
        return self._local.effective_tpm

    @property
    def burst_s(self) -> float:
        return self._local.burst_s

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def runs(self) -> int:
        """How many runs shared the limit when Redis last answered (this one included)."""
        return self._runs

    @property
    def on_redis(self) -> bool:
        """False while Redis is lost and the run paces on its local share."""
        return self._fallback is None

    # -- the interface ----------------------------------------------------------------------
    async def acquire(self, tokens: int) -> None:
        """Wait until one request costing ``tokens`` may be sent, and charge it to the
        shared buckets. :class:`RequestTooLarge` at once for a request above the whole
        tokens-per-minute limit, as the local limiter does."""
        if tokens < 0:
            raise ValueError(f"a request cannot cost {tokens} tokens")
        tpm = self._local.tpm
        if tpm is not None and tokens > tpm:
            raise RequestTooLarge(tokens, tpm)
        self._waiting += 1
        try:
            async with self._lock:
                while True:
                    fallback = self._fallback
                    if fallback is not None:
                        await fallback.acquire(tokens)
                        return
                    wait = await self.ask(tokens)
                    if wait is None:
                        continue  # Redis just got lost: the fallback paces this one
                    if wait <= 0:
                        return
                    await self._clock.sleep(wait)
        finally:
            self._waiting -= 1

    def observe(self, headers: Mapping[str, str]) -> None:
        """Read a response's ``x-ratelimit-*`` headers: limits locally (as the local
        limiter does), and the server's remaining budget into the shared buckets."""
        self._local.observe(headers)
        if self._fallback is not None:
            self._fallback.observe(headers)
            return
        remaining = [_header_number(headers, f"x-ratelimit-remaining-{what}")
                     for what in ("requests", "tokens")]
        if remaining[0] is None and remaining[1] is None:
            return
        self._push(self._remaining, *("" if r is None else repr(r) for r in remaining))

    def pause(self, seconds: float) -> None:
        """Send nothing, in any run sharing the limit, until ``seconds`` from now."""
        self._local.pause(seconds)
        if seconds <= 0:
            return
        if self._fallback is not None:
            self._fallback.pause(seconds)
        else:
            self._push(self._pause, repr(float(seconds)))

    def slow_down(self) -> None:
        self._local.slow_down()
        if self._fallback is not None:
            self._fallback.slow_down()

    def record_success(self) -> None:
        self._local.record_success()
        if self._fallback is not None:
            self._fallback.record_success()

    def set_limits(self, rpm: float | None, tpm: float | None) -> None:
        self._local.set_limits(rpm, tpm)

    async def aclose(self) -> None:
        """Let the pushes in progress finish (each bounded by the socket timeout); stop
        pinging a lost Redis."""
        if self._pushes:
            await asyncio.gather(*self._pushes, return_exceptions=True)
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None

    def __repr__(self) -> str:
        where = "redis" if self._fallback is None else f"local 1/{self._runs}"
        return (f"<SharedRateLimiter {where} rpm={self.effective_rpm!r} "
                f"tpm={self.effective_tpm!r} waiting={self._waiting}>")

    # -- internals ---------------------------------------------------------------------------
    def _rates(self) -> list[str]:
        rpm, tpm = self._local.effective_rpm, self._local.effective_tpm
        return [repr(0.0 if rpm is None else rpm / 60.0), repr(0.0 if tpm is None else tpm / 60.0),
                repr(self._local.burst_s)]

    def _now(self) -> str:
        return "" if self._server_time else repr(self._clock.monotonic())

    async def ask(self, tokens: int) -> float | None:
        """Ask Redis once for one request of ``tokens``, without queueing: 0.0 when it
        was granted (and charged), else the seconds until it could be; None when Redis
        is lost (the local fallback is set up). :meth:`acquire` is this in a FCFS loop;
        tests drive it directly to step several runs through fake time."""
        try:
            granted, wait, runs = await self._acquire(
                keys=[self._key, self._runs_key, self._key + ":q", self._key + ":qd"],
                args=[self._now(), *self._rates(), tokens, self._run_id])
        except RedisError as exc:
            self._lose(exc)
            return None
        self._runs = max(1, int(runs))
        self._back()
        return 0.0 if int(granted) else max(0.0, float(wait))

    def _back(self) -> None:
        if self._fallback is not None:
            self._fallback = None
            log.warning("Redis at %s answers again: the limits are shared again", self._url)

    async def _reconnect(self) -> None:
        """While Redis is lost, ping it every RECONNECT_S, off the queue's path: a Redis
        that times out must not hold the head of the queue for its timeout each time."""
        while self._fallback is not None:
            await self._clock.sleep(RECONNECT_S)
            try:
                await self._redis.ping()
            except RedisError:
                continue
            self._back()
        self._probe = None

    def _lose(self, exc: RedisError) -> None:
        if self._fallback is not None:
            return
        self.lost += 1
        share = 1.0 / self._runs
        rpm, tpm = self._local.rpm, self._local.tpm
        self._fallback = RateLimiter(None if rpm is None else rpm * share,
                                     None if tpm is None else tpm * share,
                                     burst_s=self._local.burst_s, clock=self._clock)
        log.warning("lost Redis at %s (%s): pacing this run alone at 1/%d of the limit "
                    "(%s) until it answers again; trying again every %gs", self._url,
                    type(exc).__name__, self._runs, _describe(rpm, tpm, share), RECONNECT_S)
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._reconnect())

    def _push(self, script: Any, *args: str) -> None:
        """Run a script in the background (observe and pause are not async)."""

        async def push() -> None:
            try:
                await script(keys=[self._key], args=[self._now(), *self._rates(), *args])
            except RedisError as exc:
                self._lose(exc)

        task = asyncio.get_running_loop().create_task(push())
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)


def _describe(rpm: float | None, tpm: float | None, share: float) -> str:
    parts = []
    if rpm is not None:
        parts.append(f"{rpm * share:,.0f} requests/min")
    if tpm is not None:
        parts.append(f"{tpm * share:,.0f} tokens/min")
    return ", ".join(parts) or "no limit known"

