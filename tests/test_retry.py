"""The retry decision, row by row of OpenAI's error table.

``decide(failure, attempt, policy, rand)`` is pure: every case here builds a ``Failure`` the
way ``batchgpt.client`` would from a real response and checks what the runner is told to
do — retry (and after how long), fail the row alone, or stop the whole run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest

from batchgpt.config import RetryPolicy
from batchgpt.retry import MAX_HINT_S, Action, Decision, Failure, Kind, backoff, decide

POLICY = RetryPolicy(max_attempts=6, initial_delay_s=1.0, max_delay_s=60.0, multiplier=2.0,
                     jitter=0.25)

TOO_LARGE_429 = (
    "Request too large for gpt-4o-mini in organization org-abc on tokens per min (TPM): "
    "Limit 30000, Requested 31538. The input or output tokens must be reduced in order to run "
    "successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
)
RATE_LIMIT_429 = (
    "Rate limit reached for gpt-4o-mini in organization org-abc on requests per min (RPM): "
    "Limit 500, Used 500, Requested 1. Please try again in 120ms. Visit "
    "https://platform.openai.com/account/rate-limits to learn more."
)
QUOTA_MESSAGE = ("You exceeded your current quota, please check your plan and billing "
                 "details.")
QUOTA_SIBLINGS = (
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
)


def http(status: int, message: str = "error", code: str | None = None,
         type_: str | None = None, headers: Mapping[str, str] | None = None) -> Failure:
    return Failure(Kind.HTTP, message, status=status, code=code, type=type_,
                   headers=dict(headers or {}))


def timeout() -> Failure:
    return Failure(Kind.TIMEOUT, "no answer within 60s")


def connection_reset() -> Failure:
    return Failure(Kind.CONNECTION, "connection failed: ServerDisconnectedError: Server "
                   "disconnected")


def garbage_body() -> Failure:
    return Failure(Kind.DECODE, "HTTP 200 with a body that is not a chat.completion: "
                   "'<html><body><h1>502 Bad Gateway</h1>'", status=200)


def too_large_locally() -> Failure:
    return Failure(Kind.TOO_LARGE, "request needs about 40000 tokens, more than the whole "
                   "tokens-per-minute limit of 30000; it can never be sent at this limit")


# -- the table ---------------------------------------------------------------------------

RETRYABLE = {
    "408 request timeout": http(408, "Request timed out."),
    "409 conflict": http(409, "The engine is currently busy."),
    "429 rate_limit_exceeded": http(429, RATE_LIMIT_429, "rate_limit_exceeded", "requests"),
    "429 rate limit on tokens": http(429, RATE_LIMIT_429.replace("requests per min (RPM)",
                                                                 "tokens per min (TPM)"),
                                     "rate_limit_exceeded", "tokens"),
    "500 server_error": http(500, "The server had an error while processing your request.",
                             "server_error", "server_error"),
    "502 bad gateway": http(502, "<html>502 Bad Gateway</html>"),
    "503 overloaded": http(503, "Slow Down", "engine_overloaded", "server_error"),
    "504 gateway timeout": http(504, "Gateway Timeout"),
    "timeout": timeout(),
    "connection reset": connection_reset(),
    "unparseable 200 body": garbage_body(),
}

ROW_FAILS = {
    "400 invalid request": http(400, "This model's maximum context length is 128000 tokens.",
                                "context_length_exceeded", "invalid_request_error"),
    "400 without code": http(400, "Invalid 'messages'."),
    "422 unprocessable": http(422, "Unprocessable Entity"),
    "404 on a row-level problem": http(404, "No such file: file-abc", None,
                                       "invalid_request_error"),
    "429 request too large for the TPM limit": http(429, TOO_LARGE_429, "rate_limit_exceeded",
                                                    "tokens"),
    "too large for the limiter": too_large_locally(),
}

RUN_STOPS = {
    "401 invalid_api_key": http(401, "Incorrect API key provided: sk-ab***wxyz.",
                                "invalid_api_key", "invalid_request_error"),
    "401 without code": http(401, "Unauthorized"),
    "403 permission": http(403, "You are not allowed to sample from this model.",
                           None, "invalid_request_error"),
    "403 region": http(403, "Country, region, or territory not supported",
                       "unsupported_country_region_territory", "request_forbidden"),
    **{f"429 {name} as code": http(429, QUOTA_MESSAGE, name, "insufficient_quota")
       for name in QUOTA_SIBLINGS},
    **{f"429 {name} as type, code None": http(429, QUOTA_MESSAGE, None, name)
       for name in QUOTA_SIBLINGS},
    "404 model_not_found": http(404, "The model `gpt-9` does not exist or you do not have "
                                "access to it.", "model_not_found", "invalid_request_error"),
    # A wrong api.base_url: OpenAI answers code null, the simulator code unknown_url.
    "404 invalid URL": http(404, "Invalid URL (POST /v2/chat/completions)", None,
                            "invalid_request_error"),
    "404 unknown_url": http(404, "Invalid URL (POST /v2/chat/completions)", "unknown_url",
                            "invalid_request_error"),
}


@pytest.mark.parametrize("failure", RETRYABLE.values(), ids=RETRYABLE.keys())
def test_transient_errors_are_retried_with_a_delay(failure: Failure) -> None:
    decision = decide(failure, 1, POLICY, 0.0)
    assert decision.action is Action.RETRY
    assert decision.delay_s > 0
    assert not decision.transient


@pytest.mark.parametrize("failure", ROW_FAILS.values(), ids=ROW_FAILS.keys())
def test_row_level_errors_fail_the_row_alone_at_once(failure: Failure) -> None:
    decision = decide(failure, 1, POLICY, 0.0)
    assert decision.action is Action.FAIL_ROW
    assert not decision.transient  # permanent: the next run leaves it alone
    assert decision.pause_s is None and not decision.slow_down


@pytest.mark.parametrize("failure", RUN_STOPS.values(), ids=RUN_STOPS.keys())
def test_account_level_errors_stop_the_run(failure: Failure) -> None:
    decision = decide(failure, 1, POLICY, 0.0)
    assert decision.action is Action.STOP_RUN
    assert decision.delay_s == 0.0


@pytest.mark.parametrize("name", QUOTA_SIBLINGS)
def test_quota_errors_stop_the_run_however_the_server_labels_them(name: str) -> None:
    as_code = decide(http(429, QUOTA_MESSAGE, name, "insufficient_quota"), 1, POLICY, 0.0)
    as_type = decide(http(429, QUOTA_MESSAGE, None, name), 1, POLICY, 0.0)
    assert as_code.action is as_type.action is Action.STOP_RUN
    assert as_code.reason == as_type.reason == "quota"
    # Not a rate limit: no pause, no slow-down, and not counted as a 429 to pace by.
    assert not http(429, QUOTA_MESSAGE, None, name).is_rate_limit
    assert http(429, QUOTA_MESSAGE, None, name).error_code == name


def test_quota_error_is_never_retried_even_on_the_first_attempt_with_a_retry_after() -> None:
    failure = http(429, QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota",
                   {"retry-after": "1"})
    for attempt in (1, 2, POLICY.max_attempts):
        assert decide(failure, attempt, POLICY, 0.0).action is Action.STOP_RUN


def test_stop_reasons_name_the_cause() -> None:
    assert decide(http(401, code="invalid_api_key"), 1, POLICY, 0.0).reason == "authentication"
    assert decide(http(403), 1, POLICY, 0.0).reason == "permission"
    assert decide(http(404, code="model_not_found"), 1, POLICY, 0.0).reason == "model not found"
    assert decide(http(404, "Invalid URL (POST /x)"), 1, POLICY, 0.0).reason == "invalid URL"


# -- running out of attempts ---------------------------------------------------------------


@pytest.mark.parametrize("failure", RETRYABLE.values(), ids=RETRYABLE.keys())
def test_last_attempt_on_a_retryable_error_fails_the_row_as_transient(failure: Failure) -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.05)
    assert decide(failure, 2, policy, 0.0).action is Action.RETRY
    last = decide(failure, 3, policy, 0.0)
    assert last.action is Action.FAIL_ROW
    assert last.transient  # the next run tries it again without --retry-failed
    assert "3 attempts" in last.reason


def test_a_429_on_the_last_attempt_still_pauses_dispatch_for_everyone() -> None:
    """The row gives up, but the server's retry-after is about the account: the other
    rows must not walk into the same 429."""
    failure = http(429, RATE_LIMIT_429, "rate_limit_exceeded", "requests",
                   {"retry-after-ms": "1500"})
    decision = decide(failure, POLICY.max_attempts, POLICY, 0.0)
    assert decision.action is Action.FAIL_ROW and decision.transient
    assert decision.pause_s == 1.5
    assert decision.slow_down


def test_a_single_attempt_policy_never_retries() -> None:
    decision = decide(timeout(), 1, RetryPolicy(max_attempts=1), 0.0)
    assert decision.action is Action.FAIL_ROW and decision.transient


def test_permanent_errors_stay_permanent_on_the_last_attempt() -> None:
    """A 400 on the last attempt (after earlier 5xx) is still the row's own fault."""
    decision = decide(ROW_FAILS["400 invalid request"], POLICY.max_attempts, POLICY, 0.0)
    assert decision.action is Action.FAIL_ROW and not decision.transient


