"""Input written by someone else: lines Python's json reads but no request can carry, lines
that break the reader, inputs that are not files. Each is a ``file:line:`` problem before
anything is sent (exit 1), never a traceback; a property test throws random lines at the
validator to hold it to that."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from batchgpt.config import JobConfig
from batchgpt.errors import ConfigError, InputError
from batchgpt.simulator import Simulator
from batchgpt.source import MAX_DEPTH, ROLES, InputFile, request_hash
from tests.conftest import JobFiles, articles, user_texts

HI = [{"role": "user", "content": "hi"}]


def write_lines(job: JobFiles, lines: list[str | bytes]) -> None:
    with job.input.open("wb") as fh:
        for line in lines:
            fh.write((line if isinstance(line, bytes) else line.encode()) + b"\n")


def refused(cli: Any, job: JobFiles, sim: Simulator, lines: list[str | bytes] | None = None,
            **overrides: Any) -> str:
    """Run the job over these raw lines; it must send nothing and exit 1 cleanly."""
    if lines is not None:
        write_lines(job, lines)
    result = cli("run", job.write(**overrides))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "Logging error" not in result.output
    assert sim.stats.requests == 0
    assert not job.output.exists()
    out: str = result.output
    return out


def accepted(cli: Any, job: JobFiles, lines: list[str | bytes], **overrides: Any) -> Any:
    write_lines(job, lines)
    result = cli("run", job.write(**overrides))
    assert result.exit_code == 0, result.output
    return result


def nested(depth: int) -> Any:
    """A value whose arrays nest ``depth`` levels."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# -- numbers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("line", [
    '{"id": "a1", "text": ' + "7" * 5000 + "}",
    '{"id": ' + "7" * 5000 + ', "text": "x"}',
    '{"id": "c1", "messages": [{"role": "user", "content": "hi"}], "seed": ' + "7" * 5000 + "}",
], ids=["template-field", "id", "chat-param"])
def test_integer_with_5000_digits_is_an_input_error(job: JobFiles, sim: Simulator, cli: Any,
                                                   line: str) -> None:
    out = refused(cli, job, sim, [json.dumps(articles(1)[0]), line])
    assert "input.jsonl:2: a number with thousands of digits, more than can be read" in out


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999",
                                     "1" * 5000 + ".5"])
@pytest.mark.parametrize(("template", "expected"), [
    ('{"id": "c1", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}',
     "'temperature' is"),
    ('{"custom_id": "b1", "body": {"messages": [{"role": "user", "content": "hi"}], '
     '"logit_bias": {"50256": %s}}}', "'body.logit_bias['50256']' is"),
    ('{"id": "t1", "text": "x", "score": %s}', "'score' is"),
    ('{"id": "t1", "text": "x", "score": {"runs": [1, %s]}}', "'score.runs[1]' is"),
], ids=["chat-param", "batch-body", "template-field", "template-field-nested"])
def test_non_finite_numbers_are_refused(job: JobFiles, sim: Simulator, cli: Any,
                                        literal: str, template: str, expected: str) -> None:
    name = "NaN" if literal == "NaN" else "-Infinity" if literal == "-Infinity" else "Infinity"
    out = refused(cli, job, sim, [template % literal], prompt="{text} {score}")
    assert f"input.jsonl:1: {expected} {name}, which is not a JSON number" in out


def test_a_non_finite_number_in_a_field_the_prompt_does_not_use_is_not_sent(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    accepted(cli, job, ['{"id": "t1", "text": "x", "score": NaN}'])
    assert user_texts(sim) == ["Summarize: x"]


def test_job_params_that_cannot_be_sent_are_a_job_error(job: JobFiles, sim: Simulator,
                                                        cli: Any) -> None:
    out = refused(cli, job, sim, [json.dumps(articles(1)[0])],
                  params={"max_tokens": 5, "temperature": float("nan")})
    assert "job.yaml:8: params.temperature is not a finite number" in out  # its own line


def test_n_that_is_not_a_number_fails_its_row_not_the_run(job: JobFiles, sim: Simulator,
                                                          cli: Any) -> None:
    lines = [json.dumps({"id": "c1", "messages": HI}),
             json.dumps({"id": "c2", "messages": HI, "n": "two"})]
    write_lines(job, lines)
    result = cli("run", job.write())
    assert result.exit_code == 3, result.output  # finished, one row failed permanently
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert [r["custom_id"] for r in job.results()] == ["c1"]
    (failure,) = job.failed()
    assert failure["custom_id"] == "c2" and failure["error"]["status"] == 400


# -- nesting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("line", [
    "[" * 100_000 + "]" * 100_000,
    '{"id": "a1", "text": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"id": "a1", "text": "x", "extra": ' + '{"a":' * 100_000 + "1" + "}" * 100_001,
], ids=["line", "template-field", "objects"])
def test_arrays_nested_100000_deep_are_an_input_error(job: JobFiles, sim: Simulator,
                                                      cli: Any, line: str) -> None:
    out = refused(cli, job, sim, [json.dumps(articles(1)[0]), line])
    assert f"input.jsonl:2: nested more than {MAX_DEPTH} levels deep" in out


