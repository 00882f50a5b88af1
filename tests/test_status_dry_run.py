"""``status`` and ``--dry-run`` agree, and the dry run shows one request as it will be sent.

Both make the plan a run would make (read-only: no lock, no repair, no network) and print
the same breakdown of the input's rows: succeeded, failed, pending, and, of the pending,
the rows whose request changed since their result. Status used to count index rows
against input lines, so a row whose prompt changed counted as done.
"""

from __future__ import annotations

import json
from typing import Any

from batchgpt.simulator import Simulator
from tests.conftest import JobFiles, articles, write_jsonl

KEYS = ("total", "succeeded", "failed", "pending", "changed", "changed_kept", "retryable",
        "to_send", "not_in_input")


def both(cli: Any, path: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    dry = cli("run", path, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    status = cli("status", path, "--json")
    assert status.exit_code == 0, status.output
    est, info = json.loads(dry.stdout), json.loads(status.stdout)
    dry_counts = {k: est["requests"][k] for k in KEYS}
    status_counts = {k: info["requests"][k] for k in KEYS}
    assert dry_counts == status_counts  # the same plan, the same counts
    return ({k: v for k, v in dry_counts.items() if k != "not_in_input"},
            {k: v for k, v in status_counts.items() if k != "not_in_input"})


def test_status_and_the_dry_run_count_the_same_rows_changed_ones_included(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    records = articles(8)
    records[0]["text"] = "__POISON__"  # fails for good
    path = job.write(records)
    assert cli("run", path).exit_code == 3
    sent = sim.stats.requests

    records[1]["text"] += " Corrected."  # two requests change
    records[2]["text"] += " Corrected."
    write_jsonl(job.input, [*records, *articles(1, start=9)])  # and one row is new
    dry, status = both(cli, path)
    assert dry == status == {"total": 9, "succeeded": 5, "failed": 1, "pending": 3,
                             "changed": 2, "changed_kept": 0, "retryable": 0, "to_send": 3}
    assert sim.stats.requests == sent  # neither sent anything

    text = cli("status", path).output
    assert "pending    3" in text
    assert "changed    2 of them: their request changed since their result; the next run " \
           "sends them again" in text
    assert "of which               1 new, 2 changed since their result" in cli(
        "run", path, "--dry-run").output

    # The run does what both said.
    assert cli("run", path).exit_code == 3
    assert sim.stats.requests == sent + 3
    assert both(cli, path)[1]["pending"] == 0


def test_with_on_change_keep_both_count_changed_rows_as_kept(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    records = articles(4)
    path = job.write(records)
    assert cli("run", path).exit_code == 0
    records[0]["text"] += " Corrected."
    write_jsonl(job.input, records)
    path = job.write(on_change="keep")
    dry, status = both(cli, path)
    assert dry == status
    assert (status["succeeded"], status["changed"], status["changed_kept"]) == (4, 0, 1)
    assert "1 changed but kept: on_change: keep" in cli("status", path).output


def test_with_on_change_error_status_counts_what_the_run_would_refuse(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    records = articles(4)
    path = job.write(records)
    assert cli("run", path).exit_code == 0
    records[3]["text"] += " Corrected."
    write_jsonl(job.input, records)
    path = job.write(on_change="error")
    info = json.loads(cli("status", path, "--json").stdout)
    assert (info["requests"]["changed"], info["requests"]["pending"]) == (1, 1)
    assert "the next run refuses to start (on_change: error)" in cli("status", path).output
    dry = cli("run", path, "--dry-run")
    assert dry.exit_code == 1 and "a0004" in dry.output


def test_rows_that_failed_for_a_reason_that_may_pass_are_failed_and_will_be_sent(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    sim.config.faults.server_error_rate = 1.0
    path = job.write(articles(3), retry={"max_attempts": 1})
    assert cli("run", path).exit_code == 6
    dry, status = both(cli, path)
    assert dry == status
    assert (status["failed"], status["retryable"], status["to_send"]) == (3, 3, 3)
    assert "3 may pass: the next run sends them again" in cli("status", path).output


def test_status_of_an_input_with_problems_shows_them_and_what_the_index_holds(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = job.write(articles(3))
    assert cli("run", path).exit_code == 0
    with job.input.open("a") as fh:
        fh.write("{not json\n")
    result = cli("status", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["input_problems"] == [f"{job.input}:4: invalid JSON: Expecting property name "
                                      "enclosed in double quotes (column 2)"]
    assert info["requests"]["succeeded"] == 3 and info["requests"]["pending"] is None
    assert "input problem:" in cli("status", path).output


# -- the sample request --------------------------------------------------------------------


def test_the_dry_run_shows_the_first_pending_rows_request_exactly_as_it_is_sent(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = job.write(articles(5), system="Be brief.", params={"max_tokens": 50,
                                                            "temperature": 0.2})
    assert cli("run", path, "--limit", "2").exit_code == 0
    sim.reset_stats()

    est = json.loads(cli("run", path, "--dry-run", "--json").stdout)
    assert est["sample_request_row"] == {"custom_id": "a0003", "line": 3}
    text = cli("run", path, "--dry-run").output
    assert "sample request: row a0003 (line 3), the JSON body sent to /chat/completions:" \
        in text
    shown = text[text.index("/chat/completions:") + len("/chat/completions:"):]
    assert json.loads(shown) == est["sample_request"]

    assert cli("run", path, "--limit", "1").exit_code == 0
    assert sim.stats.bodies == [est["sample_request"]]  # what the server received


def test_nothing_pending_means_no_sample(job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(2))
    assert cli("run", path).exit_code == 0
    est = json.loads(cli("run", path, "--dry-run", "--json").stdout)
    assert est["sample_request"] is None
    assert "sample request" not in cli("run", path, "--dry-run").output


def test_a_taken_over_result_back_in_the_input_is_read_not_written(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """A result taken over from the output for an id not in the input keeps no request
    hash; when the id comes back, the next plan adopts it. A read-only plan (status, dry
    run) used to try that write on the read-only index: an internal error, exit 70."""
    import shutil

    path = job.write(articles(3))
    assert cli("run", path).exit_code == 0
    shutil.rmtree(job.output.with_name("job.state"))  # the index is lost
    write_jsonl(job.input, articles(2))  # and a3 is out of the input when it is rebuilt
    assert cli("run", path).exit_code == 0
    write_jsonl(job.input, articles(3))  # a3 is back
    dry, status = both(cli, path)
    assert dry == status
    assert (status["succeeded"], status["pending"]) == (3, 0)
    assert sim.stats.requests == 3