def test_a_rate_limit_hint_longer_than_a_run_should_wait_stops_the_run() -> None:
    # A daily limit, say: every other row would be sent into the same 429.
    failure = http(429, "slow down", "rate_limit_exceeded",
                   headers={"retry-after": str(int(MAX_HINT_S) + 1)})
    decision = decide(failure, 1, POLICY, 0.0)
    assert decision.action is Action.STOP_RUN


def test_a_long_hint_on_a_server_error_leaves_the_row_for_the_next_run() -> None:
    failure = http(503, "maintenance", None, headers={"retry-after": str(int(MAX_HINT_S) + 1)})
    decision = decide(failure, 1, POLICY, 0.0)
    assert decision.action is Action.FAIL_ROW and decision.transient


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_grows_exponentially_from_the_initial_delay() -> None:
    policy = RetryPolicy(max_attempts=20, initial_delay_s=0.5, max_delay_s=1000.0,
                         multiplier=3.0, jitter=0.0)
    delays = [decide(timeout(), attempt, policy, 0.0).delay_s for attempt in range(1, 7)]
    assert delays == pytest.approx([0.5, 1.5, 4.5, 13.5, 40.5, 121.5])


def test_backoff_is_capped_at_max_delay() -> None:
    policy = RetryPolicy(max_attempts=50, initial_delay_s=1.0, max_delay_s=60.0, jitter=0.0)
    delays = [decide(timeout(), attempt, policy, 0.0).delay_s for attempt in range(1, 30)]
    assert max(delays) == 60.0
    assert delays[-1] == 60.0  # 2**28 s does not overflow the cap
    assert delays == sorted(delays)  # never shrinks as attempts go on


