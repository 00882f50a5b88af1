"""Adversarial tests for the storage redesign, hostile-input hardening and "results out".

Each test is a minimal reproduction of one problem found by attacking the CLI against the
simulator; each FAILS on the code it was written against. See the docstring of each test
for what was done, what happened and what should happen.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import batchgpt.runner
from batchgpt.simulator import Simulator, SimulatorConfig, SimulatorThread
from tests.conftest import JobFiles, articles, read_jsonl, write_jsonl

BATCHGPT = str(Path(sys.executable).with_name("batchgpt"))


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line must be a JSON object; returns them."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                raise AssertionError(f"not a JSON line: {line!r}") from None
            assert isinstance(obj, dict), line
            out.append(obj)
    return out


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root, with the bytes of each file (None for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


# -- circuit breaker ------------------------------------------------------------------------


def test_breaker_bad_first_rows_on_a_healthy_server_never_let_the_good_rows_through(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """Chat lines whose own per-line parameter is invalid (``"n": 0``) sit at the start of
    the input; the server is healthy and every other row would succeed. The first run's
    first 5 attempts are those rows' 400s: the breaker trips ("check the job's model and
    params") although the job's params are fine. Worse, ``--retry-failed`` re-sends those
    same 5 rows first, so it trips again on every run: the 15 good rows are never sent.
    Expected: row-specific 400s (different rows, their own parameters) do not stop a run
    whose other rows work; at the latest the --retry-failed rerun sends the good rows."""
    lines = []
    for i in range(20):
        line: dict[str, Any] = {"id": f"c{i:02d}",
                                "messages": [{"role": "user", "content": f"Hello {i}. More."}]}
        if i < 5:
            line["n"] = 0  # this line's own parameter: the server answers 400
        lines.append(line)
    path = job.write(lines, limits={"concurrency": 8})
    cli("run", path)
    cli("run", path, "--retry-failed")
    good = {r["custom_id"] for r in job.results()}
    assert good == {f"c{i:02d}" for i in range(5, 20)}, job.summary()["message"]


# -- answer tags and takeover ---------------------------------------------------------------


def test_dry_run_and_status_after_a_lost_state_folder_hide_the_rows_a_run_sends_again(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """Run a job; change its prompt; lose the state folder (``git clean``). The output's
    answer tags say every line answers the *old* prompt, and the next run knows it: it
    sends all 10 rows again ("10 changed since their result"), or with on_change: error
    refuses. But ``--dry-run`` (the check made before spending) says "already done 10, to
    send 0", and ``status`` says 10 succeeded, 0 pending, 0 changed. README: "status and
    --dry-run agree ... make the plan a run would make". Expected: both report 10 rows
    changed, 10 to send."""
    path = job.write(articles(10))
    assert cli("run", path).exit_code == 0
    job.write(prompt="Tell me: {text}")
    shutil.rmtree(job.output.with_name("job.state"))

    dry = cli("run", path, "--dry-run", "--json")
    estimate = json.loads(dry.stdout)
    status = json.loads(cli("status", path, "--json").stdout)

    sim.reset_stats()
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests == 10  # the run does send every row again
    assert estimate["requests"]["to_send"] == 10, estimate["requests"]
    assert status["requests"]["changed"] == 10, status["requests"]


def test_results_from_another_tool_whose_random_id_has_b_as_13th_digit_are_paid_twice(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """An output from another tool (or hand-made, Batch API shaped) whose line ids are
    ``batch_req_`` + 32 random lowercase hex digits, and no state folder. README: lines
    whose ids are not batchgpt's tags "are taken as answers to the current request".
    A random id is taken for a tag when its 13th digit happens to be ``b`` (1 in 16
    ids): that line is then "tagged for another request", the row counts as changed and
    is sent (and paid) again. Expected: nothing sent; a 32-hex id that does not match
    the row's tag for *any* known request must not be read as a tag for another one."""
    path = job.write(articles(4))
    assert cli("run", path).exit_code == 0
    lines = job.results()
    for n, line in enumerate(lines):
        line["id"] = f"batch_req_67e3d51fa25cb190be6ca03a0ec01e{n:02x}"  # random-looking
    write_jsonl(job.output, lines)
    shutil.rmtree(job.output.with_name("job.state"))
    sim.reset_stats()
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests == 0


def test_results_answered_by_a_server_alias_are_unpriced_after_a_lost_state_folder(
    tmp_path: Path, cli: Any
) -> None:
    """A proxy answers ``gpt-4o-mini`` requests naming its own alias (``fast``). README:
    such replies are "priced at the requested model's price, in the budget and in every
    cost figure". After the state folder is lost ("do nothing, rerun. Nothing is sent
    again"), the takeover records the alias, so: ``status`` says cost unknown, and a job
    with ``limits.max_cost_usd`` can no longer run at all ("the price of model 'fast' is
    unknown (earlier results of this job)", exit 1). Expected: exit 0 (nothing to do),
    and the cost still known."""
    with SimulatorThread(SimulatorConfig(model_alias="fast")) as sim:
        job = JobFiles(tmp_path, sim.base_url)
        path = job.write(articles(5), limits={"concurrency": 4, "max_cost_usd": 1})
        assert cli("run", path).exit_code == 0
        cost = job.summary()["cost_usd"]
        assert cost and cost > 0
        shutil.rmtree(job.output.with_name("job.state"))
        rerun = cli("run", path)
        assert sim.stats.requests == 5
    assert rerun.exit_code == 0, rerun.output
    status = json.loads(cli("status", path, "--json").stdout)
    assert "unknown" not in json.dumps(status.get("cost_usd")), status


# -- export ---------------------------------------------------------------------------------


def test_export_loses_a_field_when_a_record_has_both_status_and_input_status(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """A record with a field named like an export column (``status``) and another named
    ``input.status``. README: a field "named like a column below becomes input.<name>".
    Both become ``input.status``: the export silently drops the record's ``status``
    value (``"open"`` is nowhere in the JSONL or CSV). Expected: every field's value is
    in the export under a distinct column."""
    records = [{"id": "a1", "text": "Hello. More.", "status": "open", "input.status": "x"}]
    path = job.write(records)
    assert cli("run", path).exit_code == 0
    jsonl = cli("export", path)
    csv_out = cli("export", path, "--format", "csv")
    assert jsonl.exit_code == 0 and csv_out.exit_code == 0
    assert '"open"' in jsonl.stdout, jsonl.stdout
    assert "open" in csv_out.stdout.splitlines()[1], csv_out.stdout


# -- JSON logs ------------------------------------------------------------------------------


def test_json_logs_an_internal_error_is_a_plain_text_line_and_missing_from_the_log_file(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path
) -> None:
    """``--log-format json --log-file L``: "every line ... and nothing else" is a JSON
    event. A bug after the run (exit 70) prints ``internal error: ...`` as plain text on
    stderr (a log pipeline can't parse it) and writes nothing about it to the log file,
    so the cron log ends with a successful-looking summary. Expected: the internal error
    is a JSON event on stderr and in the log file."""
    def broken(*_: Any) -> Any:
        raise RuntimeError("renderer broken")

    monkeypatch.setattr(batchgpt.runner, "render_table", broken)
    path = job.write(articles(2))
    log_file = tmp_path / "run.log"
    result = cli("run", path, "--log-format", "json", "--log-file", log_file,
                 internal_error=True)
    assert result.exit_code == 70
    json_lines(result.stderr)
    assert "internal error" in log_file.read_text(encoding="utf-8")
