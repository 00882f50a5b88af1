"""Adversarial review of issue 11 (output checks, re-asks, fallback models): each test is a
defect found by attacking the change through the CLI and the simulator over HTTP."""

from __future__ import annotations

import json
from typing import Any

from batchgpt.simulator import Simulator
from batchgpt.simulator.replies import ReplyFaults
from tests.conftest import JobFiles, articles

JSON_FORMAT = {"type": "json_object"}


def _one_reply(message: dict[str, Any], finish: Any = "stop") -> dict[str, Any]:
    """A reply_patch that makes every answer hold this one message."""
    return {"choices": [{"index": 0, "message": {"role": "assistant", **message},
                         "finish_reason": finish, "logprobs": None}]}


def _line_of(text: str, key: str) -> int:
    return next(i for i, t in enumerate(text.splitlines(), 1) if t.lstrip().startswith(key))


# -- the deny list ----------------------------------------------------------------------------
def test_a_deny_term_written_with_json_unicode_escapes_is_found(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    # The sandbox answers json_object requests with json.dumps' default ensure_ascii, as
    # many servers and models do: 机密 arrives as \u673a\u5bc6, and any JSON reader of the
    # output gets the term back.
    records = [{"id": "zh1", "text": "这份机密文件不应公开。"}]
    path = job.write(records, params={"max_tokens": 80, "response_format": JSON_FORMAT},
                     validate={"deny_words": ["机密"], "max_reasks": 0})
    assert cli("run", path).exit_code == 3
    assert job.results() == []
    (failed,) = job.failed()
    assert (failed["error"]["reason"], failed["error"]["detail"]) == ("denied_term", "机密")


def test_a_deny_term_in_tool_call_arguments_is_found(job: JobFiles, sim: Simulator,
                                                     cli: Any) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "classify", "arguments": '{"label": "CONFIDENTIAL memo"}'}}
    sim.config.faults.reply_patch = _one_reply({"content": None, "tool_calls": [call]},
                                               "tool_calls")
    path = job.write(articles(1), validate={"deny_words": ["confidential"], "max_reasks": 0})
    assert cli("run", path).exit_code == 3
    assert job.results() == []
    assert job.failed()[0]["error"]["reason"] == "denied_term"


