"""The output checks and the fallback decision as pure functions: a reply and its request
in, a reason (or None) out; a failure and its decision in, fall back or not out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batchgpt.checks import Checks, DenyList, Reason, reask_messages
from batchgpt.config import JobConfig, ValidateSettings
from batchgpt.retry import Action, Decision, Failure, Kind, fallback_chain, falls_back

REQUEST: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "q"}]}


def reply(content: str | None, finish: str = "stop", refusal: str | None = None
          ) -> dict[str, Any]:
    return {"object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": finish,
        "message": {"role": "assistant", "content": content, "refusal": refusal}}]}


def checks(**settings: Any) -> Checks:
    job = JobConfig.model_validate({"input": "i.jsonl", "output": "o.jsonl",
                                    "validate": settings})
    built = Checks.for_job(job)
    assert built is not None
    return built


def test_a_job_without_validate_has_no_checks() -> None:
    job = JobConfig.model_validate({"input": "i.jsonl", "output": "o.jsonl"})
    assert Checks.for_job(job) is None


@pytest.mark.parametrize(("settings", "body", "reason"), [
    ({}, reply("x", finish="content_filter"), Reason.CONTENT_FILTER),
    ({}, reply(None, refusal="I can't"), Reason.REFUSAL),
    ({"finish_reasons": ["stop"]}, reply("x", finish="length"), Reason.TRUNCATED),
    ({"finish_reasons": ["stop"]}, reply("x", finish="tool_calls"), Reason.FINISH_REASON),
    ({"max_chars": 3}, reply("four"), Reason.TOO_LONG),
    ({"json": True}, reply('{"a": '), Reason.INVALID_JSON),
    ({"json": True}, reply('{"a": ', finish="length"), Reason.TRUNCATED),
    ({"json_schema": {"type": "object", "required": ["a"]}}, reply("{}"), Reason.SCHEMA),
    ({"regex": r"^\d+$"}, reply("abc"), Reason.REGEX),
    ({"deny_words": ["Secret"]}, reply("a SECRET plan"), Reason.DENIED_TERM),
])
def test_each_check_rejects_with_its_reason(settings: dict[str, Any], body: dict[str, Any],
                                            reason: Reason) -> None:
    rejection = checks(**settings).judge(body, REQUEST)
    assert rejection is not None and rejection.reason is reason


@pytest.mark.parametrize(("settings", "content"), [
    ({"json": True}, '{"a": 1}'),
    ({"json_schema": {"type": "object", "required": ["a"]}}, '{"a": 1}'),
    ({"regex": r"^\d+$"}, "123"),
    ({"deny_words": ["secret"]}, "nothing to hide"),
    ({"max_chars": 4}, "four"),
])
def test_a_reply_that_passes_is_accepted(settings: dict[str, Any], content: str) -> None:
    assert checks(**settings).judge(reply(content), REQUEST) is None


def test_json_is_implied_by_the_request_response_format_only_when_not_turned_off() -> None:
    request = {**REQUEST, "response_format": {"type": "json_object"}}
    assert checks(max_chars=100).judge(reply("not json"), request) is not None
    assert checks(json=False).judge(reply("not json"), request) is None


def test_a_rows_own_response_format_schema_is_checked() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    request = {**REQUEST, "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "x", "schema": schema}}}
    rejection = checks(max_reasks=0).judge(reply('{"n": "one"}'), request)
    assert rejection is not None and rejection.reason is Reason.SCHEMA
    assert rejection.detail == "$.n"


def test_every_choice_must_pass() -> None:
    body = reply("ok")
    body["choices"].append({"index": 1, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "a secret"}})
    assert checks(deny_words=["secret"]).judge(body, REQUEST) is not None


def test_deny_list_is_case_insensitive_and_needs_no_word_boundaries() -> None:
    deny = DenyList(["机密", "Straße", "top secret"])
    assert deny.find("这是机密文件") == "机密"
    assert deny.find("STRASSE") == "Straße"  # casefolded on both sides
    assert deny.find("a TOP SECRET memo") == "top secret"
    assert deny.find("nothing here") is None
    assert DenyList([]).find("anything") is None


def test_a_reask_quotes_the_rejected_reply_the_problem_and_the_schema() -> None:
    schema = {"type": "object", "required": ["a"]}
    c = checks(json_schema=schema)
    rejected = reply("{}")
    rejection = c.judge(rejected, REQUEST)
    assert rejection is not None
    messages = reask_messages(REQUEST["messages"], rejected, rejection, c.schema)
    assert messages[:1] == REQUEST["messages"]
    assert messages[1] == {"role": "assistant", "content": "{}"}
    ask = messages[2]["content"]
    assert messages[2]["role"] == "user"
    assert "'a' is a required property" in ask and json.dumps(schema) in ask


def test_a_refusal_is_quoted_back_as_the_assistant_turn() -> None:
    rejected = reply(None, refusal="I can't help")
    rejection = checks().judge(rejected, REQUEST)
    assert rejection is not None
    messages = reask_messages(REQUEST["messages"], rejected, rejection, None)
    assert messages[1]["content"] == "I can't help"


def test_validate_settings_reject_contradictions() -> None:
    with pytest.raises(ValueError, match="schema needs JSON"):
        ValidateSettings.model_validate({"json": False, "json_schema": {"type": "object"}})
    with pytest.raises(ValueError, match="empty"):
        ValidateSettings.model_validate({"deny_words": ["ok", " "]})


@pytest.mark.parametrize(("failure", "decision", "expected"), [
    (Failure(Kind.HTTP, "gone", 404, "model_not_found"), Decision(Action.STOP_RUN), True),
    (Failure(Kind.HTTP, "long", 400, "context_length_exceeded"), Decision(Action.FAIL_ROW),
     True),
    (Failure(Kind.HTTP, "filtered", 400, "content_filter"), Decision(Action.FAIL_ROW), True),
    (Failure(Kind.HTTP, "down", 503), Decision(Action.FAIL_ROW, transient=True), True),
    (Failure(Kind.TIMEOUT, "slow"), Decision(Action.FAIL_ROW, transient=True), True),
    (Failure(Kind.CONNECTION, "reset"), Decision(Action.FAIL_ROW, transient=True), True),
    (Failure(Kind.HTTP, "down", 503), Decision(Action.RETRY), False),  # retries come first
    (Failure(Kind.HTTP, "key", 401), Decision(Action.STOP_RUN), False),
    (Failure(Kind.HTTP, "quota", 429, "insufficient_quota"), Decision(Action.STOP_RUN), False),
    (Failure(Kind.HTTP, "bad n", 400, "invalid_value"), Decision(Action.FAIL_ROW), False),
    (Failure(Kind.HTTP, "limit", 429), Decision(Action.FAIL_ROW, transient=True), False),
])
def test_which_failures_fall_back(failure: Failure, decision: Decision,
                                  expected: bool) -> None:
    assert falls_back(failure, decision) is expected


def test_the_fallback_chain_skips_missing_models_but_never_the_last() -> None:
    assert fallback_chain("a", ["b", "c"], set()) == ["a", "b", "c"]
    assert fallback_chain("a", ["a", "b"], set()) == ["a", "b"]  # not twice
    assert fallback_chain("a", ["b", "c"], {"a", "b"}) == ["c"]
    assert fallback_chain("a", ["b"], {"a", "b"}) == ["b"]
    assert fallback_chain("a", [], {"a"}) == ["a"]