@pytest.mark.parametrize(("multiplier", "attempt"), [(2.0, 1025), (2.0, 100_000),
                                                     (1e6, 60), (1e300, 3)])
def test_backoff_stays_at_the_cap_however_many_attempts(multiplier: float,
                                                         attempt: int) -> None:
    """max_attempts has no upper bound ("retry for as long as it takes"); the exponent
    must not overflow a float into an exception that would kill the row's worker."""
    policy = RetryPolicy(max_attempts=10**9, initial_delay_s=1.0, max_delay_s=60.0,
                         multiplier=multiplier, jitter=0.0)
    decision = decide(timeout(), attempt, policy, 0.0)
    assert decision.action is Action.RETRY
    assert decision.delay_s == 60.0


@pytest.mark.parametrize("rand", [0.0, 0.1, 0.5, 0.9, 0.999999, 1.0])
@pytest.mark.parametrize("attempt", [1, 3, 10])
def test_jitter_only_shortens_the_delay(rand: float, attempt: int) -> None:
    policy = POLICY.model_copy(update={"max_attempts": 20})
    full = backoff(attempt, policy.model_copy(update={"jitter": 0.0}), 0.0)
    decision = decide(timeout(), attempt, policy, rand)
    assert decision.action is Action.RETRY
    assert (1 - policy.jitter) * full - 1e-12 <= decision.delay_s <= full
    assert decision.delay_s <= policy.max_delay_s


