"""Limits that every run on one account shares: RPM/TPM and the budget, through Redis.

The runner builds its limiter and budget through :func:`make_limiter` and
:func:`make_budget`: without ``limits.redis_url`` (or ``BATCHGPT_REDIS_URL``) they are the
local :class:`~batchgpt.limiter.RateLimiter` and :class:`~batchgpt.budget.Budget`, as
before; with it, :func:`connect` reaches Redis before anything is sent (unreachable: a
ConfigError naming the URL, its password redacted, exit 1) and they are
:class:`~batchgpt.limits.shared.SharedRateLimiter` and, with ``limits.shared_budget``,
:class:`~batchgpt.limits.budget.SharedBudget`.

**The key in Redis** names the account and model, never the key itself: a SHA-256 of the
base URL, the API key, the organization, the project and the model. Two runs with the same
five share one set of buckets; anything else keeps them apart.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from batchgpt.budget import Budget
from batchgpt.clock import Clock
from batchgpt.config import JobConfig
from batchgpt.errors import ConfigError
from batchgpt.limiter import RateLimiter

__all__ = ["REDIS_URL_ENV", "Limiter", "SharedLimits", "account_hash", "connect", "make_budget",
           "make_limiter", "redact_url"]

REDIS_URL_ENV = "BATCHGPT_REDIS_URL"
SOCKET_TIMEOUT_S = 2.0  # a Redis that stops answering costs a request at most this long
PREFIX = "batchgpt"


def redact_url(url: str) -> str:
    """``url`` with any password (and a user name that may be one) replaced, for messages:
    ``redis://:s3cret@host:6379/0`` → ``redis://:[REDACTED]@host:6379/0``."""
    base, mark, query = url.partition("?")  # redis-py also reads ?password= (?username=)
    url = base + mark + re.sub(r"(?i)((?:^|&)(?:password|username)=)[^&#]*", r"\1[REDACTED]",
                               query)
    try:
        parts = urlsplit(url)
        if parts.password is None and parts.username is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        user = "" if parts.password is None else (parts.username or "")
        auth = f"{user}:[REDACTED]" if parts.password is not None else "[REDACTED]"
        return urlunsplit(parts._replace(netloc=f"{auth}@{host}{port}"))
    except ValueError:
        return "the Redis URL (unreadable, so not shown)"


def account_hash(base_url: str, api_key: str, organization: str | None, project: str | None,
                 model: str) -> str:
    """Who shares a limit: the same server, key, organization, project and model. A hash,
    so Redis never holds the key (or anything from which to read it back)."""
    text = "\0".join([base_url.rstrip("/"), api_key, organization or "", project or "", model])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass
