"""``limits.shared_budget``: one ``limits.max_cost_usd`` for every run of a job, through Redis.

A sharded job (``--shard K/N`` on N machines) is one job with one cap, but each part keeps
its own index, so each part's :class:`~batchgpt.budget.Budget` only knows its own spend.
:class:`SharedBudget` keeps :class:`Budget`'s algorithm (admit one row at a time against
what is left; WAIT while this run has rows in flight; REFUSE when nothing is) with
"what is left" counted over every run of the job:

    left = cap − Σ parts' spend − Σ live runs' reservations

Redis holds, per job, a hash of each part's spend (what its index says it was charged,
plus what its current run paid: set, not added, by every operation, so a retried or
repeated call cannot count twice), and one key per run holding that run's reservations,
which expires ``ttl`` seconds after the run's last operation: the reservations of a run
that died come back by themselves. One Lua script does the sum and the admission
atomically.

The calls are synchronous (``Budget.admit`` is, and the runner calls it between awaits),
one Redis round trip per admission and per settled row: about 0.1 ms on loopback.

A run with nothing in flight that does not fit while *other* runs hold reservations is
refused (exit 4) rather than made to wait: the runner wakes a waiting dispatcher only when
one of its own rows settles. A rerun continues.

**Redis lost mid-run**: the run goes on alone, against its share of what was left when
Redis last answered (that amount / the runs then holding reservations, itself included),
says so once, and tries Redis again after 1 s, then 2, 4, … up to a minute (each try is
a synchronous call: a Redis that times out would block the event loop for its timeout).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from decimal import Decimal

from redis import Redis
from redis.exceptions import RedisError

from batchgpt.budget import Budget, Reservation, Verdict, _dec

__all__ = ["BUDGET_LUA", "SharedBudget"]

log = logging.getLogger("batchgpt")

RECONNECT_S = 1.0  # while Redis is lost, the first wait before trying it again; doubling
MAX_RECONNECT_S = 60.0  # up to this (a Redis that times out blocks the loop for its timeout)
# Redis sums in doubles; the local accounting is Decimal. A hair of tolerance keeps five
# $0.001 rows inside a $0.005 cap, as the local budget does.
_TOLERANCE = 1e-9

#: KEYS = (spend per part (hash), runs (set)); ARGV = (op: admit | put, run id, part,
#: the part's spend, this run's reservations, worst case, cap, ttl, prefix of run keys).
#: Returns {admitted (0/1), the job's spend + reservations, runs holding some, the spend}.
BUDGET_LUA = """
local run, prefix = ARGV[2], ARGV[9]
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
redis.call('SADD', KEYS[2], run)
local mine = tonumber(ARGV[5])
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
local spent = total
local holders = 1
for _, other in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if other ~= run then
    local r = redis.call('GET', prefix .. other)
    if r then
      total = total + tonumber(r)
      holders = holders + 1
    else
      redis.call('SREM', KEYS[2], other)
    end
  end
end
local admitted = 1
if ARGV[1] == 'admit' then
  local worst = tonumber(ARGV[6])
  if total + mine + worst > tonumber(ARGV[7]) + @TOLERANCE@ then
    admitted = 0
  else
    mine = mine + worst
  end