def test_a_request_nested_to_the_limit_is_sent(job: JobFiles, sim: Simulator,
                                               cli: Any) -> None:
    # the line's own object is level 1: a parameter nested MAX_DEPTH - 1 levels fills it
    line = {"id": "c1", "messages": HI, "x_extra": nested(MAX_DEPTH - 1)}
    accepted(cli, job, [json.dumps(line)])
    (body,) = sim.stats.bodies
    assert body["x_extra"] == line["x_extra"]


def test_a_line_nested_one_level_beyond_the_limit_is_refused(job: JobFiles, sim: Simulator,
                                                             cli: Any) -> None:
    line = {"id": "c1", "messages": HI, "x_extra": nested(MAX_DEPTH)}
    out = refused(cli, job, sim, [json.dumps(line)])
    assert f"input.jsonl:1: nested more than {MAX_DEPTH} levels deep" in out


def test_the_whole_line_counts_even_a_field_the_prompt_does_not_use(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    # not sent, but read again by the runner deeper in the stack, where a line nested
    # nearly as deep as the first read allows would fail to parse
    line = {"id": "t1", "text": "x", "unused": nested(MAX_DEPTH)}
    out = refused(cli, job, sim, [json.dumps(line)])
    assert f"input.jsonl:1: nested more than {MAX_DEPTH} levels deep" in out


# -- text that is not UTF-8 once decoded: lone surrogates ---------------------------------------
@pytest.mark.parametrize(("record", "expected"), [
    ({"id": "e1", "subject": "s", "body": "Dear \ud800 team"}, "'body'"),
    ({"id": "c1", "messages": [{"role": "user", "content": "hi \udfff"}]},
     "'messages[0].content'"),
    ({"custom_id": "b1", "body": {"messages": [{"role": "user", "content": "\ud800"}]}},
     "'body.messages[0].content'"),
    ({"id": "a\ud800", "subject": "s", "body": "b"}, "'id'"),
    ({"custom_id": "\udc00", "body": {"messages": HI}}, "'custom_id'"),
    ({"id": "c1", "messages": HI, "logit_bias": {"\ud800": 1}}, "'logit_bias['\\ud800']'"),
], ids=["template-field", "chat-message", "batch-body", "id", "custom_id", "key"])
def test_lone_surrogate_is_refused_saying_where(job: JobFiles, sim: Simulator, cli: Any,
                                                record: dict[str, Any], expected: str) -> None:
    line = json.dumps(record)  # ASCII: the surrogate as the escape a broken writer leaves
    assert "\\ud" in line
    out = refused(cli, job, sim, [line], prompt="{subject} {body}")
    assert f"input.jsonl:1: {expected} cannot be written as UTF-8: it holds the lone " \
           "surrogate \\u" in out


def test_a_surrogate_pair_is_a_character_and_an_unused_field_is_not_sent(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    accepted(cli, job, [json.dumps({"id": "e\U0001f600", "text": "smile \U0001f600",
                                    "notes": "\ud800"})])
    assert user_texts(sim) == ["Summarize: smile \U0001f600"]
    assert [r["custom_id"] for r in job.results()] == ["e\U0001f600"]


# -- values of the wrong type where a form checks one -------------------------------------------
@pytest.mark.parametrize(("record", "expected"), [
    ({"id": "c1", "messages": [{"role": ["user"], "content": "x"}]},
     "'messages[0].role' must be one of"),
    ({"id": "c1", "messages": [{"role": {"a": 1}, "content": "x"}]},
     "'messages[0].role' must be one of"),
    ({"custom_id": "b1", "url": ["/v1/chat/completions"], "body": {"messages": HI}},
     "'url' must be \"/v1/chat/completions\""),
    ({"custom_id": "b1", "method": {"POST": 1}, "body": {"messages": HI}},
     "'method' must be \"POST\""),
    ({"id": ["a"], "text": "x"}, "'id' must be a string or an integer"),
    ({"id": True, "text": "x"}, "'id' must be a string or an integer"),
], ids=["role-list", "role-object", "url-list", "method-object", "id-list", "id-bool"])
def test_odd_values_in_checked_keys_are_input_errors(job: JobFiles, sim: Simulator, cli: Any,
                                                     record: dict[str, Any],
                                                     expected: str) -> None:
    out = refused(cli, job, sim, [json.dumps(record)])
    assert f"input.jsonl:1: {expected}" in out


def test_duplicates_are_named_next_to_unreadable_lines(job: JobFiles, sim: Simulator,
                                                       cli: Any) -> None:
    first = json.dumps(articles(1)[0])
    out = refused(cli, job, sim, [first, "[" * 5000 + "]" * 5000, "7" * 5000, first])
    assert "input.jsonl:2: nested more than" in out
    assert "input.jsonl:3: a number with thousands of digits" in out
    assert "input.jsonl:4: duplicate id 'a0001' (first on line 1)" in out


# -- the input must be a regular file ------------------------------------------------------------
def test_fifo_input_is_refused_without_opening_it(job: JobFiles, sim: Simulator,
                                                  cli: Any) -> None:
    os.mkfifo(job.input)
    job.write()
    # Were the pipe opened for reading, the open would wait for a writer forever. This
    # watchdog is that writer: it opens the write end and closes it at once (the reader
    # then sees an empty input), so a regression fails the test instead of hanging it. As
    # long as nothing opens the pipe, its every try fails (ENXIO: no reader) and does nothing.
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(1.0):
            with contextlib.suppress(OSError):
                os.close(os.open(job.input, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        out = refused(cli, job, sim)
    finally:
        done.set()
        thread.join()
    assert ("input.jsonl:0: input is a pipe (FIFO), not a regular file: it is read twice, by "
            "position") in out
    assert "must be a regular file" in out


def test_stdin_from_a_pipe_is_refused(job: JobFiles, sim: Simulator) -> None:
    path = job.write(input="/dev/stdin")
    # stdin is closed once written, so even a regression that reads it can't hang
    proc = subprocess.run([sys.executable, "-m", "batchgpt.cli", "run", str(path)],
                          input=json.dumps(articles(1)[0]).encode() + b"\n",
                          capture_output=True, timeout=120, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "/dev/stdin:0: input is a pipe (FIFO), not a regular file" in err
    assert "Traceback" not in err
    assert sim.stats.requests == 0


@pytest.mark.parametrize(("target", "kind"), [("dir", "a directory"),
                                              ("/dev/null", "a character device")])
def test_directory_or_device_input_is_refused(job: JobFiles, sim: Simulator, cli: Any,
                                              target: str, kind: str) -> None:
    where = str(job.dir) if target == "dir" else target
    out = refused(cli, job, sim, input=where)
    assert f"{where}:0: input is {kind}, not a regular file" in out


# -- the property: any line is accepted as a sendable row, or is a file:line problem -------------
class Raw(str):
    """JSON text to paste as it is (numbers Python's json can't write, deep nesting)."""


def to_json(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)  # ASCII: lone surrogates become "\ud800" escapes


KEYS = ["id", "custom_id", "messages", "body", "role", "content", "text", "title", "method",
        "url", "model", "stream", "n", "max_tokens", "temperature", "metadata", "tags"]
odd_chars = st.sampled_from(["\ud800", "\udfff", "\x00", "\x1f", "\n", "\u2028", "{", "}",
                             '"', "\\", "\ufeff", "\U0001f600", "é"])
strings = st.text(alphabet=st.one_of(st.characters(), odd_chars), max_size=12)
raw_numbers = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000, "-" + "9" * 4301,
    "1" * 5000 + ".5", "-0", "1.5e-320", "123456789012345678901234567890", "1E400",
]).map(Raw)
deep = st.sampled_from([MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, 990, 100_000]).map(
    lambda d: Raw("[" * d + "]" * d))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), strings, raw_numbers)
values = st.recursive(
    st.one_of(scalars, deep),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.one_of(st.sampled_from(KEYS), strings),
                                               children, max_size=3)),
    max_leaves=12,
)
ids = st.one_of(strings, st.integers(), raw_numbers, values)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(sorted(ROLES)), values)},
                          optional={"content": st.one_of(strings, values), "name": values}),
    values), max_size=3)