def test_jitter_without_a_given_rand_stays_within_bounds() -> None:
    full = backoff(4, POLICY.model_copy(update={"jitter": 0.0}), 0.0)
    delays = {decide(timeout(), 4, POLICY).delay_s for _ in range(200)}
    assert all(0.75 * full <= d <= full for d in delays)
    assert len(delays) > 1  # actually jittered: retries do not move in lock-step


# -- server hints ------------------------------------------------------------------------------


def test_retry_after_ms_wins_and_pauses_all_dispatch_on_a_429() -> None:
    failure = http(429, RATE_LIMIT_429, "rate_limit_exceeded", "requests",
                   {"retry-after-ms": "1500", "retry-after": "2"})
    decision = decide(failure, 1, POLICY, 0.0)
    assert decision == Decision(Action.RETRY, delay_s=1.5, pause_s=1.5, slow_down=True,
                                reason=decision.reason)


def test_retry_after_seconds_header_is_the_delay() -> None:
    decision = decide(http(429, "Rate limited", "rate_limit_exceeded",
                           headers={"retry-after": "3"}), 1, POLICY, 0.0)
    assert decision.action is Action.RETRY
    assert decision.delay_s == 3.0 and decision.pause_s == 3.0


def test_header_names_match_whatever_their_case() -> None:
    decision = decide(http(429, "Rate limited", "rate_limit_exceeded",
                           headers={"Retry-After-Ms": "250"}), 1, POLICY, 0.0)
    assert decision.delay_s == 0.25 and decision.pause_s == 0.25


@pytest.mark.parametrize(("message", "seconds"), [
    ("Rate limit reached for gpt-4o-mini on tokens per min (TPM): Limit 30000, Used 29000, "
     "Requested 2000. Please try again in 9.816s. Visit https://platform.openai.com", 9.816),
    ("Please try again in 120ms.", 0.12),
    ("Please try again in 1m30s.", 90.0),
    ("Please try again in 20 seconds.", 20.0),
])
def test_try_again_in_the_message_is_the_delay(message: str, seconds: float) -> None:
    decision = decide(http(429, message, "rate_limit_exceeded", "tokens"), 1, POLICY, 0.0)
    assert decision.action is Action.RETRY
    assert decision.delay_s == pytest.approx(seconds)
    assert decision.pause_s == pytest.approx(seconds)


def test_a_hint_wins_over_backoff_even_late_in_the_attempts() -> None:
    failure = http(429, "Please try again in 2s.", "rate_limit_exceeded")
    assert decide(failure, 5, POLICY, 0.0).delay_s == 2.0  # backoff would say 16 s


def test_retry_after_on_a_5xx_sets_the_delay_but_pauses_nobody() -> None:
    decision = decide(http(500, "oops", "server_error", headers={"retry-after": "3"}), 1,
                      POLICY, 0.0)
    assert decision.action is Action.RETRY
    assert decision.delay_s == 3.0
    assert decision.pause_s is None
    assert not decision.slow_down


def test_without_a_hint_a_429_does_not_pause_dispatch() -> None:
    decision = decide(http(429, "Rate limited", "rate_limit_exceeded"), 1, POLICY, 0.0)
    assert decision.action is Action.RETRY
    assert decision.delay_s == POLICY.initial_delay_s
    assert decision.pause_s is None
    assert decision.slow_down


