"""The circuit breaker: a run whose first attempts all fail the same way stops at once.

A wrong port, a typo in a host name, ``http`` for ``https``, a proxy whose upstream is
down, or a parameter the server refuses on every row used to cost a full run: every row
went through all its retries (minutes of backoff each) and the run ended with exit 3 or 6
and a failures file as long as the input. What was wrong was one thing, known after the
first few attempts.

:class:`CircuitBreaker` is fed the outcome of every attempt of a run. It **trips** when
the first ``threshold`` attempts it counts all failed with the same signature (the same
kind of failure, HTTP status and error code; for connection failures, the same cause:
refused, DNS, TLS) and nothing has shown the endpoint working yet. It **disarms for
good** at the first sign that it works: a reply, or an answer about the row rather than
the endpoint (see :func:`assess`). Until it has decided, it holds attempts back so that
no more than ``threshold`` are ever unresolved: a dead endpoint sees at most
``threshold`` requests, however large the concurrency.

Not counted either way: timeouts (a slow model is not a broken endpoint), 408 and 409,
500 (the server's own error, which usually passes: retries, and exit 6 when they run
out), 503 "slow down" (load, which the limiter answers), 504 (a gateway's timeout), and
the answers that stop a run on their own (401, 403, quota, unknown model or URL), which
have their own messages. A 502 or another 5xx on every first attempt is a proxy or
gateway that can't reach its upstream: counted.

The breaker is for failures of the *job* or the *server*, never for rows that are each
bad on their own: a few bad rows at the start of the input must not stop a run whose
other rows work (nor every ``--retry-failed`` rerun, which sends them first again). So a
4xx whose error names the request parameter at fault (OpenAI's ``param``:
``"n"``, ``"messages.[0].role"``, ``"response_format.json_schema"``) is counted only when
that parameter is one the job sets for every row (:func:`job_wide_params`: the job's
``params``, ``model`` when the job sets it, ``messages`` when its ``prompt`` writes
them); one the rows set themselves (a chat line's ``"n": 0``) is neutral. A 4xx that
names no parameter still counts: it may be the job's or the server's.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass

from batchgpt.config import JobConfig
from batchgpt.retry import QUOTA_CODES, Failure, Kind

MAX_THRESHOLD = 5
MIN_THRESHOLD = 2
# 4xx codes about one row's content, not about the endpoint or the job: they prove the
# server is there and reading requests.
ROW_SPECIFIC_CODES = frozenset({
    "context_length_exceeded", "string_above_max_length", "request_too_large",
    "content_policy_violation", "content_filter",
})


def job_wide_params(job: JobConfig) -> frozenset[str]:
    """The request parameters the job sets for every row: a 4xx naming one of them may be
    the job's fault, so the breaker counts it; one naming any other parameter is about the
    row that set it. (A row may override a job parameter; its 4xx then counts, which at
    worst stops a run early with a message naming the parameter.)"""
    names = set(job.params)
    if job.model is not None:
        names.add("model")
    if job.prompt is not None and job.input_format in ("auto", "template"):
        names.add("messages")
    return frozenset(names)


_PARAM_NAME = re.compile(r"[^.\[\]]+")


def param_name(param: str | None) -> str | None:
    """The top-level parameter an error's ``param`` is about: ``messages`` for
    ``messages.[0].role`` or ``messages[0].content``; None for none."""
    if not param:
        return None
    match = _PARAM_NAME.match(param.strip())
    return match.group(0) if match else None


def threshold_for(concurrency: int) -> int:
    """How many same failures trip the breaker: 5, or the concurrency when it is smaller
    (so the first wave of requests decides), but at least 2, so one refused connection
    on a job with concurrency 1 (a server restarting) doesn't end the run."""
    return max(MIN_THRESHOLD, min(MAX_THRESHOLD, concurrency))


class Sign(str, enum.Enum):
    HEALTHY = "healthy"  # the endpoint works: disarm
    NEUTRAL = "neutral"  # says nothing about the endpoint
    SUSPECT = "suspect"  # might be the endpoint: count it


@dataclass(frozen=True, slots=True)
class Assessment:
    sign: Sign
    signature: str = ""  # for SUSPECT: what "the same way" compares
    cause: str = ""  # for SUSPECT: the failure in a few words, for the message
    param: str | None = None  # for a SUSPECT 4xx: the top-level parameter it names


def connection_cause(message: str) -> str:
    """Refused, DNS or TLS, from an aiohttp connection error's text (the client keeps the
    exception's class name and message)."""
    text = message.lower()
    if "dnserror" in text or "name or service not known" in text or "nodename nor" in text \
            or "getaddrinfo" in text or "name resolution" in text:
        return "the host name could not be resolved (DNS)"
    if "connect call failed" in text or "connection refused" in text:
        return "the connection was refused (nothing listens on that host and port)"
    # Not "ssl": aiohttp writes "ssl:default" into every connection error.
    if "sslerror" in text or "[ssl" in text or "certificate" in text or "tls" in text:
        return "the TLS handshake failed (is it http:// or https://?)"
    if "reset" in text or "disconnected" in text or "closed" in text:
        return "the server closed the connection without answering"
    return "the connection failed"


