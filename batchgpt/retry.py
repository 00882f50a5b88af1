"""Which failures to try again, when, and which ones end the whole run.

One pure function, :func:`decide`, maps (failure, attempt, policy) to a
:class:`Decision`; the runner only carries it out. Keeping it pure is what lets the
table in ``tests/test_retry.py`` pin every row of OpenAI's error table down.

The openai SDK has its own retry loop, but it retries ``insufficient_quota`` (it looks at
the status only) and hides attempts from the limiter, so batchgpt builds its client with
``max_retries=0`` and decides here instead. What the SDK's loop does right is kept: the
server's ``x-should-retry`` header overrides the status table (see :func:`decide`).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from batchgpt.config import RetryPolicy
from batchgpt.limiter import header, parse_retry_after

QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
        "billing_hard_limit_reached",
        "access_terminated",
    }
)
# A server hint longer than this is not waited out inside a run: the row fails as
# retryable and the next run picks it up.
MAX_HINT_S = 600.0


class Kind(str, enum.Enum):
    HTTP = "http"  # the server answered with an error status
    TIMEOUT = "timeout"  # no answer within timeout_s
    CONNECTION = "connection"  # refused, reset, dropped
    DECODE = "decode"  # a 2xx whose body is not a chat.completion
    TOO_LARGE = "too_large"  # refused locally: more tokens than the whole TPM limit


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt, reduced to what a retry decision and the failures file need."""

    kind: Kind
    message: str
    status: int | None = None
    code: str | None = None
    type: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: object = None  # the parsed error body, where there was one
    request_id: str | None = None
    param: str | None = None  # the error's ``param``: the request parameter at fault

    @property
    def error_code(self) -> str:
        """A stable code for the failures file and the error counts."""
        if (self.kind is Kind.HTTP and self.status == 429
                and "request too large" in self.message.lower()):
            # OpenAI sends code rate_limit_exceeded, but it is permanent: name it as the
            # limiter does when it catches the same request before sending it.
            return "request_too_large"
        if self.code:
            return self.code
        if self.kind is Kind.HTTP:
            if self.type and self.type in QUOTA_CODES:
                return self.type
            return f"http_{self.status}"
        return {
            Kind.TIMEOUT: "timeout",
            Kind.CONNECTION: "connection_error",
            Kind.DECODE: "invalid_response",
            Kind.TOO_LARGE: "request_too_large",
        }[self.kind]

    @property
    def is_rate_limit(self) -> bool:
        return self.status == 429 and self.error_code not in QUOTA_CODES


class Action(str, enum.Enum):
    RETRY = "retry"
    FAIL_ROW = "fail_row"
    STOP_RUN = "stop_run"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    # The row failed, but for a reason that may pass (retries ran out on a 5xx, say): the
    # next run tries it again without --retry-failed.
    transient: bool = False
    # Server hint: pause all dispatch this long (a 429's retry-after).
    pause_s: float | None = None
    slow_down: bool = False
    reason: str = ""


def backoff(attempt: int, policy: RetryPolicy, rand: float) -> float:
    """Exponential delay before attempt ``attempt + 1``, capped, with jitter taken off
    (full-size delays in lock-step would hit the server together)."""
    try:
        base = policy.initial_delay_s * policy.multiplier ** max(0, attempt - 1)
    except OverflowError:  # a float power past ~1.8e308 raises instead of giving inf
        base = math.inf
    return min(policy.max_delay_s, base) * (1.0 - policy.jitter * rand)


def should_retry_header(headers: Mapping[str, str]) -> bool | None:
    """The server's ``x-should-retry``: True for ``true``, False for ``false``, None when
    absent or anything else. OpenAI sends it to overrule what the status alone suggests;
    the SDK compares the exact strings, this also forgives case and blanks."""
    value = header(headers, "x-should-retry")
    if value is None:
        return None
    value = value.strip().lower()
    return True if value == "true" else False if value == "false" else None


