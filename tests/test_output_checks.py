"""Output checks, re-asks and fallback models, against the simulator over HTTP.

The simulator spoils a seeded share of first answers (invalid JSON, truncated, content
filtered, refused, carrying a banned term) and answers a follow-up turn cleanly; a model
can be set to always fail. These tests assert on the files batchgpt writes and on what
the server saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchgpt import tokens
from batchgpt.checks import REASK_PREFIX
from batchgpt.simulator import Simulator
from batchgpt.simulator.replies import ReplyFaults
from tests.conftest import JobFiles, articles

JSON_FORMAT = {"type": "json_object"}
SENTIMENT_SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},
                   "summary": {"type": "string"}},
    "required": ["sentiment", "summary"],
    "additionalProperties": False,
}


def _bodies_by_row(sim: Simulator) -> dict[str, list[dict[str, Any]]]:
    """Requests the server saw, grouped by the row's first user message."""
    out: dict[str, list[dict[str, Any]]] = {}
    for body in sim.stats.bodies:
        first_user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        out.setdefault(first_user, []).append(body)
    return out


def _prompt_tokens_sent(sim: Simulator) -> int:
    return sum(tokens.prompt_tokens(b["messages"]) for b in sim.stats.bodies)


def test_invalid_json_is_reasked_and_only_the_accepted_reply_is_kept(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    sim.config.faults.replies = ReplyFaults(invalid_json_rate=1.0)
    path = job.write(articles(6), params={"max_tokens": 80, "response_format": JSON_FORMAT},
                     validate={"json": True, "max_reasks": 1})
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    results = job.results()
    assert len(results) == 6 and not job.failed()
    for line in results:  # every kept answer is the clean one
        json.loads(line["response"]["body"]["choices"][0]["message"]["content"])
    by_row = _bodies_by_row(sim)
    assert all(len(bodies) == 2 for bodies in by_row.values())
    for first, reask in by_row.values():
        assert reask["messages"][:-2] == first["messages"]
        assert reask["messages"][-2]["role"] == "assistant"
        assert reask["messages"][-1]["role"] == "user"
        assert reask["messages"][-1]["content"].startswith(REASK_PREFIX)
        assert "not valid JSON" in reask["messages"][-1]["content"]
    summary = job.summary()
    assert summary["this_run"]["reasks_by_reason"] == {"invalid_json": 6}
    # Re-asks are paid: the usage counts every request the server answered.
    assert summary["usage"]["prompt_tokens"] == _prompt_tokens_sent(sim)
    assert summary["this_run"]["requests"]["sent"] == 12
    assert "re-asks this run: invalid_json ×6" in result.output


@pytest.mark.parametrize(("fault", "validate", "reason"), [
    ("invalid_json", {"json": True}, "invalid_json"),
    ("truncated", {"finish_reasons": ["stop"]}, "truncated"),
    ("truncated", {"json": True}, "truncated"),  # cut JSON: the cause is max_tokens
    ("content_filter", {"max_chars": 10_000}, "content_filter"),
    ("refusal", {"max_chars": 10_000}, "refusal"),
    ("denied", {"deny_words": ["confidential"]}, "denied_term"),
])
def test_each_spoiled_first_answer_fails_with_its_reason_when_no_reask_is_left(
        job: JobFiles, sim: Simulator, cli: Any, fault: str, validate: dict[str, Any],
        reason: str) -> None:
    sim.config.faults.replies = ReplyFaults(**{f"{fault}_rate": 1.0})
    path = job.write(articles(3), params={"max_tokens": 80, "response_format": JSON_FORMAT},
                     validate={**validate, "max_reasks": 0})
    result = cli("run", path)
    assert result.exit_code == 3, result.output
    assert job.results() == []
    failed = job.failed()
    assert len(failed) == 3
    for line in failed:
        error = line["error"]
        assert error["code"] == "invalid_output"
        assert error["reason"] == reason
        assert error["retryable"] is False
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"  # the rejected reply
    if reason == "denied_term":
        assert {line["error"]["detail"] for line in failed} == {"confidential"}
    assert job.summary()["failed_by_code"] == {"invalid_output": 3}
    assert sim.stats.requests == 3  # no re-ask was allowed


@pytest.mark.parametrize(("validate", "reason", "detail"), [
    ({"regex": r"^NEVER"}, "regex", "^NEVER"),
    ({"max_chars": 5}, "too_long", None),
])
def test_checks_the_sandbox_never_passes_fail_with_their_reason(
        job: JobFiles, sim: Simulator, cli: Any, validate: dict[str, Any], reason: str,
        detail: str | None) -> None:
    path = job.write(articles(2), validate={**validate, "max_reasks": 0})
    assert cli("run", path).exit_code == 3
    failed = job.failed()
    assert [f["error"]["reason"] for f in failed] == [reason, reason]
    if detail is not None:
        assert failed[0]["error"]["detail"] == detail


def test_schema_reasks_exhausted_fail_the_row_with_path_schema_and_last_reply(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    # The sandbox answers json_object requests with {"sandbox", "label", "summary"}: never
    # what this schema asks for, follow-ups included.
    path = job.write(articles(2), params={"max_tokens": 80, "response_format": JSON_FORMAT},
                     validate={"json_schema": SENTIMENT_SCHEMA, "max_reasks": 2})
    result = cli("run", path)
    assert result.exit_code == 3, result.output
    assert sim.stats.requests == 2 * 3
    for bodies in _bodies_by_row(sim).values():
        first = bodies[0]
        for reask in bodies[1:]:  # each re-ask: the original messages + the last reply
            assert reask["messages"][:-2] == first["messages"]
            ask = reask["messages"][-1]["content"]
            assert "at $" in ask and '"sentiment"' in ask  # the failing path and the schema
    failed = job.failed()
    assert len(failed) == 2
    error = failed[0]["error"]
    assert (error["code"], error["reason"], error["reasks"]) == ("invalid_output", "schema", 2)
    assert error["detail"].startswith("$")
    assert "after 2 re-asks" in error["message"]
    assert json.loads(failed[0]["response"]["body"]["choices"][0]["message"]["content"])
    assert job.summary()["this_run"]["reasks_by_reason"] == {"schema": 4}

    # Such rows are retried by --retry-failed, not by a plain rerun.
    before = sim.stats.requests
    assert cli("run", path).exit_code == 3
    assert sim.stats.requests == before
    assert cli("run", path, "--retry-failed").exit_code == 3
    assert sim.stats.requests == before + 6


def test_schema_defaults_to_the_response_format_schema(job: JobFiles, sim: Simulator,
                                                       cli: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": SENTIMENT_SCHEMA,
                                                  "strict": True}}
    path = job.write(articles(4), params={"max_tokens": 80, "response_format": fmt},
                     validate={"max_reasks": 0})
    assert cli("run", path).exit_code == 0
    for line in job.results():
        answer = json.loads(line["response"]["body"]["choices"][0]["message"]["content"])
        assert set(answer) == {"sentiment", "summary"}
        assert answer["sentiment"] in ("positive", "negative", "mixed")


def test_a_chinese_deny_term_is_found_and_reasked_away(job: JobFiles, sim: Simulator,
                                                       cli: Any) -> None:
    sim.config.faults.replies = ReplyFaults(denied_rate=1.0, denied_terms=["机密"])
    deny = job.dir / "jobs" / "deny.txt"
    deny.write_text("内部资料\n机密\n", encoding="utf-8")
    records = [{"id": f"zh{i}", "text": f"第{i}篇文章报道了当地新闻。更多内容。"} for i in range(3)]
    path = job.write(records, validate={"deny_words": "deny.txt", "max_reasks": 1})
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    for line in job.results():
        assert "机密" not in line["response"]["body"]["choices"][0]["message"]["content"]
    reasks = [b["messages"][-1]["content"] for b in sim.stats.bodies
              if b["messages"][-1]["content"].startswith(REASK_PREFIX)]
    assert len(reasks) == 3 and all("'机密'" in r for r in reasks)
    assert job.summary()["this_run"]["reasks_by_reason"] == {"denied_term": 3}


def test_a_chinese_deny_term_in_every_answer_fails_the_row_naming_it(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    # The sandbox echoes the prompt's first sentence, so a term in the input is in every
    # answer, follow-ups included.
    records = [{"id": "zh1", "text": "这份机密文件不应公开。"}]
    path = job.write(records, validate={"deny_words": ["机密"], "max_reasks": 1})
    assert cli("run", path).exit_code == 3
    (failed,) = job.failed()
    assert (failed["error"]["reason"], failed["error"]["detail"]) == ("denied_term", "机密")
    assert sim.stats.requests == 2


def test_a_primary_model_that_always_fails_is_served_by_the_fallback_at_its_price(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    sim.config.faults.failing_models = {"gpt-4o-mini": 503}
    path = job.write(articles(8), fallback_models=["gpt-4.1-mini"],
                     retry={"max_attempts": 2, "initial_delay_s": 0.01, "max_delay_s": 0.02})
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    results = job.results()
    assert len(results) == 8
    assert {r["response"]["body"]["model"] for r in results} == {"gpt-4.1-mini"}
    models = [b["model"] for b in sim.stats.bodies]
    assert models.count("gpt-4o-mini") == 16  # two attempts a row, then the fallback
    assert models.count("gpt-4.1-mini") == 8
    usages = [r["response"]["body"]["usage"] for r in results]
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    expected = (prompt * 0.40 + completion * 1.60) / 1_000_000  # gpt-4.1-mini, USD per 1M
    summary = job.summary()
    assert summary["cost_usd"] == pytest.approx(expected, abs=1e-12)
    assert summary["by_model"] == {"gpt-4.1-mini": {
        "rows": 8, "usage": summary["usage"], "cost_usd": pytest.approx(expected, abs=1e-12)}}
    assert summary["this_run"]["fallbacks_by_model"] == {"gpt-4.1-mini": 8}
    assert "fallbacks this run: gpt-4.1-mini ×8" in result.output


def test_a_missing_primary_model_falls_back_and_is_not_asked_again(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    sim.config.faults.failing_models = {"gpt-4o-mini": 404}
    path = job.write(articles(40), fallback_models=["gpt-4o"], limits={"concurrency": 2})
    assert cli("run", path).exit_code == 0
    models = [b["model"] for b in sim.stats.bodies]
    assert models.count("gpt-4o") == 40
    assert models.count("gpt-4o-mini") <= 2  # those in flight before the first 404 came back
    assert job.summary()["by_model"]["gpt-4o"]["rows"] == 40


def test_invalid_output_after_its_reasks_falls_back(job: JobFiles, sim: Simulator,
                                                     cli: Any) -> None:
    sim.config.faults.replies = ReplyFaults(invalid_json_rate=1.0, only_models=["gpt-4o-mini"])
    path = job.write(articles(3), params={"max_tokens": 80, "response_format": JSON_FORMAT},
                     validate={"json": True, "max_reasks": 0}, fallback_models=["gpt-4o"])
    assert cli("run", path).exit_code == 0
    assert {r["response"]["body"]["model"] for r in job.results()} == {"gpt-4o"}
    summary = job.summary()
    # The rejected replies were paid for, at the primary's price: in by_model, without rows.
    assert summary["by_model"]["gpt-4o-mini"]["rows"] == 0
    assert summary["by_model"]["gpt-4o-mini"]["usage"]["total_tokens"] > 0
    assert summary["by_model"]["gpt-4o"]["rows"] == 3
    total = sum(m["cost_usd"] for m in summary["by_model"].values())
    assert summary["cost_usd"] == pytest.approx(total, abs=1e-12)
    assert summary["usage"]["prompt_tokens"] == _prompt_tokens_sent(sim)


def test_a_row_specific_400_does_not_fall_back(job: JobFiles, sim: Simulator, cli: Any,
                                               tmp_path: Path) -> None:
    lines = [{"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "n": 0,
                       "messages": [{"role": "user", "content": "hi"}]}}]
    path = job.write(lines, prompt=None, fallback_models=["gpt-4o"])
    assert cli("run", path).exit_code == 3
    assert [b["model"] for b in sim.stats.bodies] == ["gpt-4o-mini"]
    assert job.failed()[0]["error"]["status"] == 400


def test_authentication_failure_never_falls_back(job: JobFiles, sim: Simulator,
                                                 cli: Any) -> None:
    sim.config.faults.api_key = "sk-the-right-key-000000"
    path = job.write(articles(3), fallback_models=["gpt-4o"])
    assert cli("run", path).exit_code == 1
    assert {b["model"] for b in sim.stats.bodies} == {"gpt-4o-mini"}


@pytest.mark.parametrize(("validate", "where", "says"), [
    ({"json_schema": {"type": "objekt"}}, "validate", "not a valid JSON Schema"),
    ({"json_schema": "missing.json"}, "validate", "not found"),
    ({"deny_words": "nowhere.txt"}, "validate", "not found"),
    ({"regex": "(unclosed"}, "regex", "does not compile"),
    ({"json_schema": {"$ref": "https://example.com/s.json"}}, "validate", "never fetches"),
])
def test_a_bad_validate_block_is_a_job_file_error_before_anything_is_sent(
        job: JobFiles, sim: Simulator, cli: Any, validate: dict[str, Any], where: str,
        says: str) -> None:
    path = job.write(articles(2), validate=validate)
    text = path.read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if t.lstrip().startswith(f"{where}:"))
    for args in (("run", path, "--dry-run"), ("run", path)):
        result = cli(*args)
        assert result.exit_code == 1, result.output
        assert f"{path}:" in result.output and says in result.output
        assert f":{line}:" in result.output or f":{line + 1}:" in result.output
    assert sim.stats.requests == 0
    assert not job.output.exists()


def test_a_capped_job_refuses_an_unpriced_fallback_model(job: JobFiles, sim: Simulator,
                                                         cli: Any) -> None:
    path = job.write(articles(2), fallback_models=["my-local-llama"],
                     limits={"max_cost_usd": 1.0})
    result = cli("run", path)
    assert result.exit_code == 1
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1)
                if "my-local-llama" in t)
    assert f"{path}:{line}: limits.max_cost_usd is set but the price of model " \
        "'my-local-llama' is unknown" in result.output
    assert sim.stats.requests == 0