# -- odd replies ------------------------------------------------------------------------------
def test_a_reply_nested_too_deeply_to_parse_is_invalid_json_not_an_internal_error(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    sim.config.faults.reply_patch = _one_reply({"content": "[" * 100_000 + "]" * 100_000})
    path = job.write(articles(2), validate={"json": True, "max_reasks": 0})
    result = cli("run", path)
    assert result.exit_code == 3, result.output
    assert [f["error"]["reason"] for f in job.failed()] == ["invalid_json", "invalid_json"]


def test_a_reply_nested_deeper_than_a_recursive_schema_can_check_is_rejected_not_a_crash(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    schema = {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
              "$ref": "#/$defs/n"}
    sim.config.faults.reply_patch = _one_reply({"content": "[" * 600 + "]" * 600})
    path = job.write(articles(2), validate={"json_schema": schema, "max_reasks": 0})
    result = cli("run", path)
    assert result.exit_code == 3, result.output
    assert [f["error"]["reason"] for f in job.failed()] == ["schema", "schema"]


# -- the job file -----------------------------------------------------------------------------
def test_a_schema_file_nested_too_deeply_is_a_job_file_error_with_its_line(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    for depth in (100_000, 900):  # past json's recursion limit; past jsonschema's
        (job.dir / "jobs" / "deep.json").write_text('{"items":' * depth + "{}" + "}" * depth)
        path = job.write(articles(1), validate={"json_schema": "deep.json"})
        line = _line_of(path.read_text(), "json_schema:")
        result = cli("run", path, "--dry-run")
        assert result.exit_code == 1, result.output
        assert f"{path}:{line}: validate.json_schema" in result.output
        assert "nested too deeply" in result.output
    assert sim.stats.requests == 0


def test_a_bad_schema_in_response_format_is_an_error_at_its_own_line_and_name(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    path = job.write(articles(1), params={"max_tokens": 50, "response_format": fmt},
                     validate={"max_reasks": 0})
    line = _line_of(path.read_text(), "response_format:")
    result = cli("run", path, "--dry-run")
    assert result.exit_code == 1, result.output
    assert f"{path}:{line}: params.response_format.json_schema.schema is not a valid " \
        "JSON Schema" in result.output
    assert "validate.json_schema" not in result.output


def test_a_deny_term_that_is_not_text_is_an_error_naming_the_item(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(1), validate={"deny_words": ["ok", 12]})
    result = cli("run", path, "--dry-run")
    assert result.exit_code == 1, result.output
    assert "validate.deny_words[1]" in result.output
    # not pydantic's union branches, nor advice to quote the list as text
    assert "list[str]" not in result.output and "deny_words.str" not in result.output


def test_a_json_schema_that_is_neither_a_mapping_nor_a_path_is_one_clear_error(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(1), validate={"json_schema": ["not", "a", "schema"]})
    result = cli("run", path, "--dry-run")
    assert result.exit_code == 1, result.output
    assert "validate.json_schema" in result.output
    assert "dict[str,any]" not in result.output and "json_schema.str" not in result.output


# -- the summary ------------------------------------------------------------------------------
def test_a_reask_the_budget_refuses_is_not_counted_as_a_reask(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    sim.config.faults.replies = ReplyFaults(invalid_json_rate=1.0)
    path = job.write(articles(1), params={"max_tokens": 80, "response_format": JSON_FORMAT},
                     validate={"json": True, "max_reasks": 2},
                     limits={"max_cost_usd": 0.00006, "concurrency": 1})
    assert cli("run", path).exit_code == 4  # the budget stops the run before the re-ask
    assert sim.stats.requests == 1
    assert job.summary()["this_run"]["reasks_by_reason"] == {}


def test_a_fallback_the_budget_refuses_is_not_counted_as_a_fallback(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    sim.config.faults.failing_models = {"gpt-4o-mini": 503}
    path = job.write(articles(1), fallback_models=["gpt-4o"],
                     limits={"max_cost_usd": 0.0002, "concurrency": 1},
                     retry={"max_attempts": 1, "initial_delay_s": 0.01, "max_delay_s": 0.02})
    assert cli("run", path).exit_code == 4  # gpt-4o's worst case does not fit the cap
    assert [b["model"] for b in sim.stats.bodies] == ["gpt-4o-mini"]
    assert job.summary()["this_run"]["fallbacks_by_model"] == {}


def test_json_reply_is_kept_when_its_escapes_hold_no_denied_term(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    # The escape-aware deny check must not reject what it should accept.
    records = [{"id": "zh1", "text": "这份文件可以公开。"}]
    path = job.write(records, params={"max_tokens": 80, "response_format": JSON_FORMAT},
                     validate={"deny_words": ["机密"], "max_reasks": 0})
    assert cli("run", path).exit_code == 0
    (line,) = job.results()
    assert "\\u" in line["response"]["body"]["choices"][0]["message"]["content"]
    assert json.loads(line["response"]["body"]["choices"][0]["message"]["content"])


# -- fallbacks --------------------------------------------------------------------------------
def test_a_404_without_the_model_not_found_code_falls_back(job: JobFiles, sim: Simulator,
                                                            cli: Any) -> None:
    # Azure (DeploymentNotFound), vLLM, Ollama and proxies answer a missing model with a
    # 404 that has no model_not_found code; the issue names "model_not_found/404".
    sim.config.faults.echo_auth_status = 404  # every request, every model: 404
    path = job.write(articles(1), fallback_models=["gpt-4o"])
    result = cli("run", path, "--verbose")
    assert result.exit_code == 3, result.output
    assert "sk-test-key" not in result.output
    assert [b["model"] for b in sim.stats.bodies] == ["gpt-4o-mini", "gpt-4o"]
    (failed,) = job.failed()
    assert failed["error"]["status"] == 404
    assert "sk-test-key" not in job.failures.read_text()
    assert job.summary()["this_run"]["fallbacks_by_model"] == {"gpt-4o": 1}


def test_an_invalid_url_404_never_falls_back(job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(1), fallback_models=["gpt-4o"],
                     api={"base_url": sim.base_url + "/nowhere"})
    assert cli("run", path).exit_code == 1
    assert job.summary()["this_run"]["fallbacks_by_model"] == {}


# -- n > 1 ------------------------------------------------------------------------------------
def test_a_reask_quotes_the_choice_that_was_rejected(job: JobFiles, sim: Simulator,
                                                     cli: Any) -> None:
    sim.config.faults.reply_patch = {"choices": [
        {"index": 0, "message": {"role": "assistant", "content": "a fine answer"},
         "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "a CONFIDENTIAL answer"},
         "finish_reason": "stop"}]}
    path = job.write(articles(1), params={"max_tokens": 50, "n": 2},
                     validate={"deny_words": ["confidential"], "max_reasks": 1})
    assert cli("run", path).exit_code == 3
    _first, reask = sim.stats.bodies
    assert reask["messages"][-2] == {"role": "assistant", "content": "a CONFIDENTIAL answer"}


def test_a_finish_reason_that_is_not_text_is_rejected_not_an_internal_error(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    sim.config.faults.reply_patch = _one_reply({"content": "hi"}, ["stop"])
    path = job.write(articles(2), validate={"finish_reasons": ["stop"], "max_reasks": 0})
    result = cli("run", path)
    assert result.exit_code == 3, result.output
    assert [f["error"]["reason"] for f in job.failed()] == ["finish_reason", "finish_reason"]


def test_json_false_turns_off_the_schema_taken_from_response_format(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    # validate.json: false says "do not check the reply as JSON", even when the request
    # asks for it; the schema the checks would take from response_format goes with it.
    sim.config.faults.replies = ReplyFaults(invalid_json_rate=1.0)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"summary": {"type": "string"}}}}}
    path = job.write(articles(2), params={"max_tokens": 80, "response_format": fmt},
                     validate={"json": False, "max_chars": 10_000, "max_reasks": 0})
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert len(job.results()) == 2
