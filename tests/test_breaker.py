"""The circuit breaker: a run whose first attempts all fail the same way stops within
seconds, with exit 1 and one message naming the cause and the URL, instead of grinding
through every row's retries.

First :class:`batchgpt.breaker.CircuitBreaker` and :func:`assess` on their own, then whole
runs through the CLI: a closed port (connection refused), ``https://`` to a plain-HTTP
server (TLS), a server answering 400 to every row, and a proxy answering 502 to every
request. The job's concurrency is 8, so the threshold is 5: the server sees at most 5
requests before the run stops.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from batchgpt.breaker import (
    Assessment,
    CircuitBreaker,
    Sign,
    State,
    assess,
    connection_cause,
    job_wide_params,
    param_name,
    threshold_for,
)
from batchgpt.config import JobConfig
from batchgpt.retry import Failure, Kind
from batchgpt.simulator import FaultConfig, Simulator
from tests.conftest import JobFiles, articles, write_jsonl

THRESHOLD = threshold_for(8)  # the concurrency of the test jobs

REFUSED = Assessment(Sign.SUSPECT, "connection:refused", "the connection was refused")
HTTP_400 = Assessment(Sign.SUSPECT, "http:400:http_400", "HTTP 400")
REPLY = Assessment(Sign.HEALTHY)
TIMEOUT = Assessment(Sign.NEUTRAL)

# -- the breaker on its own ----------------------------------------------------------------


@pytest.mark.parametrize(("concurrency", "threshold"),
                         [(1, 2), (2, 2), (4, 4), (5, 5), (8, 5), (1024, 5)])
def test_the_threshold_is_five_or_the_concurrency_when_smaller_but_at_least_two(
    concurrency: int, threshold: int
) -> None:
    assert threshold_for(concurrency) == threshold


def test_it_trips_when_the_first_attempts_all_fail_the_same_way() -> None:
    breaker = CircuitBreaker(3)
    assert [breaker.record(REFUSED) for _ in range(3)] == [False, False, True]
    assert breaker.state is State.TRIPPED
    assert breaker.cause == "the connection was refused"


def test_it_never_trips_once_an_attempt_succeeded() -> None:
    breaker = CircuitBreaker(3)
    breaker.record(REFUSED)
    breaker.record(REPLY)
    assert not any(breaker.record(REFUSED) for _ in range(10))
    assert breaker.state is State.DISARMED


def test_failures_of_different_kinds_are_row_problems_and_disarm_it() -> None:
    breaker = CircuitBreaker(3)
    breaker.record(HTTP_400)
    breaker.record(REFUSED)
    assert breaker.state is State.DISARMED
    assert not any(breaker.record(HTTP_400) for _ in range(10))


def test_neutral_outcomes_neither_count_nor_disarm() -> None:
    breaker = CircuitBreaker(2)
    breaker.record(TIMEOUT)
    breaker.record(HTTP_400)
    breaker.record(TIMEOUT)
    assert breaker.state is State.ARMED
    assert breaker.record(HTTP_400)


def test_while_armed_no_more_than_the_threshold_of_attempts_are_unresolved_or_failed() -> None:
    breaker = CircuitBreaker(3)
    for _ in range(3):
        assert breaker.may_start()
        breaker.started()
    assert not breaker.may_start()  # three on the wire
    breaker.record(HTTP_400)
    assert not breaker.may_start()  # two on the wire, one failure counted
    breaker.record(TIMEOUT)
    assert breaker.may_start()  # a neutral outcome frees its place
    breaker.started()
    breaker.withdraw()  # ... given back by an attempt that was never sent
    assert breaker.may_start()
    breaker.record(REPLY)
    assert breaker.may_start() and breaker.state is State.DISARMED
    breaker.started()
    assert breaker.unresolved == 0  # once disarmed, nothing is counted or held back


def failure(status: int | None, code: str | None = None, kind: Kind = Kind.HTTP,
            message: str = "m") -> Failure:
    return Failure(kind, message, status=status, code=code)


@pytest.mark.parametrize(("attempt", "sign"), [
    (None, Sign.HEALTHY),
    (failure(429, "rate_limit_exceeded"), Sign.HEALTHY),  # the endpoint works; we are early
    (failure(400, "context_length_exceeded"), Sign.HEALTHY),  # about the row, not the job
    (failure(400, "invalid_value"), Sign.SUSPECT),
    (failure(422), Sign.SUSPECT),
    (failure(502, "proxy_error"), Sign.SUSPECT),
    (failure(500, "server_error"), Sign.NEUTRAL),  # usually passes: retries, exit 6
    (failure(503, "engine_overloaded"), Sign.NEUTRAL),
    (failure(504), Sign.NEUTRAL),
    (failure(408), Sign.NEUTRAL),
    (failure(None, kind=Kind.TIMEOUT), Sign.NEUTRAL),
    (failure(None, kind=Kind.CONNECTION, message="connection failed: reset"), Sign.SUSPECT),
    (failure(200, kind=Kind.DECODE, message="HTTP 200 with a body that is not..."),
     Sign.SUSPECT),
], ids=lambda v: getattr(v, "error_code", v))
def test_what_an_attempt_says_about_the_endpoint(attempt: Failure | None, sign: Sign) -> None:
    assert assess(attempt).sign is sign


# A job of chat lines (no prompt) with a model and max_tokens for every row, and a job of
# template records whose prompt writes every row's messages.
CHAT_JOB = {"model": "gpt-4o-mini", "params": {"max_tokens": 50}}
TEMPLATE_JOB = {"params": {"temperature": 0.2, "response_format": {"type": "json_object"}},
                "prompt": "Summarize: {text}"}


@pytest.mark.parametrize(("job", "param", "counted"), [
    (CHAT_JOB, None, True),  # names no parameter: may be the job's or the server's
    (CHAT_JOB, "max_tokens", True),  # the job's own parameter
    (CHAT_JOB, "model", True),  # the job sets the model
    (CHAT_JOB, "n", False),  # a chat line's own "n": 0
    (CHAT_JOB, "messages.[0].role", False),  # a chat line's own messages
    (CHAT_JOB, "temperature", False),
    (TEMPLATE_JOB, "messages[0].content", True),  # the prompt writes every row's messages
    (TEMPLATE_JOB, "response_format.type", True),
    (TEMPLATE_JOB, "temperature", True),
    (TEMPLATE_JOB, "model", False),  # the job names none: each line's body does
    (TEMPLATE_JOB, "max_tokens", False),
    (TEMPLATE_JOB, "", True),  # an empty param is no param
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_4xx_counts_only_when_the_parameter_it_names_is_set_by_the_job_for_every_row(
    job: dict[str, Any], param: str | None, counted: bool
) -> None:
    config = JobConfig(input="in.jsonl", output="out.jsonl", **job)
    breaker = CircuitBreaker.for_job(config, 2)
    outcome = assess(Failure(Kind.HTTP, "m", status=400, code="invalid_value", param=param))
    assert outcome.sign is Sign.SUSPECT
    assert breaker.counts(outcome) is counted
    breaker.record(outcome)
    assert breaker.record(outcome) is counted  # the second same failure trips it, or not
    assert breaker.state is (State.TRIPPED if counted else State.ARMED)


def test_row_specific_4xx_neither_count_nor_disarm_and_a_breaker_without_the_job_counts_all(
) -> None:
    row_400 = assess(Failure(Kind.HTTP, "m", status=400, param="n"))
    breaker = CircuitBreaker(2, job_wide={"max_tokens"})
    assert not any(breaker.record(row_400) for _ in range(10))
    assert breaker.state is State.ARMED and breaker.may_start()
    assert breaker.record(HTTP_400) is False and breaker.record(HTTP_400) is True
    assert CircuitBreaker(2).counts(row_400)  # a caller that does not know the job
    # a 5xx naming a parameter is the server's: counted whatever it names
    assert breaker.counts(assess(Failure(Kind.HTTP, "m", status=502, param="n")))


@pytest.mark.parametrize(("param", "name"), [
    ("n", "n"), ("messages.[0].role", "messages"), ("messages[2].content", "messages"),
    ("response_format.json_schema.schema", "response_format"), ("tools[0]", "tools"),
    (None, None), ("", None), (".", None),
])
def test_the_parameter_an_error_names_is_its_top_level_name(param: str | None,
                                                            name: str | None) -> None:
    assert param_name(param) == name


def test_the_job_wide_parameters_are_its_params_its_model_and_its_prompts_messages() -> None:
    def wide(**job: Any) -> set[str]:
        return set(job_wide_params(JobConfig(input="i", output="o", **job)))

    assert wide() == set()
    assert wide(model="m", params={"n": 2, "seed": 1}) == {"model", "n", "seed"}
    assert wide(prompt="{text}") == {"messages"}
    assert wide(prompt="{text}", input_format="chat") == set()


def test_answers_that_stop_the_run_on_their_own_are_left_to_their_own_message() -> None:
    assert assess(failure(401, "invalid_api_key"), stops_run=True).sign is Sign.NEUTRAL
    assert assess(failure(429, "insufficient_quota")).sign is Sign.NEUTRAL


@pytest.mark.parametrize(("message", "cause"), [
    ("connection failed: ClientConnectorError: Cannot connect to host 127.0.0.1:1 "
     "ssl:default [Connect call failed ('127.0.0.1', 1)]", "refused"),
    ("connection failed: ClientConnectorDNSError: Cannot connect to host x.invalid:80 "
     "ssl:default [Name or service not known]", "DNS"),
    ("connection failed: ClientConnectorSSLError: Cannot connect to host 127.0.0.1:1 "
     "ssl:default [[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)]", "TLS"),
    ("connection failed: ServerDisconnectedError: Server disconnected", "closed"),
])
def test_connection_failures_are_told_apart_by_cause(message: str, cause: str) -> None:
    assert cause in connection_cause(message)


# -- through the CLI -----------------------------------------------------------------------


def closed_port() -> int:
    """A port nothing listens on: bound to find a free one, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def assert_stopped_by_the_breaker(job: JobFiles, result: Any, url: str, cause: str) -> None:
    assert result.exit_code == 1, result.output
    summary = job.summary()
    assert summary["outcome"] == "stopped"
    assert summary["stopped"] == "circuit breaker"
    message = summary["message"]
    assert message.startswith(f"the first {THRESHOLD} requests to {url} all failed the same "
                              "way, and none succeeded")
    assert cause in message
    assert summary["this_run"]["requests"]["sent"] == THRESHOLD
    assert summary["this_run"]["requests"]["retries"] <= THRESHOLD - 1
    assert result.output.count(f"stopping: {message}") == 1  # said once, not once a row