def decide(
    failure: Failure, attempt: int, policy: RetryPolicy, rand: float | None = None
) -> Decision:
    """What to do after ``attempt`` (1-based) failed with ``failure``.

    In order:

    1. Stop-the-run answers (401, 403, a quota code, model not found, an unknown URL)
       stop the run whatever else the server says: they are about the key, the account
       or the endpoint, so every other row would get the same answer.
    2. An HTTP error's ``x-should-retry`` header (as the openai SDK honours it): ``true``
       makes the failure retryable even when the status alone is not (a 400, a 429
       "request too large"), and such a row that runs out of attempts is left for the
       next run (``transient``); ``false`` fails the row at once and for good (the
       server says this request should not be sent again; ``--retry-failed`` does),
       while a 429's pause and slow-down still apply to everyone else.
    3. Without the header, the status table: 4xx other than 408/409/429 fail the row,
       the rest is retried with backoff or the server's wait hint.

    A wait hint of 0 is no hint (backoff applies, as in the SDK, which only honours
    hints above 0): a server that says "retry now" to every 429 would otherwise get a
    retry storm. Absurd hints never get here (:func:`parse_retry_after` drops them).
    """
    status, code = failure.status, failure.error_code
    if failure.kind is Kind.TOO_LARGE:
        return Decision(Action.FAIL_ROW, reason="request larger than the TPM limit")
    told: bool | None = None
    if failure.kind is Kind.HTTP and status is not None:
        if status in (401, 403):
            return Decision(Action.STOP_RUN, reason="authentication" if status == 401
                            else "permission")
        if code in QUOTA_CODES:
            return Decision(Action.STOP_RUN, reason="quota")
        if status == 404 and code == "model_not_found":
            return Decision(Action.STOP_RUN, reason="model not found")
        if status == 404 and (code == "unknown_url"
                              or failure.message.lstrip().startswith("Invalid URL")):
            # The endpoint, not the row: a wrong api.base_url would fail every row for good.
            return Decision(Action.STOP_RUN, reason="invalid URL")
        told = should_retry_header(failure.headers)
        if told is None:
            if status == 429 and "request too large" in failure.message.lower():
                return Decision(Action.FAIL_ROW, reason="request larger than the TPM limit")
            if 400 <= status < 500 and status not in (408, 409, 429):
                return Decision(Action.FAIL_ROW, reason=f"HTTP {status}")
    # Everything else may pass: 408, 409, 429 rate_limit_exceeded, 5xx, timeouts,
    # dropped connections, bodies that are not JSON (a gateway's HTML page), and whatever
    # the server marked x-should-retry: true.
    hint = parse_retry_after(failure.headers, failure.message)
    if hint is not None and hint <= 0:
        hint = None
    slow = status == 503 or failure.is_rate_limit
    # The server's hint is about the account, not this row: it pauses everyone even when
    # this row gives up.
    pause = hint if failure.is_rate_limit and hint is not None and hint <= MAX_HINT_S else None
    if told is False:
        return Decision(Action.FAIL_ROW, pause_s=pause, slow_down=slow,
                        reason="the server says not to retry (x-should-retry: false)")
    if attempt >= policy.max_attempts:
        return Decision(Action.FAIL_ROW, transient=True, pause_s=pause, slow_down=slow,
                        reason=f"gave up after {attempt} attempts")
    if hint is not None and hint > MAX_HINT_S:
        if failure.is_rate_limit:  # a daily limit, say: every other row would hit it too
            return Decision(Action.STOP_RUN,
                            reason=f"rate limit: the server asks to wait {hint:.0f}s")
        return Decision(Action.FAIL_ROW, transient=True,
                        reason=f"server asks to wait {hint:.0f}s; left for the next run")
    delay = backoff(attempt, policy, random.random() if rand is None else rand)
    if hint is not None:
        delay = hint
    return Decision(Action.RETRY, delay_s=delay, pause_s=pause, slow_down=slow,
                    reason="the server says to retry (x-should-retry: true)" if told
                    else "retryable")


# Errors about what one model can do with a row (its context window, its content policy,
# whether the key can use it at all): another model may not share them.
FALLBACK_CODES = frozenset(
    {"model_not_found", "context_length_exceeded", "content_filter", "content_policy_violation"}
)


def fallback_chain(model: str, fallbacks: Sequence[str], missing: Collection[str]) -> list[str]:
    """The models a row is tried on, in order: its own, then the job's fallbacks (without
    repeating its own), less those found missing this run — except the last, which is
    always tried, so a row whose every model is missing still gets the server's answer."""
    chain = [model, *(m for m in fallbacks if m != model)]
    return [m for m in chain[:-1] if m not in missing] + chain[-1:]


def falls_back(failure: Failure, decision: Decision) -> bool:
    """Whether a row that ``failure`` ended on one model (``decision`` is not a retry) may
    be tried on the next of ``fallback_models``: a model missing (404) or too small for the
    row, its content filter, or its server still failing when the retries ran out (5xx,
    timeouts, dropped connections). Never for what is about the key, the account or the
    request itself (401, 403, quota, other 4xx): every model would answer the same.
    Invalid output after its re-asks falls back too (the runner decides that one: it is
    not an HTTP failure)."""
    if decision.action is Action.RETRY:
        return False
    if failure.status in (401, 403) or failure.error_code in QUOTA_CODES:
        return False
    if failure.error_code in FALLBACK_CODES:
        return True
    if failure.kind is Kind.HTTP and failure.status == 404 and decision.action is Action.FAIL_ROW:
        # A model missing without OpenAI's code (Azure's DeploymentNotFound, vLLM, Ollama,
        # a proxy); an unknown URL stops the run instead.
        return True
    if decision.action is Action.FAIL_ROW and decision.transient:
        return failure.kind in (Kind.TIMEOUT, Kind.CONNECTION) or (
            failure.kind is Kind.HTTP and (failure.status or 0) >= 500)
    return False