@pytest.mark.parametrize(("failure", "slow"), [
    (http(503, "Slow Down", "engine_overloaded", "server_error"), True),
    (http(429, "Rate limited", "rate_limit_exceeded"), True),
    (http(500, "oops", "server_error"), False),
    (http(502, "bad gateway"), False),
    (timeout(), False),
    (connection_reset(), False),
    (garbage_body(), False),
], ids=["503", "429", "500", "502", "timeout", "connection", "decode"])
def test_only_overload_and_rate_limits_ask_the_limiter_to_slow_down(failure: Failure,
                                                                     slow: bool) -> None:
    assert decide(failure, 1, POLICY, 0.0).slow_down is slow


def test_a_503_on_the_last_attempt_still_asks_to_slow_down() -> None:
    decision = decide(http(503, "Slow Down", "engine_overloaded"), POLICY.max_attempts, POLICY,
                      0.0)
    assert decision.action is Action.FAIL_ROW and decision.transient and decision.slow_down


# -- error_code --------------------------------------------------------------------------------


@pytest.mark.parametrize(("failure", "code"), [
    (http(500), "http_500"),
    (http(502, "<html>"), "http_502"),
    (http(400, code="context_length_exceeded"), "context_length_exceeded"),
    (http(429, code="rate_limit_exceeded", type_="tokens"), "rate_limit_exceeded"),
    (http(429, QUOTA_MESSAGE, None, "insufficient_quota"), "insufficient_quota"),
    (http(429, TOO_LARGE_429, "rate_limit_exceeded", "tokens"), "request_too_large"),
    (http(401, type_="invalid_request_error"), "http_401"),
    (http(500, code=""), "http_500"),
    (timeout(), "timeout"),
    (connection_reset(), "connection_error"),
    (garbage_body(), "invalid_response"),
    (too_large_locally(), "request_too_large"),
], ids=["500", "502", "code wins", "429 code", "quota type", "429 too large",
        "non-quota type ignored",
        "empty code", "timeout", "connection", "decode", "too large"])
def test_error_code_is_stable_for_the_failures_file(failure: Failure, code: str) -> None:
    assert failure.error_code == code


def test_too_large_is_one_code_whether_the_server_or_the_limiter_caught_it() -> None:
    """A permanent failure must not be filed as rate_limit_exceeded: that reads as "try
    again later", and --retry-failed would only get the same answer."""
    server = http(429, TOO_LARGE_429, "rate_limit_exceeded", "tokens")
    assert server.error_code == too_large_locally().error_code == "request_too_large"
    assert decide(server, 1, POLICY, 0.0).action is Action.FAIL_ROW


def test_a_429_is_a_rate_limit_only_when_it_is_not_about_quota() -> None:
    assert http(429, code="rate_limit_exceeded").is_rate_limit
    assert http(429).is_rate_limit
    assert not http(429, QUOTA_MESSAGE, "insufficient_quota").is_rate_limit
    assert not http(503).is_rate_limit
    assert not timeout().is_rate_limit


# -- x-should-retry ------------------------------------------------------------------------------


def told(failure: Failure, value: str) -> Failure:
    """The same failure with the server's x-should-retry header added."""
    return replace(failure, headers={**failure.headers, "x-should-retry": value})


def http_only(table: dict[str, Failure]) -> dict[str, Failure]:
    """The cases a server answered (the limiter's own refusal and timeouts have no
    headers)."""
    return {name: f for name, f in table.items() if f.kind is Kind.HTTP}


@pytest.mark.parametrize("failure", http_only(ROW_FAILS).values(),
                         ids=http_only(ROW_FAILS).keys())
def test_should_retry_true_makes_a_row_level_error_retryable(failure: Failure) -> None:
    decision = decide(told(failure, "true"), 1, POLICY, 0.0)
    assert decision.action is Action.RETRY
    assert decision.delay_s == POLICY.initial_delay_s
    assert "x-should-retry" in decision.reason
    # ...and a row that runs out of attempts is left for the next run, not failed for good.
    last = decide(told(failure, "true"), POLICY.max_attempts, POLICY, 0.0)
    assert last.action is Action.FAIL_ROW and last.transient


@pytest.mark.parametrize("failure", http_only(RETRYABLE).values(),
                         ids=http_only(RETRYABLE).keys())