def test_a_closed_port_stops_the_run_at_once_naming_refused_and_the_url(
    job: JobFiles, cli: Any
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    path = job.write(articles(30), api={"base_url": url},
                     retry={"max_attempts": 6, "initial_delay_s": 60, "max_delay_s": 60})
    result = cli("run", path)
    assert_stopped_by_the_breaker(job, result, url, "the connection was refused")
    assert job.summary()["this_run"]["requests"]["retries"] == 0  # the backoff is a minute
    # Nothing is failed for good: the rows are pending, and a run against the right URL
    # sends them all.
    assert not job.failures.exists()
    assert job.summary()["requests"]["pending"] == 30


def test_https_to_a_plain_http_server_stops_the_run_naming_tls(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    url = sim.base_url.replace("http://", "https://")
    path = job.write(articles(30), api={"base_url": url})
    result = cli("run", path)
    assert_stopped_by_the_breaker(job, result, url, "the TLS handshake failed")
    assert sim.stats.requests == 0  # no request ever got through the handshake


def test_the_same_400_on_every_row_stops_the_run_after_the_threshold(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = job.write(articles(30), params={"max_tokens": 50, "n": 0})  # the server says n ≥ 1
    result = cli("run", path)
    assert_stopped_by_the_breaker(job, result, sim.base_url,
                                  "HTTP 400 (http_400): Invalid 'n': expected an integer >= 1")
    assert sim.stats.by_status == {400: THRESHOLD}
    # The rows that got the answer are in the failures file, the others pending.
    assert len(job.failed()) == THRESHOLD
    assert job.summary()["requests"]["pending"] == 30 - THRESHOLD

    # Fixed in the job file: every row's request changed, and the next run sends them all.
    path = job.write(params={"max_tokens": 50})
    assert cli("run", path).exit_code == 0
    assert len(job.results()) == 30


def test_a_proxy_answering_502_to_everything_stops_the_run(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    sim.config.faults = FaultConfig(echo_auth_status=502)
    path = job.write(articles(30))
    result = cli("run", path)
    assert_stopped_by_the_breaker(job, result, sim.base_url, "HTTP 502 (proxy_error): proxy: "
                                  "upstream refused the request")
    assert sim.stats.by_status == {502: THRESHOLD}
    assert not job.failures.exists()  # 502s are retried: the rows stay pending


def test_once_a_row_succeeded_failures_never_trip_it(job: JobFiles, sim: Simulator,
                                                     cli: Any) -> None:
    """Concurrency 1: the first row is answered, then every other row is refused 400."""
    lines = [{"id": "ok", "messages": [{"role": "user", "content": "Fine."}]}]
    lines += [{"id": f"bad{i}", "n": 0, "messages": [{"role": "user", "content": f"{i}."}]}
              for i in range(9)]
    write_jsonl(job.input, lines)
    path = job.write(limits={"concurrency": 1})
    result = cli("run", path)
    assert result.exit_code == 3, result.output
    assert sim.stats.by_status == {200: 1, 400: 9}
    assert job.summary()["stopped"] is None


def test_rows_refused_for_their_own_content_do_not_trip_it(job: JobFiles, sim: Simulator,
                                                           cli: Any) -> None:
    """A context_length_exceeded is about the row: the first six rows being too long says
    nothing about the endpoint, and the others are sent."""
    records = articles(12)
    for record in records[:6]:
        record["text"] = "__POISON__"
    path = job.write(records)
    result = cli("run", path)
    assert result.exit_code == 3, result.output
    assert sim.stats.by_status == {400: 6, 200: 6}
