"""Getting data in (issue 10): ids under another name, the job file's mistakes reported once
against the job file, and YAML syntax errors in plain words.

Every test runs ``batchgpt run`` through the CLI against the simulator; the ``cli`` fixture
also checks that no traceback reaches the terminal."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest

from batchgpt.config import JobConfig
from batchgpt.params import (
    EXTRA_PARAMS,
    KNOWN_PARAMS,
    known_params,
    param_suggestion,
    priced_model_suggestion,
)
from batchgpt.simulator import Simulator
from batchgpt.source import InputFile, RowBuilder
from tests.conftest import JobFiles, articles, user_texts


def key_line(job: JobFiles, key: str) -> int:
    """The 1-based line of ``key:`` in the job file as written."""
    lines = job.job_path.read_text(encoding="utf-8").splitlines()
    return next(i for i, text in enumerate(lines, start=1) if text.strip().startswith(f"{key}:"))


def refused(cli: Any, path: Path, sim: Simulator) -> str:
    """Run the job: exit 1, nothing sent; the output, for what it says."""
    result = cli("run", path)
    assert result.exit_code == 1, result.output
    assert sim.stats.requests == 0
    output: str = result.output
    return output


def custom_ids(job: JobFiles) -> list[str]:
    return sorted(r["custom_id"] for r in job.results())


TICKETS = [{"ticket_id": "T-1", "text": "Printer on fire."},
           {"ticket_id": 2, "text": "Password reset, again."}]
ORDERS = [{"shop": "acme", "sku": 17, "messages": [{"role": "user", "content": "Where is it?"}],
           "temperature": 0.1},
          {"shop": "acme", "sku": 18, "messages": [{"role": "user", "content": "Refund."}]},
          {"shop": "bolt", "sku": 17, "messages": [{"role": "user", "content": "Thanks."}]}]


# -- 1. ids under another name ----------------------------------------------------------------
def test_id_field_names_the_field_that_holds_each_records_id(job: JobFiles, sim: Simulator,
                                                             cli: Any) -> None:
    path = job.write(TICKETS, id_field="ticket_id")
    assert cli("run", path).exit_code == 0
    assert custom_ids(job) == ["2", "T-1"]
    # stable: a rerun finds every row done and sends nothing
    again = cli("run", path)
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert sim.stats.requests == 2


def test_id_template_makes_each_chat_lines_id_from_its_fields(job: JobFiles, sim: Simulator,
                                                              cli: Any) -> None:
    assert cli("run", job.write(ORDERS, id="{shop}-{sku}")).exit_code == 0
    assert custom_ids(job) == ["acme-17", "acme-18", "bolt-17"]
    # the fields the id is made of are not request parameters; the line's others are
    sent = {b["messages"][-1]["content"]: b for b in sim.stats.bodies}
    assert not any("shop" in b or "sku" in b for b in sent.values())
    assert sent["Where is it?"]["temperature"] == 0.1


def test_id_template_has_prompt_rules_and_literal_braces(job: JobFiles, sim: Simulator,
                                                         cli: Any) -> None:
    records = [{"shop": "acme", "sku": 7, "text": "x"}]
    assert cli("run", job.write(records, id="{{{shop}}}/{sku}")).exit_code == 0
    assert custom_ids(job) == ["{acme}/7"]


def test_a_line_without_the_id_field_or_with_an_empty_id_is_a_line_error(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = job.write([*TICKETS, {"text": "no ticket"}, {"ticket_id": " ", "text": "blank"}],
                     id_field="ticket_id")
    out = refused(cli, path, sim)
    assert "input.jsonl:3: record without 'ticket_id', the job's id_field" in out
    assert "input.jsonl:4: 'ticket_id' is empty" in out

    path = job.write([{"shop": "", "sku": "", "text": "x"}, {"shop": "a", "text": "y"},
                      {"shop": "a", "sku": "1", "text": "z"}], id="{shop}{sku}", id_field=None)
    out = refused(cli, path, sim)
    assert "input.jsonl:1: the id is empty: the job's id template '{shop}{sku}' gives ''" in out
    assert "input.jsonl:2: missing field 'sku' used by the job's id" in out


def test_ids_made_by_a_template_must_be_unique(job: JobFiles, sim: Simulator,
                                               cli: Any) -> None:
    out = refused(cli, job.write(ORDERS, id="{sku}"), sim)
    assert "input.jsonl:3: duplicate id '17' (first on line 1)" in out


def test_id_and_id_field_together_are_a_job_file_error(job: JobFiles, sim: Simulator,
                                                       cli: Any) -> None:
    path = job.write(TICKETS, id_field="ticket_id", id="{ticket_id}")
    out = refused(cli, path, sim)
    assert f"job.yaml:{key_line(job, 'id')}: id and id_field are mutually exclusive" in out


def test_batch_api_lines_keep_their_custom_id(job: JobFiles, sim: Simulator, cli: Any) -> None:
    line = {"custom_id": "b-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Hi."}]}}
    assert cli("run", job.write([line], id_field="ticket_id")).exit_code == 0
    assert custom_ids(job) == ["b-1"]


@pytest.mark.parametrize("id_rule", [{"id_field": "ticket_id"}, {"id": "{ticket_id}"}])
def test_naming_the_id_changes_no_request_hash(tmp_path: Path, id_rule: dict[str, str]) -> None:
    # The digest pinned in tests/test_input_forms.py for this record with the id in 'id':
    # the id is not part of the request, so where it comes from changes nothing sent.
    path = tmp_path / "in.jsonl"
    text = "Article number 1 reports on local news. More text here."
    path.write_text(json.dumps({"ticket_id": "a0001", "text": text}) + "\n")
    job = JobConfig.model_validate({
        "input": path, "output": tmp_path / "out.jsonl", "model": "gpt-4o-mini",
        "prompt": "Summarize: {text}", "params": {"max_tokens": 50}, **id_rule})
    (scanned,) = InputFile(job).scan()  # the template splice
    row = RowBuilder(job).build({"ticket_id": "a0001", "text": text}, 1)  # the full request
    assert scanned.custom_id == row.custom_id == "a0001"
    assert scanned.request_hash == row.request_hash == "cc846f0e2b15cc33e224f0db501dbdd0"


# -- 2. the job file's mistakes, once, against the job file -----------------------------------
def test_prompt_field_no_record_has_is_one_job_file_error_with_did_you_mean(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = job.write(articles(80), prompt="Summarize: {txt}")
    out = refused(cli, path, sim)
    assert (f"job.yaml:{key_line(job, 'prompt')}: prompt uses {{txt}}, but no record in "
            f"{job.input} has a field 'txt'; did you mean 'text'?") in out
    assert out.count("'txt'") == 1  # once, not once per line
    assert "input.jsonl:" not in out


def test_prompt_field_some_records_have_stays_a_problem_of_the_others(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    records = [{"id": "a", "title": "T", "text": "x"}, {"id": "b", "text": "y"},
               {"id": "c", "text": "z"}]
    out = refused(cli, job.write(records, prompt="{title}: {text}"), sim)
    assert "input.jsonl:2: missing field 'title' used by the job's prompt" in out
    assert "input.jsonl:3: missing field 'title' used by the job's prompt" in out
    assert "job.yaml" not in out


def test_job_file_mistake_comes_with_the_inputs_other_problems(job: JobFiles, sim: Simulator,
                                                               cli: Any) -> None:
    path = job.write([*articles(3), "{broken", *articles(2, start=1)], prompt="{txt}")
    out = refused(cli, path, sim)
    lines = out.strip().splitlines()
    assert "job.yaml:" in lines[0] and "did you mean 'text'?" in lines[0]
    assert f"{job.input}:4: invalid JSON" in out
    assert "missing field" not in out


def test_no_model_and_no_line_naming_one_is_one_job_file_error(job: JobFiles, sim: Simulator,
                                                               cli: Any) -> None:
    job.config.pop("model")
    out = refused(cli, job.write(articles(80)), sim)
    assert (f"job.yaml: no model: set `model:` in the job file; no line of {job.input} "
            "names one") in out
    assert out.count("no model") == 1


def test_no_model_in_the_job_and_some_lines_without_one_are_line_errors(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    job.config.pop("model")
    lines = [{**ORDERS[0], "id": "o1", "model": "gpt-4o-mini"}, {**ORDERS[1], "id": "o2"}]
    out = refused(cli, job.write(lines), sim)
    assert "input.jsonl:2: no model: set `model` in the job file or in the line's body" in out
    assert "job.yaml" not in out


def test_params_name_close_to_a_known_parameter_is_a_job_file_error(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = job.write(articles(3), params={"temperature": 0.2, "max_token": 100})
    out = refused(cli, path, sim)
    line = key_line(job, "max_token")
    assert (f"job.yaml:{line}: params.max_token is not a ChatCompletion parameter; did you "
            "mean 'max_tokens'?") in out
    assert out.count("params.max_token ") == 1


def test_params_name_close_to_no_known_parameter_is_sent_as_written(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    params = {"max_tokens": 20, "top_k": 40, "repetition_penalty": 1.1, "my_server_flag": True}
    assert cli("run", job.write(articles(1), params=params)).exit_code == 0
    (body,) = sim.stats.bodies
    assert {k: body[k] for k in params} == params


def test_literal_brace_hint_shows_doubled_braces(job: JobFiles, sim: Simulator,
                                                 cli: Any) -> None:
    out = refused(cli, job.write(articles(1), prompt='Reply with {"label": ...} for {text}'), sim)
    assert (f"job.yaml:{key_line(job, 'prompt')}: prompt: '{{\"label\": ...}}' is not a "
            "field name") in out
    assert "{{ and }} stand for literal braces" in out
    assert 'double them: {{"label": ...}}' in out
    # and with the hint followed, the braces are sent as written
    fixed = job.write(prompt='Reply with {{"label": ...}} for {text}')
    assert cli("run", fixed).exit_code == 0
    assert user_texts(sim)[0].startswith('Reply with {"label": ...} for Article number 1')


def test_model_name_close_to_a_priced_one_with_a_budget_is_a_job_file_error(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = job.write(articles(2), model="gpt4o-mini", limits={"max_cost_usd": 1})
    out = refused(cli, path, sim)
    assert (f"job.yaml:{key_line(job, 'model')}: limits.max_cost_usd is set but the price of "
            "model 'gpt4o-mini' is unknown: did you mean 'gpt-4o-mini'?") in out
    assert out.count("gpt4o-mini") == 1


def test_model_name_close_to_a_priced_one_without_a_budget_warns_once(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    result = cli("run", job.write(articles(2), model="gpt-4o-mni"))
    assert result.exit_code == 0, result.output
    warning = (f"job.yaml:{key_line(job, 'model')}: the price of model 'gpt-4o-mni' is "
               "unknown; did you mean 'gpt-4o-mini'?")
    assert result.output.count(warning) == 1
    # The end-of-run table says why the cost is unknown the same way, not "add pricing".
    assert "cost unknown for 'gpt-4o-mni' (did you mean 'gpt-4o-mini'?)" in result.output
    assert "add a `pricing:` block" not in result.output
    assert sim.stats.requests == 2


def test_a_model_name_with_another_number_is_another_model_not_a_typo() -> None:
    assert priced_model_suggestion("gpt4o-mini") == "gpt-4o-mini"
    assert priced_model_suggestion("openai/GPT-4o-Mini-2024-07-18") == "gpt-4o-mini"
    for other in ("o1", "gpt-4.5", "o3-pro", "gpt-5.1", "my-local-llama"):
        assert priced_model_suggestion(other) is None, other


def test_known_parameters_are_the_openai_sdks() -> None:
    from openai.types.chat import completion_create_params as sdk

    names: set[str] = set()
    for kind in typing.get_args(sdk.CompletionCreateParams):
        names |= set(kind.__required_keys__) | set(kind.__optional_keys__)
    assert names <= known_params()  # a newer SDK's parameters are read from it
    assert all(param_suggestion(name) is None for name in names)
    assert {"model", "messages", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
            "max_tokens", "max_completion_tokens", "n", "presence_penalty", "response_format",
            "seed", "service_tier", "stop", "stream", "stream_options", "temperature", "top_p",
            "tools", "tool_choice", "parallel_tool_calls", "user", "reasoning_effort",
            "modalities", "audio", "prediction", "store", "metadata", "web_search_options",
            "verbosity"} <= KNOWN_PARAMS  # without the SDK's types, these at least


def test_extra_parameters_of_compatible_servers_are_never_taken_for_typos() -> None:
    assert [name for name in sorted(EXTRA_PARAMS) if param_suggestion(name)] == []
    assert param_suggestion("top_k") is None  # one letter from top_p, and vLLM's own
    assert param_suggestion("temprature") == "temperature"
    assert param_suggestion("maxTokens") == "max_tokens"
    assert param_suggestion("response-format") == "response_format"


# -- 3. YAML syntax errors in plain words -----------------------------------------------------
HEAD = "name: job\ninput: ../data/input.jsonl\noutput: ../out/job.jsonl\nmodel: gpt-4o-mini\n"


@pytest.mark.parametrize(("tail", "expected"), [
    ("limits:\n  concurrency: 4\n\trpm: 5\n",
     "job.yaml:7:1: a tab character; YAML indents with spaces"),
    ('prompt: "Summarize {text}\nsystem: x\n',
     'job.yaml:5:9: this quoted value is never closed: its closing " is missing'),
    ("limits:\n  rpm: 5\n tpm: 6\n",
     "job.yaml:7:2: the indentation of this line matches no key above it"),
    ("system: Note: be brief\n",
     "job.yaml:5:13: a ': ' inside a value; put the value in quotes"),
    ('prompt: "Reply with {"label": ...}"\n',
     'job.yaml:5:23: text after the closing ": a quoted value ends at its closing quote'),
    ("params: {max_tokens: 5\n",
     "job.yaml:5:9: this '{' is never closed with '}'"),
    ("id: {shop}-{sku}\n",
     "job.yaml:5:11: text after a closing '}'"),
], ids=["tab", "unclosed-quote", "bad-indentation", "colon-in-value", "quote-in-quotes",
        "unclosed-brace", "unquoted-template"])
def test_yaml_syntax_error_names_line_and_column_in_plain_words(
    job: JobFiles, sim: Simulator, cli: Any, tail: str, expected: str
) -> None:
    job.write(articles(1))
    job.job_path.write_text(HEAD + tail, encoding="utf-8")
    out = refused(cli, job.job_path, sim)
    assert expected in out
    assert len(out.strip().splitlines()) == 1
    assert "while scanning" not in out and "while parsing" not in out
