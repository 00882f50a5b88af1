"""Bad job files and bad input lines: exit 1, every problem as file:line, nothing sent."""

from __future__ import annotations

from typing import Any

import pytest

from batchgpt.simulator import Simulator
from tests.conftest import JobFiles, articles

GOOD = articles(3)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([GOOD[0], '{"id": "x", "text": "unterminated}', GOOD[1]],
         ["input.jsonl:2: invalid JSON"]),
        ([GOOD[0], {"id": "t1", "body_text": "no text field"}],
         ["input.jsonl:2: missing field 'text' used by the job's prompt"]),
        ([GOOD[0], GOOD[1], GOOD[0]],
         ["input.jsonl:3: duplicate id 'a0001' (first on line 1)"]),
        ([GOOD[0], ["not", "an", "object"]],
         ["input.jsonl:2: a line must be a JSON object, not list"]),
        ([{"custom_id": "b1", "method": "GET", "url": "/v1/chat/completions", "body": {}}],
         ["input.jsonl:1: 'method' must be \"POST\""]),
        ([{"custom_id": "b1", "method": "POST", "url": "/v1/embeddings",
           "body": {"messages": [{"role": "user", "content": "x"}]}}],
         ["input.jsonl:1: 'url' must be \"/v1/chat/completions\""]),
        ([{"id": "c1", "messages": []}], ["input.jsonl:1: 'messages' must be a non-empty list"]),
        ([{"id": "c1", "messages": [{"role": "robot", "content": "x"}]}],
         ["input.jsonl:1: 'messages[0].role' must be one of"]),
        ([{"text": "no id"}], ["input.jsonl:1: line without 'id'"]),
        ([{"id": "", "text": "empty id"}], ["input.jsonl:1: 'id' is empty"]),
        ([b"\xff\xfe not utf8"], ["input.jsonl:1: not UTF-8 text"]),
    ],
    ids=["invalid-json", "missing-field", "duplicate-id", "not-object", "method", "url",
         "empty-messages", "bad-role", "no-id", "empty-id", "not-utf8"],
)
def test_bad_input_line_exits_1_names_file_and_line_and_sends_nothing(
    job: JobFiles, sim: Simulator, cli: Any, lines: list[Any], expected: list[str]
) -> None:
    with job.input.open("wb") as fh:
        for line in lines:
            if isinstance(line, bytes):
                fh.write(line + b"\n")
            elif isinstance(line, str):
                fh.write(line.encode() + b"\n")
            else:
                import json

                fh.write(json.dumps(line).encode() + b"\n")
    path = job.write()
    result = cli("run", path)
    assert result.exit_code == 1, result.output
    for text in expected:
        assert text in result.output
    assert "nothing was sent" in result.output
    assert sim.stats.requests == 0
    assert not job.output.exists()


def test_missing_template_field_is_named(job: JobFiles, sim: Simulator, cli: Any) -> None:
    # 'title' is in some records, so the records without it are at fault, line by line (a
    # field no record has is the job file's mistake: tests/test_data_in.py)
    path = job.write([{"id": "a", "text": "x"}, {"id": "b", "title": 1, "text": "y"},
                      {"id": "c"}], prompt="{title}: {text}")
    result = cli("run", path)
    assert result.exit_code == 1
    assert "input.jsonl:1: missing field 'title' used by the job's prompt" in result.output
    assert "input.jsonl:3: missing field 'title'" in result.output
    assert sim.stats.requests == 0


def test_every_problem_is_reported_at_once_up_to_a_cap(job: JobFiles, sim: Simulator,
                                                       cli: Any) -> None:
    lines = ["{broken"] * 70 + [GOOD[0]]
    path = job.write(lines)
    result = cli("run", path)
    assert result.exit_code == 1
    assert result.output.count("invalid JSON") == 50
    assert "and 20 more problem(s)" in result.output
    assert sim.stats.requests == 0


def test_problem_on_the_last_line_still_sends_nothing(job: JobFiles, sim: Simulator,
                                                      cli: Any) -> None:
    path = job.write([*articles(200), "{oops"])
    result = cli("run", path)
    assert result.exit_code == 1
    assert "input.jsonl:201: invalid JSON" in result.output
    assert sim.stats.requests == 0


def test_missing_input_file(job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(1), input="../data/nope.jsonl")
    result = cli("run", path)
    assert result.exit_code == 1
    assert "nope.jsonl:0: input file not found" in result.output


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"limts": {"rpm": 10}}, "unknown key 'limts'; did you mean 'limits'?"),
        ({"limits": {"rmp": 10}}, "unknown key 'limits.rmp'; did you mean 'limits.rpm'"),
        ({"timeout_s": -1}, "'timeout_s': Input should be greater than 0"),
        ({"params": {"messages": []}}, "params.messages is not allowed"),
        ({"prompt": "Summarize {text"}, "prompt: malformed template"),
        ({"on_change": "sometimes"}, "'on_change': Input should be 'rerun', 'keep' or 'error'"),
    ],
)
def test_bad_job_file_names_line_and_key(job: JobFiles, sim: Simulator, cli: Any,
                                         change: dict[str, Any], expected: str) -> None:
    path = job.write(articles(1), **change)
    result = cli("run", path)
    assert result.exit_code == 1, result.output
    assert expected.split("'")[0] in result.output
    assert expected in result.output
    assert "job.yaml:" in result.output
    assert sim.stats.requests == 0


def test_missing_required_key_and_yaml_syntax(job: JobFiles, cli: Any) -> None:
    job.job_path.write_text("name: x\noutput: out.jsonl\n")
    result = cli("run", job.job_path)
    assert result.exit_code == 1 and "missing required key 'input'" in result.output
    job.job_path.write_text("name: x\ninput: [unclosed\n")
    result = cli("run", job.job_path)
    assert result.exit_code == 1
    assert "job.yaml:2:8: this '[' is never closed with ']'" in result.output
    result = cli("run", job.dir / "missing.yaml")
    assert result.exit_code == 1 and "job file not found" in result.output


def test_row_without_any_model(job: JobFiles, sim: Simulator, cli: Any) -> None:
    job.config.pop("model")
    path = job.write(articles(1))
    result = cli("run", path)
    assert result.exit_code == 1
    assert "job.yaml: no model: set `model:` in the job file" in result.output
    assert "input.jsonl:1" not in result.output  # the job file's mistake, not the line's