def assess(failure: Failure | None, stops_run: bool = False) -> Assessment:
    """What one attempt says about the endpoint. ``failure`` None: a reply came back.
    ``stops_run``: the retry decision stops the run anyway (401, quota, ...)."""
    if failure is None:
        return Assessment(Sign.HEALTHY)
    if stops_run or failure.kind in (Kind.TIMEOUT, Kind.TOO_LARGE):
        return Assessment(Sign.NEUTRAL)
    code = failure.error_code
    if failure.kind is Kind.CONNECTION:
        cause = connection_cause(failure.message)
        return Assessment(Sign.SUSPECT, f"connection:{cause}", f"{cause}: {failure.message}")
    if failure.kind is Kind.DECODE:
        return Assessment(Sign.SUSPECT, f"decode:{failure.status}",
                          f"the answers are not chat completions: {failure.message}")
    status = failure.status or 0
    if status == 429:
        if code in QUOTA_CODES:
            return Assessment(Sign.NEUTRAL)
        return Assessment(Sign.HEALTHY)  # rate limited: the endpoint works, we are early
    if code in ROW_SPECIFIC_CODES:
        return Assessment(Sign.HEALTHY)
    if status in (408, 409, 500, 503, 504):
        # A timeout, a conflict, the server's own error, overload, a gateway timeout: the
        # server is there and these usually pass; retries (exit 6 if they run out) are the
        # right answer, as for a timeout.
        return Assessment(Sign.NEUTRAL)
    if 400 <= status < 600:
        return Assessment(Sign.SUSPECT, f"http:{status}:{code}",
                          f"HTTP {status} ({code}): {failure.message}",
                          param_name(failure.param) if status < 500 else None)
    return Assessment(Sign.NEUTRAL)


class State(str, enum.Enum):
    ARMED = "armed"  # deciding: attempts are held back to the threshold
    DISARMED = "disarmed"  # the endpoint works; never trips
    TRIPPED = "tripped"


class CircuitBreaker:
    """Counts the first attempts of a run; trips or disarms once.

    Protocol for each attempt: wait until :meth:`may_start`, call :meth:`started`, send,
    then :meth:`record` the outcome (or :meth:`withdraw` if it was never sent). While
    armed, ``may_start`` is true only while (attempts started and unresolved) + (failures
    counted) < threshold: at most ``threshold`` attempts are ever made before it decides.

    ``record``, while armed: a HEALTHY outcome disarms; a NEUTRAL one is not counted; a
    SUSPECT one naming a parameter outside ``job_wide`` is about its row: not counted
    either; any other SUSPECT one is counted, unless its signature differs from the first
    counted one's (failing in different ways: row problems), which disarms. The
    ``threshold``-th counted failure trips it. ``job_wide`` None: every parameter counts
    (a caller that does not know the job).
    """

    def __init__(self, threshold: int, job_wide: Collection[str] | None = None) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold = threshold
        self.job_wide = None if job_wide is None else frozenset(job_wide)
        self.state = State.ARMED
        self.unresolved = 0
        self.counted: list[Assessment] = []

    @classmethod
    def for_job(cls, job: JobConfig, threshold: int) -> CircuitBreaker:
        """The breaker of a run of ``job``: its parameters set for every row are
        :func:`job_wide_params`."""
        return cls(threshold, job_wide_params(job))

    def counts(self, assessment: Assessment) -> bool:
        """Whether an outcome counts toward tripping (see the class's docstring)."""
        if assessment.sign is not Sign.SUSPECT:
            return False
        return (assessment.param is None or self.job_wide is None
                or assessment.param in self.job_wide)

    def may_start(self) -> bool:
        if self.state is not State.ARMED:
            return True
        return self.unresolved + len(self.counted) < self.threshold

    def started(self) -> None:
        if self.state is State.ARMED:
            self.unresolved += 1

    def withdraw(self) -> None:
        """An attempt that passed :meth:`may_start` was not sent after all."""
        if self.state is State.ARMED and self.unresolved:
            self.unresolved -= 1

    def record(self, assessment: Assessment) -> bool:
        """Count one attempt's outcome; True when this one trips the breaker."""
        if self.state is not State.ARMED:
            return False
        self.unresolved = max(0, self.unresolved - 1)
        if assessment.sign is Sign.HEALTHY:
            self.state = State.DISARMED
        elif self.counts(assessment):
            if self.counted and self.counted[0].signature != assessment.signature:
                self.state = State.DISARMED  # failing in different ways: row problems
            else:
                self.counted.append(assessment)
                if len(self.counted) >= self.threshold:
                    self.state = State.TRIPPED
                    return True
        return False

    @property
    def cause(self) -> str:
        """The first counted failure, in words (the message of a trip)."""
        return self.counted[0].cause if self.counted else ""
