"""The three input forms: how a line's form is told (``input_format``, or ``auto`` by its
keys), that one file holds one form, how a template is rendered, and that the request
hash of every input valid before these rules is the one it always was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchgpt.config import JobConfig
from batchgpt.simulator import Simulator
from batchgpt.source import InputFile, RowBuilder, request_hash
from tests.conftest import JobFiles, user_texts

BATCH = {"custom_id": "batch-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "Hi."}],
                  "max_tokens": 7}}
CHAT = {"id": "chat-1", "messages": [{"role": "user", "content": "One."},
                                     {"role": "assistant", "content": "Two."},
                                     {"role": "user", "content": "Three."}],
        "temperature": 0.5}
TEMPLATE = {"id": 42, "text": "Template row."}


def run_ok(cli: Any, path: Path) -> Any:
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def run_refused(cli: Any, path: Path, sim: Simulator) -> str:
    result = cli("run", path)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert sim.stats.requests == 0
    output: str = result.output
    return output


# -- each form on its own ---------------------------------------------------------------------
def test_batch_api_line_is_sent_unchanged_and_its_body_wins(job: JobFiles, sim: Simulator,
                                                             cli: Any) -> None:
    run_ok(cli, job.write([BATCH], system="Be brief."))
    (body,) = sim.stats.bodies
    assert body["model"] == "gpt-4.1-mini" and body["max_tokens"] == 7  # body wins
    assert body["messages"] == [{"role": "user", "content": "Hi."}]  # no system added
    assert [r["custom_id"] for r in job.results()] == ["batch-1"]


def test_chat_line_gets_the_job_system_and_its_own_params(job: JobFiles, sim: Simulator,
                                                          cli: Any) -> None:
    run_ok(cli, job.write([CHAT], system="Be brief."))
    (body,) = sim.stats.bodies
    assert body["temperature"] == 0.5 and body["max_tokens"] == 50
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["messages"][1:] == CHAT["messages"]
    assert [r["custom_id"] for r in job.results()] == ["chat-1"]


def test_template_record_is_rendered_through_the_prompt(job: JobFiles, sim: Simulator,
                                                        cli: Any) -> None:
    run_ok(cli, job.write([TEMPLATE], system="Be brief."))
    (body,) = sim.stats.bodies
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Summarize: Template row."}]
    assert [r["custom_id"] for r in job.results()] == ["42"]


# -- auto: a line's form by its keys ------------------------------------------------------------
def test_template_record_with_a_body_field_is_a_template_row(job: JobFiles, sim: Simulator,
                                                             cli: Any) -> None:
    records = [{"id": "e1", "subject": "Outage", "body": "Dear team, the VPN is down."},
               {"id": "e2", "subject": "Lunch", "body": "Dear team, pizza at noon."}]
    run_ok(cli, job.write(records, prompt="Classify this email.\nSubject: {subject}\n\n{body}"))
    assert sorted(user_texts(sim)) == [
        "Classify this email.\nSubject: Lunch\n\nDear team, pizza at noon.",
        "Classify this email.\nSubject: Outage\n\nDear team, the VPN is down.",
    ]
    assert sorted(r["custom_id"] for r in job.results()) == ["e1", "e2"]


@pytest.mark.parametrize("fields", [
    {"url": "https://example.com/a", "method": "GET"},
    {"custom_id": "crm-77"},  # no object 'body': not a Batch API line
    {"custom_id": "crm-77", "body": "Dear team"},
    {"messages": "a field that happens to be called messages"},
    {"messages": [{"from": "ann", "text": "hi"}]},  # no 'role': not a conversation
], ids=["url-method", "custom_id", "custom_id-string-body", "messages-string",
        "messages-without-role"])
def test_fields_named_like_batch_or_chat_keys_stay_template_fields(
    job: JobFiles, sim: Simulator, cli: Any, fields: dict[str, Any]
) -> None:
    run_ok(cli, job.write([{"id": "r1", **fields, "text": "x"}],
                          prompt="{text} | " + " | ".join(f"{{{k}}}" for k in fields)))
    (text,) = user_texts(sim)
    expected = [v if isinstance(v, str) else json.dumps(v) for v in fields.values()]
    assert text == "x | " + " | ".join(expected)
    assert [r["custom_id"] for r in job.results()] == ["r1"]


def test_mixed_forms_are_reported_naming_both_forms(job: JobFiles, sim: Simulator,
                                                    cli: Any) -> None:
    path = job.write([TEMPLATE, CHAT, {"id": 43, "text": "More."}, BATCH])
    out = run_refused(cli, path, sim)
    assert ("input.jsonl:2: a chat line (it has 'messages'), but line 1 is a template record: "
            "one file holds one form; set input_format to choose") in out
    assert ("input.jsonl:4: a Batch API line (it has 'custom_id' and an object 'body'), but "
            "line 1 is a template record: one file holds one form; set input_format to "
            "choose") in out
    assert "input.jsonl:3" not in out
    assert not job.output.exists()


def test_a_chat_file_line_with_a_message_without_role_says_why_it_is_not_chat(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    broken = {"id": "chat-2", "messages": [{"role": "user", "content": "a"}, {"content": "b"}]}
    out = run_refused(cli, job.write([CHAT, broken]), sim)
    assert ("input.jsonl:2: a template record (its 'messages[1]' has no 'role'), but line 1 is "
            "a chat line: one file holds one form") in out


def test_a_batch_file_line_whose_body_is_not_an_object_says_why(job: JobFiles, sim: Simulator,
                                                                cli: Any) -> None:
    broken = {**BATCH, "custom_id": "batch-2", "body": "oops"}
    out = run_refused(cli, job.write([BATCH, broken]), sim)
    assert ("input.jsonl:2: a template record (its 'body' is not an object), but line 1 is a "
            "Batch API line") in out


def test_the_first_valid_line_sets_the_files_form(job: JobFiles, sim: Simulator,
                                                  cli: Any) -> None:
    # line 1 is a broken template record: the file's form comes from line 2, a chat line
    path = job.write([{"text": "no id"}, CHAT, {**CHAT, "id": "chat-2"}, TEMPLATE])
    out = run_refused(cli, path, sim)
    assert "input.jsonl:1: line without 'id' (or 'custom_id' for a Batch API line)" in out
    assert "input.jsonl:3" not in out
    assert ("input.jsonl:4: a template record (no 'messages'), but line 2 is a chat line"
            in out)


def test_batch_lookalike_without_id_says_why_it_is_not_a_batch_line(job: JobFiles,
                                                                     sim: Simulator,
                                                                     cli: Any) -> None:
    out = run_refused(cli, job.write([{**BATCH, "body": ["not", "an", "object"]}]), sim)
    assert ("input.jsonl:1: line without 'id': it has 'custom_id' but its 'body' is not an "
            "object, so it is not a Batch API line") in out


# -- input_format: every line read as one form ------------------------------------------------
def test_input_format_template_reads_every_line_as_a_record(job: JobFiles, sim: Simulator,
                                                            cli: Any) -> None:
    records = [{"id": "t1", "custom_id": "x", "body": {"a": 1}, "messages": [{"role": "user"}]}]
    run_ok(cli, job.write(records, input_format="template",
                          prompt="{custom_id} {body} {messages}"))
    assert user_texts(sim) == ['x {"a": 1} [{"role": "user"}]']
    assert [r["custom_id"] for r in job.results()] == ["t1"]


def test_input_format_chat_and_batch_run_their_form(job: JobFiles, sim: Simulator,
                                                    cli: Any) -> None:
    run_ok(cli, job.write([CHAT], input_format="chat"))
    run_ok(cli, job.write([BATCH], input_format="batch"))
    assert sorted(r["custom_id"] for r in job.results()) == ["batch-1", "chat-1"]


@pytest.mark.parametrize(("input_format", "line", "expected"), [
    ("chat", TEMPLATE, "input.jsonl:1: chat line without 'messages'"),
    ("chat", {"messages": CHAT["messages"]}, "input.jsonl:1: chat line without 'id'"),
    ("batch", CHAT, "input.jsonl:1: Batch API line without 'custom_id' and 'body'"),
    ("batch", {**BATCH, "body": "x"}, "input.jsonl:1: 'body' must be a JSON object"),
    ("template", BATCH, "input.jsonl:1: template record without 'id' (input_format: template)"),
])
def test_explicit_input_format_errors_say_what_the_form_needs(
    job: JobFiles, sim: Simulator, cli: Any, input_format: str, line: dict[str, Any],
    expected: str
) -> None:
    out = run_refused(cli, job.write([line], input_format=input_format), sim)
    assert expected in out
    assert "one form" not in out


def test_an_explicit_input_format_never_reports_mixed_forms(job: JobFiles, sim: Simulator,
                                                            cli: Any) -> None:
    # as chat, the template record is a chat line without messages, not "another form"
    out = run_refused(cli, job.write([CHAT, TEMPLATE], input_format="chat"), sim)
    assert "input.jsonl:2: chat line without 'messages'" in out
    assert "one form" not in out


def test_unknown_input_format_is_a_job_file_error(job: JobFiles, sim: Simulator,
                                                  cli: Any) -> None:
    out = run_refused(cli, job.write([TEMPLATE], input_format="csv"), sim)
    assert "job.yaml:" in out and "'input_format': Input should be 'auto'" in out


# -- templates: plain substitution --------------------------------------------------------------
def test_template_values_are_inserted_verbatim(job: JobFiles, sim: Simulator,
                                               cli: Any) -> None:
    records = [{"id": "b1", "text": "{title} {0} {{x}} {text!r} %s", "n": 3,
                "tags": ["a", {"k": None}], "title": "T"}]
    run_ok(cli, job.write(records, prompt="{{literal}} {title}: {text} / {n} {tags}"))
    assert user_texts(sim) == ['{literal} T: {title} {0} {{x}} {text!r} %s / 3 '
                               '["a", {"k": null}]']


@pytest.mark.parametrize(("prompt", "expected"), [
    ("{text:{width}}", "format specs and conversions are not supported"),
    ("{text:d}", "format specs and conversions are not supported"),
    ("{text!x}", "format specs and conversions are not supported"),
    ("{text!r} / {text:.5}", "format specs and conversions are not supported"),
])
def test_prompt_that_is_not_plain_substitution_is_a_job_error(
    job: JobFiles, sim: Simulator, cli: Any, prompt: str, expected: str
) -> None:
    out = run_refused(cli, job.write([TEMPLATE], prompt=prompt), sim)
    assert expected in out


# -- request hashes: unchanged for every input valid before input_format ------------------------
# Digests computed with the code before input_format, hostile-input checks and the template
# splitter (commit 5da9213). A changed digest makes every resume send its rows again.
PINNED = [
    ("template", {"prompt": "Summarize: {text}", "params": {"max_tokens": 50}},
     {"id": "a0001", "text": "Article number 1 reports on local news. More text here."},
     "a0001", "cc846f0e2b15cc33e224f0db501dbdd0"),
    ("template-fields", {"prompt": "{title} ({year}) {{literal}}\n\n{text} {tags} {meta}",
                         "system": "You summarize.", "params": {"temperature": 0.2}},
     {"id": 7, "title": "Ünïcødé ✓ 日本", "year": 2024, "text": "a \"quoted\"\n\ttext \u2028",
      "tags": ["x", 1.5, None, True], "meta": {"b": 1, "a": [{}]}},
     "7", "883e448470edc96d99d787cb089b7bbb"),
    ("template-no-prompt",
     {"params": {"max_tokens": 5, "response_format": {"type": "json_object"}}},
     {"id": "n1", "text": "plain \U0001f600"}, "n1", "c00b8d646c9d84694389df3cb6beddd3"),
    ("chat", {"system": "Be brief.", "params": {"max_tokens": 9}},
     {"id": "c1", "messages": [{"role": "user", "content": "hi ✓"}], "temperature": 0.3,
      "metadata": {"x": 1}}, "c1", "166834c83fc89988368b2dfde3abb10b"),
    ("chat-own-system", {"system": "Be brief."},
     {"id": "c2", "messages": [{"role": "developer", "content": "dev"},
                               {"role": "user", "content": [{"type": "text", "text": "t"}]}]},
     "c2", "b408d3c69a227999ac5c76c58486afc7"),
    ("batch", {"params": {"max_tokens": 9}},
     {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
      "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "seed": 1}},
     "r1", "31b98f6be7c449f2ded67ca785c3fbca"),
]


@pytest.mark.parametrize(("config", "record", "custom_id", "digest"),
                         [case[1:] for case in PINNED], ids=[case[0] for case in PINNED])
@pytest.mark.parametrize("input_format", ["auto", "explicit"])
def test_request_hashes_of_valid_inputs_are_unchanged(
    tmp_path: Path, config: dict[str, Any], record: dict[str, Any], custom_id: str,
    digest: str, input_format: str
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    form = ("batch" if "custom_id" in record else "chat" if "messages" in record
            else "template") if input_format == "explicit" else "auto"
    job = JobConfig.model_validate({"input": path, "output": tmp_path / "out.jsonl",
                                    "model": "gpt-4o-mini", "input_format": form, **config})
    (scanned,) = InputFile(job).scan()  # the template splice, for template records
    row = RowBuilder(job).build(record, 1)  # the full request
    assert (scanned.custom_id, scanned.request_hash) == (custom_id, digest)
    assert (row.custom_id, row.request_hash, request_hash(row.body)) == (custom_id, digest,
                                                                         digest)
    assert scanned.row == row
