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
from tests.conftest import JobFiles, articles, write_jsonl

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


# -- budget ---------------------------------------------------------------------------------


def _run_until_in_flight_then_kill(path: Path, sim: Simulator, want: int) -> None:
    """Start ``batchgpt run`` in its own process, wait until ``want`` more of its requests
    are on the wire (the simulator holds them), then SIGKILL it (OOM killer, reboot,
    systemd's final kill)."""
    before = sim.stats.requests
    proc = subprocess.Popen([BATCHGPT, "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while sim.stats.requests - before < want and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sim.stats.requests - before >= want
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_budget_killed_runs_each_spend_the_whole_cap_again(tmp_path: Path) -> None:
    """``limits.max_cost_usd`` fits 3 rows' worst case. The server is slow (answers take
    30 s), so a run admits 3 rows, sends them, and is SIGKILLed while they are on the
    wire: the server has accepted (and, like OpenAI, bills) 3 requests. The next run's
    budget starts from what the index recorded, $0: it admits and sends 3 more. Each kill
    spends up to the whole cap again, so a job killed every night has no cap at all.
    README: the cap is on "what the job spends over all its runs", with only the estimate
    caveat. Expected: rows sent and not settled by a killed run are charged (at their
    reserved worst case) against the next run's budget: the second run refuses (exit 4)
    and the server sees no more than the 3 requests the cap allowed."""
    with SimulatorThread(SimulatorConfig(latency_s=30)) as sim:
        job = JobFiles(tmp_path, sim.base_url)
        # worst case per row: ~23 prompt + 20 output tokens of gpt-4o-mini ~ $0.0000155
        path = job.write(articles(20), params={"max_tokens": 20},
                         limits={"concurrency": 8, "max_cost_usd": 0.00005})
        _run_until_in_flight_then_kill(path, sim, 3)
        second = subprocess.run([BATCHGPT, "run", str(path)], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 4, second.stderr  # the budget: nothing left to send
        assert "ended with requests in flight" in second.stderr
        assert sim.stats.requests <= 3, f"{sim.stats.requests} requests for a 3-row cap"


# -- secrets --------------------------------------------------------------------------------

KEY = "sk-proj-SECRETSECRET1234567890abcdef"


def test_secret_a_proxy_echoing_the_key_minus_its_last_characters_is_not_redacted(
    tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy that echoes the key cut short (here all but its last 3 characters, in the
    ``x-request-id`` it returns; the same goes for an error message that quotes
    ``key=sk-proj-...`` truncated, without ``Bearer``). The redactor only knows the
    whole key and ``Bearer <token>``, so 32 of the key's 35 characters land in the
    output, the failures file and rows.sqlite. Expected: a long prefix of the key is
    redacted like the key itself (design.md: "a proxy may echo a truncated key")."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    from batchgpt.simulator import FaultConfig

    faults = FaultConfig(headers={"x-request-id": "req_" + KEY[:-3]}, server_error_rate=0.5)
    with SimulatorThread(SimulatorConfig(faults=faults)) as sim:
        job = JobFiles(tmp_path, sim.base_url)
        path = job.write(articles(4), retry={"max_attempts": 1})
        cli("run", path)
    leaked = [str(p) for p in tmp_path.rglob("*")
              if p.is_file() and KEY[:-3].encode() in p.read_bytes()]
    assert leaked == []


def test_secret_the_key_pasted_into_params_is_printed_by_show_and_dry_run(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key pasted into the job file by mistake, as ``params: {api_key: sk-...}`` (an
    unknown parameter, so it is sent as written). The run redacts it from its logs, but
    ``show`` ("the exact request sent") and ``--dry-run`` (the sample request) print the
    key, equal to $OPENAI_API_KEY, in full. README: the key never appears "in any ... log
    line or error message"; the job file already refuses the key as api_key_env.
    Expected: refused as a job-file error naming the line (like api.api_key_env), or at
    least redacted wherever it is printed."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = job.write(articles(2), params={"max_tokens": 20, "api_key": KEY})
    cli("run", path)
    shown = cli("show", path, "a0001")
    dry = cli("run", path, "--dry-run", "--fresh")
    assert KEY not in shown.output
    assert KEY not in dry.output


# -- export and signals ---------------------------------------------------------------------


def test_export_killed_by_sigterm_leaves_its_temporary_file_behind(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """``export -o res.csv`` of a large job, stopped by SIGTERM (cron's ``timeout``,
    systemd). The previous res.csv is kept (good), but the half-written hidden
    ``.res.csv.<random>.tmp`` stays in the folder; every killed nightly export leaves
    another one of the export's full size. Expected: SIGTERM (and SIGINT) remove the
    temporary file, as a failed export does."""
    path = job.write(articles(1))
    assert cli("run", path).exit_code == 0
    template = job.results()[0]
    records = articles(100_000)
    write_jsonl(job.input, records)
    with job.output.open("w", encoding="utf-8") as fh:  # results another run wrote
        for r in records:
            template["custom_id"] = r["id"]
            tag = r["id"].encode().hex().ljust(32, "0")  # uuid-like: 13th digit 4
            template["id"] = "batch_req_" + tag[:12] + "4" + tag[13:]
            fh.write(json.dumps(template) + "\n")
    shutil.rmtree(job.output.with_name("job.state"))
    dest = job.dir / "res.csv"
    proc = subprocess.Popen([BATCHGPT, "export", str(path), "--format", "csv", "-o", str(dest)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not list(job.dir.glob(".res.csv.*")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("the export ended before it could be stopped")
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    assert list(job.dir.glob(".res.csv.*")) == []


# -- ids ------------------------------------------------------------------------------------


def test_id_template_change_pays_for_every_row_again_without_a_word(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """A job runs; then ``id: "{shop}-{sku}"`` is added (same records, same requests:
    the id is not part of the request). Every id changes, so every row is "new": the run
    and its dry run say "10 new", nothing more, and the run pays for all 10 again. The 10
    earlier results become ``not_in_input``, which only ``status`` mentions, after the
    money is spent. Expected: the dry run (the check before spending) at least reports
    the results whose ids are no longer in the input; better, a run whose rows' requests
    are exactly those of results under other ids refuses (like on_change: error)."""
    records = [dict(r, shop="acme", sku=i) for i, r in enumerate(articles(10))]
    path = job.write(records)
    assert cli("run", path).exit_code == 0
    path = job.write(id="{shop}-{sku}")
    dry = cli("run", path, "--dry-run", "--json")
    estimate = json.loads(dry.stdout)
    assert "not_in_input" in json.dumps(estimate) or "no longer" in dry.stderr, dry.output


def test_budget_spend_on_replaced_results_is_forgotten_when_the_state_folder_is_lost(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """A capped job runs; its prompt changes and it runs again (every row re-sent and
    replaced: the job has now paid twice). README, Budget: the cap counts "what earlier
    runs were charged (replaced results included: they were paid for)". Then the state
    folder is lost (README: "do nothing, rerun"): the rebuilt index knows only the
    output's lines, so the job's spend silently halves: ``status`` reports half the
    money, and the cap has that much room again. Expected: the spend survives (it could
    be in the summary file next to the output, or the output itself), or the loss is
    said loudly and the cap refuses to guess."""
    path = job.write(articles(10), limits={"concurrency": 4, "max_cost_usd": 1})
    assert cli("run", path).exit_code == 0
    path = job.write(prompt="Tell me: {text}")
    assert cli("run", path).exit_code == 0
    spent = json.loads(cli("status", path, "--json").stdout)["cost_usd"]
    shutil.rmtree(job.output.with_name("job.state"))
    assert cli("run", path).exit_code == 0
    after = json.loads(cli("status", path, "--json").stdout)["cost_usd"]
    assert after == pytest.approx(spent), (spent, after)


def test_a_200_with_no_choices_is_recorded_as_a_success_and_never_sent_again(
    tmp_path: Path, cli: Any
) -> None:
    """A broken proxy answers every request 200 with a chat.completion whose ``choices``
    is empty: no answer at all. Every row is recorded as succeeded (exit 0, "done: 5 rows
    succeeded"), its export ``content`` is empty, the circuit breaker (which stops "a 2xx
    that is not a chat completion") never trips, and no rerun sends the rows again, not
    even with --retry-failed. Expected: a reply without a choice is not an answer: the
    row fails (retryable) or the breaker trips; it is not marked done."""
    from batchgpt.simulator import FaultConfig

    with SimulatorThread(SimulatorConfig(faults=FaultConfig(reply_patch={"choices": []}))) as sim:
        job = JobFiles(tmp_path, sim.base_url)
        path = job.write(articles(5))
        result = cli("run", path)
    assert result.exit_code != 0, result.output
    assert job.results() == []


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["max_cost_usd", "concurrency"])
def test_a_yaml_boolean_as_a_limit_is_taken_as_1(
    job: JobFiles, sim: Simulator, cli: Any, key: str
) -> None:
    """``limits: {max_cost_usd: yes}`` (YAML 1.1: ``yes``/``on``/``true`` are booleans) is
    accepted silently as a $1 cap; ``concurrency: true`` as 1. A boolean is not an amount:
    a settings mistake must be "a clear message naming file/line/key before any paid
    request", as ``max_cost_usd: 0`` or ``rpm: 0.5`` are. Expected: exit 1 naming
    limits.<key>, nothing sent."""
    job.write(articles(2))
    text = job.job_path.read_text().replace("limits:\n  concurrency: 8",
                                            f"limits:\n  {key}: yes")
    job.job_path.write_text(text)
    result = cli("run", job.job_path)
    assert result.exit_code == 1, result.output
    assert f"limits.{key}" in result.output
    assert sim.stats.requests == 0