class SharedLimits:
    """A run's connection to Redis and the keys it uses; :meth:`aclose` when done."""

    url: str  # redacted, for messages
    raw_url: str
    account: str
    job: JobConfig
    _closers: list[object] = field(default_factory=list)

    def __post_init__(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.redis = Redis.from_url(self.raw_url, socket_timeout=SOCKET_TIMEOUT_S,
                                    socket_connect_timeout=SOCKET_TIMEOUT_S,
                                    retry=Retry(NoBackoff(), 0))

    async def aclose(self) -> None:
        from batchgpt.limits.budget import SharedBudget
        from batchgpt.limits.shared import SharedRateLimiter

        for thing in self._closers:
            if isinstance(thing, SharedRateLimiter):
                await thing.aclose()
            elif isinstance(thing, SharedBudget):
                thing.close()
        await self.redis.aclose()


async def connect(job: JobConfig, credentials: tuple[str | None, str] | None
                  ) -> SharedLimits | None:
    """Reach the job's Redis, if it names one (None: the local limiter, as before).
    ``credentials``: (base URL, key) as the run resolved them; None with ``--sandbox``
    (the built-in simulator is another server each run: such runs share by job only).
    Raises ConfigError, naming the URL, when Redis cannot be reached: before anything is
    sent."""
    url = job.limits.redis_url or os.environ.get(REDIS_URL_ENV) or None
    if url is None:
        if job.limits.shared_budget:
            raise ConfigError(
                f"{job.where('limits', 'shared_budget')}: limits.shared_budget needs a Redis: "
                f"set limits.redis_url or {REDIS_URL_ENV}. Nothing was sent.")
        return None
    from redis.exceptions import RedisError

    shown = redact_url(url)
    if credentials is None:
        base_url, key = f"sandbox:{job.job_name}", ""
    else:
        from batchgpt.credentials import OPENAI_BASE_URL

        base_url, key = credentials[0] or OPENAI_BASE_URL, credentials[1]
    account = account_hash(base_url, key, job.api.organization, job.api.project,
                           job.model or "")
    try:
        shared = SharedLimits(shown, url, account, job)
    except ValueError as exc:  # not a redis://, rediss:// or unix:// URL
        raise ConfigError(f"cannot use Redis at {shown}: {exc}. Nothing was sent.") from None
    try:
        await shared.redis.ping()
    except (RedisError, OSError) as exc:
        await shared.redis.aclose()
        raise ConfigError(
            f"cannot reach Redis at {shown} ({type(exc).__name__}: {_first_line(exc)}); "
            "the limits are shared through it, so nothing was sent. Start Redis, or remove "
            f"limits.redis_url (and {REDIS_URL_ENV}) to pace this run alone") from None
    return shared


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no answer"


class Limiter(Protocol):
    """What the runner asks of a limiter: :class:`~batchgpt.limiter.RateLimiter`'s
    interface, which :class:`~batchgpt.limits.shared.SharedRateLimiter` implements too."""

    @property
    def rpm(self) -> float | None: ...
    @property
    def tpm(self) -> float | None: ...
    @property
    def effective_rpm(self) -> float | None: ...
    @property
    def effective_tpm(self) -> float | None: ...
    @property
    def burst_s(self) -> float: ...
    @property
    def waiting(self) -> int: ...
    async def acquire(self, tokens: int) -> None: ...
    def observe(self, headers: Mapping[str, str]) -> None: ...
    def pause(self, seconds: float) -> None: ...
    def slow_down(self) -> None: ...
    def record_success(self) -> None: ...
    def set_limits(self, rpm: float | None, tpm: float | None) -> None: ...


def make_limiter(job: JobConfig, clock: Clock, shared: SharedLimits | None = None
                 ) -> Limiter:
    """The run's limiter: shared through Redis when the run connected to one."""
    if shared is None:
        return RateLimiter(job.limits.rpm, job.limits.tpm, clock=clock)
    from batchgpt.limits.shared import SharedRateLimiter

    limiter = SharedRateLimiter(shared.redis, f"{PREFIX}:limit:{{{shared.account}}}",
                                job.limits.rpm, job.limits.tpm, clock=clock, url=shared.url)
    shared._closers.append(limiter)
    return limiter


def make_budget(job: JobConfig, spent_before: float, shared: SharedLimits | None = None
                ) -> Budget:
    """The run's budget: shared by every run of the job with ``limits.shared_budget``."""
    cap = job.limits.max_cost_usd
    if shared is None or not job.limits.shared_budget or cap is None:
        return Budget(cap, spent_before)
    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from batchgpt.limits.budget import SharedBudget

    job_key = hashlib.sha256(f"{shared.account}\0{job.job_name}".encode(
        "utf-8", "surrogatepass")).hexdigest()[:32]
    client = Redis.from_url(shared.raw_url, socket_timeout=SOCKET_TIMEOUT_S,
                            socket_connect_timeout=SOCKET_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
    budget = SharedBudget(cap, spent_before, client, f"{PREFIX}:budget:{{{job_key}}}",
                          job.output.name, ttl_s=int(2 * job.timeout_s + 60), url=shared.url)
    shared._closers.append(budget)
    return budget

