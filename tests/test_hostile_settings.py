"""Settings the user did not write (a job file from elsewhere, an EnvironmentFile, a pasted
key): each ends as exit 1 with one line naming the job file and line (or the environment
variable), before any request is sent, with no traceback and no secret in the output."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from batchgpt.config import template_fields, template_parts
from batchgpt.simulator import Simulator
from tests.conftest import JobFiles, articles


def write_raw(job: JobFiles, raw: str, records: list[Any] | None = None) -> tuple[Path, int]:
    """The fixture's job file with ``raw`` YAML appended verbatim (what ``yaml.safe_dump``
    cannot write: aliases, ``.inf``, dates). Top-level keys ``raw`` sets are left out of the
    dumped part. Returns the path and the line ``raw`` starts on."""
    for key in re.findall(r"^([A-Za-z_]\w*):", raw, flags=re.MULTILINE):
        job.config.pop(key, None)
    job.write(articles(2) if records is None else records)
    dumped = job.job_path.read_text(encoding="utf-8")
    job.job_path.write_text(dumped + raw + "\n", encoding="utf-8")
    return job.job_path, len(dumped.splitlines()) + 1


def assert_refused(result: Any, sim: Simulator, *expected: str) -> None:
    """Exit 1, every expected piece in the output, no traceback, nothing sent."""
    assert result.exit_code == 1, result.output
    for text in expected:
        assert text in result.output, result.output
    assert "Traceback" not in result.output
    assert "internal error" not in result.output
    assert sim.stats.requests == 0


def assert_nowhere(secret: str, result: Any, tmp_path: Path, *, skip: Path | None = None
                   ) -> None:
    """No 6-character piece of ``secret`` in the output or in any file under tmp_path
    (``skip``: the job file that holds it on purpose)."""
    pieces = {secret[i:i + 6] for i in range(len(secret) - 5)}
    for piece in pieces:
        assert piece not in result.output
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != skip:
            data = path.read_bytes()
            for piece in pieces:
                assert piece.encode() not in data, f"{piece!r} in {path}"


# -- 1. the YAML itself ------------------------------------------------------------------
BOMB = "\n".join(
    ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    + [f"{new}: &{new} [{','.join([f'*{old}'] * 9)}]"
       for old, new in zip("abcdefgh", "bcdefghi", strict=True)]
)


def test_yaml_alias_bomb_is_refused_before_parsing(job: JobFiles, sim: Simulator,
                                                   cli: Any) -> None:
    assert len(BOMB) < 500  # 9**9 = 387 million strings once expanded
    path, line = write_raw(job, "system_bomb:\n" + "\n".join(
        "  " + b for b in BOMB.splitlines()))
    start = time.perf_counter()
    result = cli("run", path)
    elapsed = time.perf_counter() - start
    assert_refused(result, sim, f"job.yaml:{line + 2}: YAML aliases (*a) are not allowed")
    assert elapsed < 1.0  # expanding it takes tens of seconds and gigabytes


def test_a_single_yaml_alias_is_refused_with_its_line(job: JobFiles, sim: Simulator,
                                                      cli: Any) -> None:
    path, line = write_raw(job, 'system: &s "Be brief."\nprompt: *s')
    assert_refused(cli("run", path), sim,
                   f"job.yaml:{line + 1}: YAML aliases (*s) are not allowed in a job file")


def test_yaml_nested_too_deep_is_refused_with_its_line(job: JobFiles, sim: Simulator,
                                                       cli: Any) -> None:
    path, line = write_raw(job, "params: {deep: " + "[" * 100 + "]" * 100 + "}")
    assert_refused(cli("run", path), sim, f"job.yaml:{line}: nested more than 64 levels")


def test_yaml_with_too_many_values_is_refused_with_its_line(job: JobFiles, sim: Simulator,
                                                            cli: Any) -> None:
    """A megabyte of `[1,1,1,...]` is half a million values, seconds to build."""
    path, line = write_raw(job, "params:\n  stop: [" + ",".join(["1"] * 200_000) + "]")
    assert_refused(cli("run", path), sim, f"job.yaml:{line + 1}: more than 100,000 values")


@pytest.mark.parametrize(("raw", "expected"), [
    ("timeout_s: " + "9" * 5000, "cannot read this value (Exceeds the limit (4300 digits)"),
    ("params: {when: 2024-13-45}", "cannot read this value (month must be in 1..12)"),
], ids=["5000-digit-integer", "impossible-date"])
def test_yaml_value_python_cannot_build_is_refused_with_its_line(
    job: JobFiles, sim: Simulator, cli: Any, raw: str, expected: str
) -> None:
    path, line = write_raw(job, raw)
    assert_refused(cli("run", path), sim, f"job.yaml:{line}: not valid YAML: {expected}")


def test_a_key_written_twice_is_refused_naming_both_lines(job: JobFiles, sim: Simulator,
                                                           cli: Any) -> None:
    path, line = write_raw(job, "timeout_s: 5\ntimeout_s: 50")
    assert_refused(cli("run", path), sim,
                   f"job.yaml:{line + 1}: duplicate key 'timeout_s' (first on line {line})")


def test_job_file_over_a_megabyte_is_refused_unread(job: JobFiles, sim: Simulator,
                                                    cli: Any) -> None:
    path, _ = write_raw(job, "system: " + "x" * (1024 * 1024))
    assert_refused(cli("run", path), sim, "job.yaml: the job file is 1,048,", "1,048,576")


def test_job_file_that_is_not_utf8_names_its_line(job: JobFiles, sim: Simulator,
                                                  cli: Any) -> None:
    path, line = write_raw(job, "system: caf\xe9")
    path.write_bytes(path.read_bytes().replace("caf\xe9".encode(), b"caf\xe9"))
    assert_refused(cli("run", path), sim, f"job.yaml:{line}: not UTF-8 text")


@pytest.mark.parametrize("kind", ["directory", "/dev/null"])
def test_job_path_that_is_not_a_regular_file_is_refused(tmp_path: Path, sim: Simulator,
                                                        cli: Any, kind: str) -> None:
    path = tmp_path if kind == "directory" else Path(kind)
    expected = "a directory" if kind == "directory" else "a character device"
    assert_refused(cli("run", path), sim, f"{path}: not a regular file ({expected})")


def test_job_path_that_is_a_fifo_is_refused_without_opening_it(tmp_path: Path,
                                                                sim: Simulator,
                                                                cli: Any) -> None:
    """Opening a FIFO for reading blocks until a writer comes. A writer is waiting here,
    so that a regression reads its job file (and fails the assertion) instead of hanging
    the test; with the check in place nobody opens the FIFO, and the writer is released
    at the end by opening the read end without blocking."""
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)

    def writer() -> None:
        with open(fifo, "w", encoding="utf-8") as fh:  # blocks until a reader opens it
            fh.write("name: written-through-the-fifo\n")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        result = cli("run", fifo)
        assert_refused(result, sim, f"{fifo}: not a regular file (a pipe (FIFO))")
    finally:
        release = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        thread.join(timeout=10)
        os.close(release)
    assert not thread.is_alive()


# -- 2. prompt templates -----------------------------------------------------------------
@pytest.mark.parametrize("template", [
    "{text:{width}}", "{text:d}", "{text!x}", "{text!s:{text}}", "{text:>300000000}",
    "Summarize: {text!r}",
])
def test_prompt_format_spec_or_conversion_is_refused_naming_the_prompt_line(
    job: JobFiles, sim: Simulator, cli: Any, template: str
) -> None:
    path, line = write_raw(job, "prompt: " + json.dumps(template))
    result = cli("run", path)
    assert_refused(result, sim, f"job.yaml:{line}: prompt: ",
                   "format specs and conversions are not supported",
                   "field substitution only", "{{ and }} give literal braces")


@pytest.mark.parametrize(("template", "expected"), [
    ("{text.upper}", "'{text.upper}' is not a field name"),
    ("{0}", "'{0}' is not a field name"),
    ("{}", "'{}' is not a field name"),
    ("Summarize {text", "malformed template"),
    ("Summarize } {text}", "malformed template"),
])
def test_prompt_that_is_not_plain_fields_is_refused_naming_the_prompt_line(
    job: JobFiles, sim: Simulator, cli: Any, template: str, expected: str
) -> None:
    path, line = write_raw(job, "prompt: " + json.dumps(template))
    assert_refused(cli("run", path), sim, f"job.yaml:{line}: prompt: {expected}")


def test_template_parts_split_literal_text_and_fields() -> None:
    template = "Title: {title}\n{{not a field}} {text}!"
    parts = template_parts(template)
    assert "".join(text + (f"<{f}>" if f else "") for text, f in parts) == (
        "Title: <title>\n{not a field} <text>!"
    )
    assert template_fields(template) == ["title", "text"]
    assert template_parts("") == []
    with pytest.raises(ValueError, match="format specs and conversions"):
        template_parts("{text:>300000000}")


# -- 3. non-finite and absurd numbers ----------------------------------------------------
@pytest.mark.parametrize(("raw", "expected"), [
    ("timeout_s: .inf", "'timeout_s': Input should be a finite number"),
    ("retry: {max_delay_s: .inf}", "'retry.max_delay_s': Input should be a finite number"),
    ("retry: {jitter: .nan}", "'retry.jitter': Input should be a finite number"),
    ("limits: {max_cost_usd: .nan}", "'limits.max_cost_usd': Input should be a finite number"),
    ("pricing: {my-model: {input: .nan, output: 1.0}}",
     "'pricing.my-model.input': Input should be a finite number"),
    ("pricing: {my-model: {input: 1.0, output: .inf}}",
     "'pricing.my-model.output': Input should be a finite number"),
    ("timeout_s: 100000000", "'timeout_s': Input should be less than or equal to 86400"),
    ("retry: {max_delay_s: 1e9}", "'retry.max_delay_s': Input should be less than or equal"),
])
def test_non_finite_or_absurd_number_is_refused_naming_its_line(
    job: JobFiles, sim: Simulator, cli: Any, raw: str, expected: str
) -> None:
    path, line = write_raw(job, raw)
    assert_refused(cli("run", path), sim, f"job.yaml:{line}: {expected}")


BOOLEAN = "a boolean is not a number (YAML reads yes/no, on/off and true/false as booleans)"


@pytest.mark.parametrize(("raw", "key"), [
    ("limits: {max_cost_usd: yes}", "limits.max_cost_usd"),  # was a $1 cap
    ("limits: {concurrency: true}", "limits.concurrency"),  # was 1
    ("limits: {rpm: on}", "limits.rpm"),
    ("limits: {tpm: no}", "limits.tpm"),
    ("retry: {max_attempts: off}", "retry.max_attempts"),
    ("retry: {initial_delay_s: true}", "retry.initial_delay_s"),
    ("retry: {max_delay_s: yes}", "retry.max_delay_s"),
    ("retry: {multiplier: true}", "retry.multiplier"),
    ("retry: {jitter: false}", "retry.jitter"),  # was 0
    ("timeout_s: yes", "timeout_s"),
    ("pricing: {my-model: {input: true, output: 1.0}}", "pricing.my-model.input"),
    ("pricing: {my-model: {input: 1.0, output: 1.0, cached_input: no}}",
     "pricing.my-model.cached_input"),
])
def test_a_yaml_boolean_where_a_number_is_wanted_is_refused_naming_the_key_and_line(
    job: JobFiles, sim: Simulator, cli: Any, raw: str, key: str
) -> None:
    """pydantic's lax mode reads ``true`` as 1 and ``false`` as 0, and YAML reads yes, on
    and true as booleans: every number of the job file refuses one."""
    path, line = write_raw(job, raw)
    assert_refused(cli("run", path), sim, f"job.yaml:{line}: '{key}': {BOOLEAN}")


def test_numbers_written_as_numbers_or_quoted_and_booleans_in_params_are_still_taken(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path, _ = write_raw(job, 'limits: {rpm: "6000", concurrency: 4.0, max_cost_usd: 1}\n'
                             "params: {max_tokens: 20, logprobs: true}")
    assert cli("run", path).exit_code == 0
    assert sim.stats.bodies[0]["logprobs"] is True


# -- 4. params must be JSON --------------------------------------------------------------
@pytest.mark.parametrize(("raw", "below", "expected"), [
    ("params: {temperature: .nan}", 0, "params.temperature is not a finite number"),
    ("params: {x: 2024-01-01}", 0, "params.x is a date, which JSON cannot carry; quote it"),
    ("params: {x: 2024-01-01 10:00:00}", 0, "params.x is a timestamp"),
    ("params: {x: !!binary aGVsbG8=}", 0, "params.x is binary data (!!binary)"),
    ("params: {x: !!set {a, b}}", 0, "params.x is a set (!!set)"),
    ("params:\n  max_tokens: 50\n  response_format:\n    bounds: [1, 2, -.inf]", 3,
     "params.response_format.bounds[2] is not a finite number"),
    ("params: {seed: 0x" + "f" * 40 + "}", 0, "params.seed is an integer beyond 64 bits"),
    ("params:\n  max_tokens: 50\n  messages: []", 2,
     "params.messages is not allowed: write messages in the input file"),
])
def test_params_that_json_cannot_carry_are_refused_naming_the_key_and_line(
    job: JobFiles, sim: Simulator, cli: Any, raw: str, below: int, expected: str
) -> None:
    path, line = write_raw(job, raw)
    assert_refused(cli("run", path), sim, f"job.yaml:{line + below}: {expected}")


def test_params_with_integer_keys_are_sent_as_json(job: JobFiles, sim: Simulator,
                                                   cli: Any) -> None:
    """logit_bias token ids are integers to YAML; JSON writes them as strings."""
    path, _ = write_raw(job, "params: {max_tokens: 20, logit_bias: {50256: -100}}")
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.bodies[0]["logit_bias"] == {"50256": -100}


# -- 5. the base URL ---------------------------------------------------------------------
def test_base_url_with_a_password_is_refused_without_echoing_it(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path
) -> None:
    password = "Hunter2Qx9Zr7Lp"
    path, line = write_raw(job, f'api: {{base_url: "http://admin:{password}@127.0.0.1:9/v1"}}')
    result = cli("run", path, "--log-file", tmp_path / "run.log")
    assert_refused(result, sim, f"job.yaml:{line}: api.base_url has a user name or password",
                   "environment variable named by api.api_key_env")
    assert "admin" not in result.output
    assert_nowhere(password, result, tmp_path, skip=path)


def test_openai_base_url_variable_with_a_password_is_refused_without_echoing_it(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "Hunter2Qx9Zr7Lp"
    monkeypatch.setenv("OPENAI_BASE_URL", f"{sim.base_url.replace('//', f'//u:{password}@')}")
    job.config["api"] = {}
    path = job.write(articles(2))
    result = cli("run", path, "--log-file", tmp_path / "run.log")
    assert_refused(result, sim, "the environment variable OPENAI_BASE_URL",
                   "has a user name or password")
    assert_nowhere(password, result, tmp_path)


@pytest.mark.parametrize(("url", "expected"), [
    ("localhost:8000/v1", "must start with http:// or https://"),
    ("ftp://example.com/v1", "must start with http:// or https://"),
    ("http:///v1", "has no host"),
    ("http://example.com:99999/v1", "is not a valid URL"),
    ("http://[::1/v1", "is not a valid URL"),
    ("http://example.com/v1?api_key=x", "has a query (?...) or a fragment"),
    ("http://example.com/v1\r", "contains a line break at position 22 (the last character)"),
    ("http://example .com/v1", "contains a space at position 15"),
])
def test_malformed_base_url_is_refused_naming_its_line(
    job: JobFiles, sim: Simulator, cli: Any, url: str, expected: str
) -> None:
    path, line = write_raw(job, "api: {base_url: " + json.dumps(url) + "}")
    assert_refused(cli("run", path), sim, f"job.yaml:{line}: api.base_url {expected}")


# -- 6. the API key ----------------------------------------------------------------------
KEY = "sk-proj-Zq7Wm3Xv9Tb2Lk5Rn8Hc4Jd6Fy1Gp0Ss"
END = len(KEY) + 1


@pytest.mark.parametrize(("key", "expected"), [
    (KEY + "\r", f"contains a line break at position {END} (the last character)"),
    (KEY[:20] + "\n" + KEY[20:], "contains a line break at position 21"),
    (KEY + " ", f"contains a space at position {END}"),
    (" " + KEY, "contains a space at position 1 (the first character)"),
    (KEY[:10] + "\t" + KEY[10:], "contains a tab at position 11"),
    (KEY[:30] + "\x1b" + KEY[30:], "contains a control character at position 31"),
    ("\u201c" + KEY + "\u201d", "contains a non-ASCII character at position 1"),
    (KEY[:5] + "\u0455" + KEY[6:], "contains a non-ASCII character at position 6"),  # Cyrillic
])
def test_api_key_with_a_bad_character_is_refused_naming_the_variable_never_the_key(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, key: str, expected: str
) -> None:
    monkeypatch.setenv("MY_BATCH_KEY", key)
    path, _ = write_raw(job, f"api: {{base_url: '{sim.base_url}', api_key_env: MY_BATCH_KEY}}")
    result = cli("run", path, "--log-file", tmp_path / "run.log")
    assert_refused(result, sim, "the API key in the environment variable MY_BATCH_KEY",
                   expected)
    assert_nowhere(KEY[8:], result, tmp_path)


def test_organization_variable_with_a_line_break_is_refused_naming_it(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_ORG_ID", "org-Zq7Wm3Xv9Tb2\r")
    path = job.write(articles(2))
    result = cli("run", path)
    assert_refused(result, sim, "the environment variable OPENAI_ORG_ID",
                   "contains a line break at position 17")
    assert "Zq7Wm3" not in result.output


def test_api_key_env_holding_a_key_is_refused_without_echoing_it(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path
) -> None:
    path, line = write_raw(job, f"api: {{base_url: '{sim.base_url}', api_key_env: {KEY}}}")
    result = cli("run", path, "--log-file", tmp_path / "run.log")
    assert_refused(result, sim, f"job.yaml:{line}: api.api_key_env must be the name of an "
                   "environment variable")
    assert_nowhere(KEY[8:], result, tmp_path, skip=path)


def test_a_clean_key_and_url_still_run(job: JobFiles, sim: Simulator, cli: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_BATCH_KEY", KEY)
    path, _ = write_raw(job, f"api: {{base_url: '{sim.base_url}', api_key_env: MY_BATCH_KEY}}")
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert sim.stats.requests == 2