def test_sandbox_options_spoil_first_answers_from_the_command_line(job: JobFiles, cli: Any,
                                                                   ) -> None:
    path = job.write(articles(4), params={"max_tokens": 80, "response_format": JSON_FORMAT},
                     validate={"json": True, "max_reasks": 1},
                     fallback_models=["gpt-4o"])
    result = cli("run", path, "--sandbox", "--sandbox-faults", "invalid_json=1.0",
                 "--sandbox-fail-model", "gpt-4o-mini=503")
    assert result.exit_code == 0, result.output
    assert {r["response"]["body"]["model"] for r in job.results()} == {"gpt-4o"}
    assert job.summary()["this_run"]["reasks_by_reason"] == {"invalid_json": 4}
    bad = cli("run", path, "--sandbox", "--sandbox-faults", "nonsense=2")
    assert bad.exit_code == 2 and "invalid_json" in bad.output


@pytest.mark.parametrize("extra", [{"validate": {"json": True}},
                                   {"fallback_models": ["gpt-4o"]}])
def test_checks_and_fallbacks_are_refused_in_batch_mode_naming_the_key(
        job: JobFiles, sim: Simulator, cli: Any, extra: dict[str, Any]) -> None:
    path = job.write(articles(2), mode="batch", **extra)
    result = cli("run", path, "--dry-run")
    assert result.exit_code == 1
    (key,) = extra
    assert f"{key} works in online mode only" in result.output
    assert sim.stats.requests == 0