params = {k: values for k in ("model", "stream", "n", "max_tokens", "temperature",
                              "metadata")}
records = st.one_of(
    st.fixed_dictionaries({"id": ids}, optional={"text": st.one_of(strings, values),
                                                 "title": values, "body": values,
                                                 "custom_id": ids, "messages": values}),
    st.fixed_dictionaries({"id": ids, "messages": messages}, optional=params),
    st.fixed_dictionaries({"custom_id": ids, "body": st.fixed_dictionaries(
        {}, optional={"messages": messages, **params})},
        optional={"method": st.one_of(st.just("POST"), values),
                  "url": st.one_of(st.just("/v1/chat/completions"), values)}),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), strings), values, max_size=5),
    values,
)
lines = st.one_of(
    records.map(lambda r: to_json(r).encode()),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")),
    strings.map(lambda s: s.encode("utf-8", "surrogatepass").replace(b"\n", b" ")),
)
fields = st.sampled_from(["text", "title", "body", "messages", "custom_id", "tags"])
prompt_parts = st.one_of(
    strings.map(lambda s: s.replace("{", "{{").replace("}", "}}")),
    st.tuples(fields, st.sampled_from(["", "!r", "!s", "!a"]),
              st.sampled_from(["", ":.5", ":>3", ":^4"])).map(lambda t: "{" + "".join(t) + "}"),
)
jobs = st.fixed_dictionaries({
    "input_format": st.sampled_from(["auto", "batch", "chat", "template"]),
    "model": st.sampled_from([None, "gpt-4o-mini"]),
    "prompt": st.one_of(st.none(), st.lists(prompt_parts, max_size=4).map("".join)),
    "system": st.one_of(st.none(), strings),
    "params": st.sampled_from([{}, {"max_tokens": 5}, {"temperature": 0.5, "n": 2}]),
})


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=jobs, file_lines=st.lists(lines, min_size=1, max_size=5))
def test_any_line_is_a_sendable_row_or_a_file_line_problem(config: dict[str, Any],
                                                           file_lines: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "in.jsonl"
        path.write_bytes(b"\n".join(file_lines) + b"\n")
        try:
            job = JobConfig.model_validate({"input": path, "output": Path(folder) / "out.jsonl",
                                            **config})
        except ValidationError as exc:  # a job-file error, reported against the prompt's line
            assert all(err["loc"] == ("prompt",) for err in exc.errors()), exc
            return
        try:
            source = InputFile(job)
        except ConfigError as exc:  # the job's own prompt or system, not the input
            assert "prompt" in str(exc) or "system" in str(exc)
            return
        try:
            rows = list(source.scan())
        except ConfigError as exc:  # the job's mistake every line shows, then other problems
            text = str(exc)
            text.encode("utf-8")
            assert text.startswith("the job: ")
            for line in text.splitlines():
                assert line.startswith(("the job: ", f"{path}:", "… and ")), line
            return
        except InputError as exc:
            assert exc.problems
            for problem in exc.problems:
                assert problem.path == str(path)
                assert 1 <= problem.line <= len(file_lines)
                assert problem.message
                assert str(problem).startswith(f"{path}:{problem.line}: ")
                str(problem).encode("utf-8")  # printable as it is: no raw surrogate
            return
        for scanned in rows:  # accepted: each row can be sent, and is what was hashed
            row = scanned.row
            json.dumps(row.body, allow_nan=False, ensure_ascii=False).encode("utf-8")
            row.custom_id.encode("utf-8")
            assert request_hash(row.body) == scanned.request_hash
            assert row.cost >= 0 and row.prompt_tokens >= 0
            row.max_output_tokens  # noqa: B018 - it must not raise
        rebuilt = list(source.read_at(iter([(s.offset, s.line) for s in rows])))
        assert rebuilt == [s.row for s in rows]


def test_an_absurd_output_cap_in_a_line_is_a_line_error(job: JobFiles, sim: Simulator,
                                                        cli: Any) -> None:
    """A chat line's own max_tokens of 10**400 made the dry run's cost infinite."""
    lines = [json.dumps({"id": "c1", "messages": HI}),
             '{"id": "c2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1'
             + "0" * 400 + "}"]
    write_lines(job, lines)
    result = cli("run", job.write(), "--dry-run")
    assert result.exit_code == 1
    assert "input.jsonl:2: 'max_tokens' is out of range" in result.output
    assert sim.stats.requests == 0
