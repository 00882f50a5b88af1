"""The verified prefix: a resume reads only the lines appended since the input was last
found valid and done — and reads everything the moment anything else changed.

Each test runs real jobs through the CLI against the simulator. Which way the plan went
is seen by wrapping :meth:`InputFile.scan` (batchgpt's own reader) to note where it
started; what matters is asserted on what the simulator received and on the files, and
every plan that trusted a prefix is compared with the full scan's plan of the same state.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchgpt import prefix
from batchgpt.config import JobConfig
from batchgpt.plan import Plan, make_plan
from batchgpt.simulator import Simulator
from batchgpt.source import InputFile, ResumeAt
from batchgpt.store import Store
from tests.conftest import JobFiles, articles, write_jsonl


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[ResumeAt | None]:
    """Where each scan of an input started: None for the whole file."""
    seen: list[ResumeAt | None] = []
    real = InputFile.scan

    def scan(self: InputFile, resume: ResumeAt | None = None) -> Iterator[Any]:
        seen.append(resume)
        return real(self, resume)

    monkeypatch.setattr(InputFile, "scan", scan)
    return seen


def _plan(path: Path, *, use_prefix: bool) -> Plan:
    job = JobConfig.load(path)
    store = Store(job)
    store.open_readonly()
    real = prefix.trusted
    try:
        if not use_prefix:
            prefix.trusted = lambda *args: None  # type: ignore[assignment]
        return make_plan(job, InputFile(job), store, retry_failed=False, limit=None,
                         refuse_changed=False)
    finally:
        prefix.trusted = real  # type: ignore[assignment]
        store.close()


def assert_same_plan_as_the_full_scan(path: Path) -> Plan:
    with_prefix, full = _plan(path, use_prefix=True), _plan(path, use_prefix=False)
    fields = [f.name for f in dataclasses.fields(Plan) if f.name != "checks"]
    assert {f: getattr(with_prefix, f) for f in fields} == {f: getattr(full, f) for f in fields}
    return with_prefix


def _index_path(path: Path) -> Path:
    return JobConfig.load(path).state_dir / "rows.sqlite"


def _done_job(job: JobFiles, cli: Any, n: int = 20, **overrides: Any) -> Path:
    """A job whose rows all succeeded, resumed once (which records the prefix)."""
    path = job.write(articles(n), **overrides)
    assert cli("run", path).exit_code == 0
    assert cli("run", path).exit_code == 0
    return path


def test_a_resume_after_all_rows_succeeded_reads_only_the_lines_appended_since(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    path = _done_job(job, cli)
    size = job.input.stat().st_size
    sent = sim.stats.requests
    scans.clear()
    assert cli("run", path).exit_code == 0  # nothing new: nothing read but the hash
    assert scans == [ResumeAt(size, 20, "template", 1)]
    assert sim.stats.requests == sent

    write_jsonl(job.input, articles(25))  # five rows appended
    scans.clear()
    result = cli("run", path)
    assert result.exit_code == 0, result.output
    assert [s.offset if s else None for s in scans] == [size]
    assert sim.stats.requests == sent + 5
    assert sorted(r["custom_id"] for r in job.results()) == sorted(
        r["id"] for r in articles(25))
    assert_same_plan_as_the_full_scan(path)


def test_a_changed_byte_in_the_prefix_means_the_full_scan_and_the_row_is_sent_again(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    path = _done_job(job, cli)
    data = job.input.read_bytes()
    at = data.index(b"Article number 3 ")
    job.input.write_bytes(data[:at] + b"Brticle" + data[at + 7:])  # same length
    sent = sim.stats.requests
    assert_same_plan_as_the_full_scan(path)
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans[0] is None
    assert sim.stats.requests == sent + 1


@pytest.mark.parametrize("change", [
    {"prompt": "Summarise in one line: {text}"},
    {"params": {"max_tokens": 51}},
    {"model": "gpt-4o"},
    {"system": "Be brief."},
])
def test_a_changed_row_shaping_setting_means_the_full_scan(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None],
    change: dict[str, Any],
) -> None:
    path = _done_job(job, cli)
    sent = sim.stats.requests
    path = job.write(**change)
    assert_same_plan_as_the_full_scan(path)
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans[0] is None
    assert sim.stats.requests == sent + 20  # every request changed


def test_a_setting_that_shapes_no_row_keeps_the_prefix(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    path = _done_job(job, cli)
    path = job.write(limits={"concurrency": 3}, timeout_s=7, retry={"max_attempts": 2})
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans[0] is not None


def test_a_result_removed_from_the_index_means_the_full_scan_and_the_same_plan(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    """An index edited behind batchgpt's back (the output untouched, so it is trusted as
    it is): the prefix recorded before is not, and the plan is the full scan's — the row
    whose result is gone from the index is pending again."""
    path = _done_job(job, cli)
    db = sqlite3.connect(_index_path(path))
    with db:
        db.execute("DELETE FROM results WHERE custom_id = 'a0005'")
    db.close()
    sent = sim.stats.requests
    assert assert_same_plan_as_the_full_scan(path).new == 1
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans[0] is None
    assert sim.stats.requests == sent + 1


def test_a_rebuilt_index_means_the_full_scan(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    path = _done_job(job, cli)
    index = _index_path(path)
    assert index.exists()
    for f in index.parent.glob("rows.sqlite*"):
        f.unlink()
    sent = sim.stats.requests
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans[0] is None
    assert sim.stats.requests == sent


def test_an_index_whose_triggers_were_dropped_is_not_trusted(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    path = _done_job(job, cli)
    db = sqlite3.connect(_index_path(path))
    with db:
        db.execute("DROP TRIGGER prefix_result_deleted")
    db.close()
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans[0] is None


def test_a_result_replaced_in_the_index_means_the_full_scan(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    """A done row's recorded request hash changes (what a re-sent changed row does):
    the epoch moves, and the row counts as changed."""
    path = _done_job(job, cli)
    db = sqlite3.connect(_index_path(path))
    with db:
        db.execute("UPDATE results SET req_hash = 'other' WHERE custom_id = 'a0007'")
    db.close()
    sent = sim.stats.requests
    plan = assert_same_plan_as_the_full_scan(path)
    assert plan.changed == 1
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans[0] is None
    assert sim.stats.requests == sent + 1


def test_an_appended_row_repeating_a_prefix_id_is_refused_as_by_the_full_scan(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    path = _done_job(job, cli)
    records = articles(20)
    write_jsonl(job.input, [*records, {**records[4], "text": "again"}])
    sent = sim.stats.requests
    result = cli("run", path)
    assert result.exit_code != 0
    assert "duplicate id 'a0005'" in result.output and "first on line 5" in result.output
    assert sim.stats.requests == sent


def test_a_bad_line_appended_after_the_prefix_is_reported_with_its_line_number(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    path = _done_job(job, cli)
    with job.input.open("a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    sent = sim.stats.requests
    result = cli("run", path)
    assert result.exit_code != 0
    assert ":21:" in result.output and "invalid JSON" in result.output
    assert sim.stats.requests == sent


def test_a_prefix_cut_short_means_the_full_scan(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    path = _done_job(job, cli)
    write_jsonl(job.input, articles(12))
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans[0] is None
    assert_same_plan_as_the_full_scan(path)


def test_status_and_the_dry_run_use_the_prefix_and_count_the_same(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    path = _done_job(job, cli)
    write_jsonl(job.input, articles(23))
    scans.clear()
    info = json.loads(cli("status", path, "--json").stdout)
    dry = json.loads(cli("run", path, "--dry-run", "--json").stdout)
    assert all(s is not None for s in scans)
    assert info["requests"]["succeeded"] == dry["requests"]["succeeded"] == 20
    assert info["requests"]["pending"] == 3
    assert_same_plan_as_the_full_scan(path)


def test_a_run_that_finishes_every_row_extends_the_prefix_to_the_end_of_its_input(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    """The nightly pattern: rows appended, a run sends them; the next run reads only what
    was appended after that — never the whole file again."""
    path = _done_job(job, cli)
    write_jsonl(job.input, articles(25))
    assert cli("run", path).exit_code == 0
    size = job.input.stat().st_size
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans == [ResumeAt(size, 25, "template", 1)]

    write_jsonl(job.input, articles(30))
    sent = sim.stats.requests
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert [s.offset if s else None for s in scans] == [size]
    assert sim.stats.requests == sent + 5
    assert_same_plan_as_the_full_scan(path)


def test_a_row_that_failed_is_never_inside_the_prefix(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    """The prefix ends before the first row not done; the rows after a failed one are
    read on every run. Those a run finished after the prefix was recorded are known not
    to repeat a prefix id (their results are newer than it); older ones could, and only
    the full scan can tell."""
    path = _done_job(job, cli)
    size = job.input.stat().st_size
    write_jsonl(job.input, [*articles(20), {"id": "p1", "text": "__POISON__"},
                            *articles(2, start=21)])
    assert cli("run", path).exit_code == 3
    sent = sim.stats.requests
    scans.clear()
    assert cli("run", path).exit_code == 3  # the failed row is kept failed, not sent
    assert [s.offset if s else None for s in scans] == [size]
    assert sim.stats.requests == sent

    path = job.write(prompt="Summarize briefly: {text}")  # every request changes
    assert cli("run", path).exit_code == 3
    sent = sim.stats.requests
    scans.clear()
    assert cli("run", path).exit_code == 3  # a full scan, which records the prefix anew
    assert cli("run", path).exit_code == 3  # rows after p1 are older than that record
    assert [s.offset if s else None for s in scans] == [None, size, None]
    assert sim.stats.requests == sent
    plan = assert_same_plan_as_the_full_scan(path)
    assert plan.failed_kept == 1 and plan.done == 22


def test_a_run_that_resends_changed_rows_still_extends_the_prefix(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    """Its own replaced results move the epoch by exactly their number: that is not
    taken for a change made behind its back."""
    path = _done_job(job, cli)
    records = articles(20)
    records[3]["text"] += " Corrected."
    write_jsonl(job.input, records)
    sent = sim.stats.requests
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests == sent + 1
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans == [ResumeAt(job.input.stat().st_size, 20, "template", 1)]


def test_a_lost_output_means_the_full_scan_and_every_row_is_sent_again(
    job: JobFiles, sim: Simulator, cli: Any, scans: list[ResumeAt | None]
) -> None:
    """The results are gone with the output: the run's repair removes them from the
    index (which moves the epoch), so the prefix recorded before is not trusted."""
    path = _done_job(job, cli)
    job.output.unlink()
    sent = sim.stats.requests
    scans.clear()
    assert cli("run", path).exit_code == 0
    assert scans[0] is None
    assert sim.stats.requests == sent + 20
    assert len(job.results()) == 20