end
redis.call('SET', prefix .. run, string.format('%.17g', mine), 'EX', tonumber(ARGV[8]))
return {admitted, string.format('%.17g', total + mine), holders, string.format('%.17g', spent)}
""".replace("@TOLERANCE@", repr(_TOLERANCE))


class SharedBudget(Budget):
    """A :class:`Budget` whose cap holds across every run of the job (see the module)."""

    def __init__(self, cap: float, spent_before: float, redis: Redis, prefix: str, part: str,
                 *, ttl_s: int, url: str) -> None:
        super().__init__(cap, spent_before)
        self._redis = redis
        self._script = redis.register_script(BUDGET_LUA)
        self._keys = [prefix + ":spent", prefix + ":runs"]
        self._run_id = uuid.uuid4().hex
        self._run_prefix = prefix + ":run:"
        self._part = part
        self._ttl = max(1, int(ttl_s))
        self._url = url
        self._total = float(_dec(spent_before))  # the job's spend + reservations, last seen
        self._spent_all = float(_dec(spent_before))  # the job's spend (all parts), last seen
        self._holders = 1
        self._fallback_cap: Decimal | None = None  # while Redis is lost
        self._retry_at = -math.inf
        self._backoff = RECONNECT_S
        self.lost = 0

    @property
    def spent(self) -> float:
        """What the job was charged, every part's runs included, as Redis last said (this
        run's own figure while Redis is lost)."""
        if self._fallback_cap is not None:
            return super().spent
        return max(self._spent_all, super().spent)

    @property
    def remaining(self) -> float | None:
        """What every run of the job may still reserve, as Redis last said."""
        assert self.cap is not None
        if self._fallback_cap is not None:
            return float(self._fallback_cap - self._before - self._run - self._reserved)
        return float(self.cap) - self._total

    def admit(self, worst: float) -> tuple[Verdict, Reservation | None]:
        amount = _dec(worst)
        if self._fallback_cap is None or time.monotonic() >= self._retry_at:
            reply = self._call("admit", amount)
            if reply is not None:
                if not reply:
                    return (Verdict.WAIT if self.outstanding else Verdict.REFUSE), None
                self._reserved += amount
                self.outstanding += 1
                return Verdict.ADMIT, Reservation(amount)
        assert self._fallback_cap is not None
        if self._before + self._run + self._reserved + amount > self._fallback_cap:
            return (Verdict.WAIT if self.outstanding else Verdict.REFUSE), None
        self._reserved += amount
        self.outstanding += 1
        return Verdict.ADMIT, Reservation(amount)

    def settle(self, reservation: Reservation, cost: float | None) -> None:
        super().settle(reservation, cost)
        self._put()

    def release(self, reservation: Reservation) -> None:
        super().release(reservation)
        self._put()

    def abandon(self, reservation: Reservation) -> None:
        super().abandon(reservation)
        self._put()

    def close(self) -> None:
        """The run is over: its reservations (none left) go at once, not at the TTL; the
        connection is closed."""
        try:
            if self._fallback_cap is None:
                self._redis.delete(self._run_prefix + self._run_id)
                self._redis.srem(self._keys[1], self._run_id)
        except RedisError:
            pass
        finally:
            self._redis.close()

    # -- internals ---------------------------------------------------------------------------
    def _put(self) -> None:
        if self._fallback_cap is None or time.monotonic() >= self._retry_at:
            self._call("put", Decimal(0))

    def _call(self, op: str, worst: Decimal) -> bool | None:
        """One script call: whether it admitted (``put``: True), None if Redis is lost."""
        try:
            admitted, total, holders, spent = self._script(keys=self._keys, args=[
                op, self._run_id, self._part, str(self._before + self._run),
                str(self._reserved), str(worst), str(self.cap), self._ttl, self._run_prefix])
        except RedisError as exc:
            self._lose(exc)
            return None
        self._total = float(total)
        self._spent_all = float(spent)
        self._holders = max(1, int(holders))
        self._backoff = RECONNECT_S
        if self._fallback_cap is not None:
            self._fallback_cap = None
            log.warning("Redis at %s answers again: limits.max_cost_usd is shared again",
                        self._url)
        return bool(int(admitted))

    def _lose(self, exc: RedisError) -> None:
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(MAX_RECONNECT_S, self._backoff * 2)
        if self._fallback_cap is not None:
            return
        self.lost += 1
        assert self.cap is not None
        left = max(Decimal(0), self.cap - _dec(self._total)) / self._holders
        mine = self._before + self._run + self._reserved
        self._fallback_cap = mine + left
        log.warning("lost Redis at %s (%s): this run goes on against its share of what was "
                    "left of limits.max_cost_usd (1/%d of $%.4f) until it answers again",
                    self._url, type(exc).__name__, self._holders, float(left * self._holders))