def test_should_retry_false_fails_a_retryable_error_at_once_and_for_good(
    failure: Failure,
) -> None:
    decision = decide(told(failure, "false"), 1, POLICY, 0.0)
    assert decision.action is Action.FAIL_ROW
    assert not decision.transient  # the server said not to send it again
    assert "x-should-retry" in decision.reason


@pytest.mark.parametrize("failure", RUN_STOPS.values(), ids=RUN_STOPS.keys())
@pytest.mark.parametrize("value", ["true", "false"])
def test_should_retry_never_overrules_a_stop(failure: Failure, value: str) -> None:
    """Bad key, no permission, no quota, no such model or URL: every other row would get
    the same answer, whatever the header says about this one."""
    assert decide(told(failure, value), 1, POLICY, 0.0) == decide(failure, 1, POLICY, 0.0)


def test_should_retry_false_on_a_429_still_pauses_and_slows_everyone() -> None:
    failure = told(http(429, RATE_LIMIT_429, "rate_limit_exceeded", "requests",
                        {"retry-after-ms": "1500"}), "false")
    decision = decide(failure, 1, POLICY, 0.0)
    assert decision.action is Action.FAIL_ROW and not decision.transient
    assert decision.pause_s == 1.5 and decision.slow_down


@pytest.mark.parametrize(("value", "action"), [
    ("true", Action.RETRY), ("TRUE", Action.RETRY), (" true ", Action.RETRY),
    ("false", Action.FAIL_ROW), ("False", Action.FAIL_ROW),
    ("yes", Action.FAIL_ROW), ("1", Action.FAIL_ROW), ("", Action.FAIL_ROW),
], ids=["true", "TRUE", "blanks", "false", "False", "yes", "1", "empty"])
def test_should_retry_is_read_as_the_sdk_reads_it_forgiving_case_and_blanks(
    value: str, action: Action
) -> None:
    """Anything but true/false is no answer: the table decides (a 400 fails the row)."""
    decision = decide(told(http(400, "Invalid 'messages'."), value), 1, POLICY, 0.0)
    assert decision.action is action


def test_should_retry_header_name_matches_whatever_its_case() -> None:
    failure = http(400, "Invalid 'messages'.", headers={"X-Should-Retry": "true"})
    assert decide(failure, 1, POLICY, 0.0).action is Action.RETRY


def test_should_retry_is_only_read_on_an_error_status() -> None:
    """A 200 with a body that is not a chat.completion has no error status for the header
    to overrule (the SDK never looks at it there either): it is retried."""
    failure = told(garbage_body(), "false")
    assert decide(failure, 1, POLICY, 0.0).action is Action.RETRY


# -- hints no server can mean ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-3", "1e308", "1e999",
                                   "9999999999", "Fri, 31 Dec 9999 23:59:59 GMT"])
@pytest.mark.parametrize("name", ["retry-after", "retry-after-ms"])
@pytest.mark.parametrize("status", [429, 500, 503])
def test_an_absurd_wait_hint_is_no_hint(status: int, name: str, value: str) -> None:
    """Taken at face value, "retry-after: 1e308" on a 429 would stop the run ("a daily
    limit") and on a 5xx would fail the row unsent; it is garbage, so backoff decides."""
    failure = http(status, "busy", "rate_limit_exceeded" if status == 429 else None,
                   headers={name: value})
    decision = decide(failure, 1, POLICY, 0.0)
    assert decision.action is Action.RETRY
    assert decision.delay_s == POLICY.initial_delay_s
    assert decision.pause_s is None


@pytest.mark.parametrize("headers", [{"retry-after": "0"}, {"retry-after-ms": "0"}])
def test_a_zero_wait_hint_means_backoff_not_a_retry_storm(headers: dict[str, str]) -> None:
    decision = decide(http(429, "Rate limited", "rate_limit_exceeded", headers=headers), 3,
                      POLICY, 0.0)
    assert decision.action is Action.RETRY
    assert decision.delay_s == backoff(3, POLICY, 0.0) == 4.0
    assert decision.pause_s is None