def test_a_catastrophic_regex_rejects_the_reply_instead_of_blocking_the_run(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    # (a|aa)+$ backtracks exponentially on a run of a's that ends otherwise; the sandbox
    # echoes the prompt, so the reply holds one. The stdlib's re would block the event
    # loop (and signals) for ages; the search gives up after PATTERN_TIMEOUT_S.
    records = [{"id": "slow", "text": "a" * 60 + "!"}]
    path = job.write(records, prompt="{text}", validate={"regex": "(a|aa)+$", "max_reasks": 0})
    result = cli("run", path)
    assert result.exit_code == 3, result.output
    (failed,) = job.failed()
    assert failed["error"]["reason"] == "regex"
    assert "could not be matched" in failed["error"]["message"]
    assert "simplify it" in result.output


def test_a_catastrophic_schema_pattern_rejects_the_reply_instead_of_blocking_the_run(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    schema = {"type": "object", "properties": {"summary": {"type": "string",
                                                           "pattern": "^(a|aa)+$"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    records = [{"id": "slow", "text": "a" * 60 + "!"}]
    path = job.write(records, prompt="{text}", params={"max_tokens": 200, "response_format": fmt},
                     validate={"max_reasks": 0})
    assert cli("run", path).exit_code == 3
    (failed,) = job.failed()
    assert failed["error"]["reason"] == "schema"
    assert "could not be matched" in failed["error"]["message"]
