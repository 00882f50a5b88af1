"""``batchgpt export`` through the CLI, against the simulator: one row per input record in
input order, whatever order the results were written in; failed and pending rows with
their status; JSON columns; --fields; -o written atomically; nothing written in the job's
folders."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sqlite3
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

import batchgpt.export as export_module
from batchgpt.pricing import Usage, cost_usd, resolve_price
from tests.conftest import JobFiles, articles, write_jsonl

POISON = "__POISON__"  # the simulator answers 400 context_length_exceeded
HEADER = ("id,text,content,status,stale,error_code,error_message,model,prompt_tokens,"
          "completion_tokens,total_tokens,cost_usd")


def records(n: int, poison: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    rows = articles(n)
    for i in poison:
        rows[i - 1]["text"] = f"{POISON} article {i}."
    return rows


def digest(*folders: Path) -> str:
    """Every file under ``folders``: path, size, mtime and content."""
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            st = path.lstat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_mode}".encode())
            if path.is_file():
                h.update(path.read_bytes())
    return h.hexdigest()


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


def run_partly(job: JobFiles, cli: Any, n: int = 10, done: int = 8,
               poison: tuple[int, ...] = (3, 6), **overrides: Any) -> Path:
    """A job whose first ``done`` records were run (``poison`` among them failed) and
    whose other records were appended since: pending."""
    path = job.write(records(done, poison), **overrides)
    assert cli("run", path).exit_code == 3
    write_jsonl(job.input, records(n, poison))
    return path


def expected_cost(usage: dict[str, Any]) -> float | None:
    return cost_usd(Usage.from_response(usage), resolve_price("gpt-4o-mini"))


def test_jsonl_export_is_in_input_order_with_failed_and_pending_rows(
    job: JobFiles, cli: Any
) -> None:
    path = run_partly(job, cli)
    written = {r["custom_id"]: r["response"]["body"] for r in job.results()}
    result = cli("export", path)
    assert result.exit_code == 0, result.output
    rows = jsonl(result.stdout)
    assert [r["id"] for r in rows] == [f"a{i:04d}" for i in range(1, 11)]
    status = {r["id"]: r["status"] for r in rows}
    assert [k for k, v in status.items() if v == "failed"] == ["a0003", "a0006"]
    assert [k for k, v in status.items() if v == "pending"] == ["a0009", "a0010"]
    for row in rows:
        assert list(row)[:3] == ["id", "text", "content"]
        assert row["stale"] is False
        if row["status"] == "succeeded":
            body = written[row["id"]]
            assert row["content"] == body["choices"][0]["message"]["content"]
            assert row["model"] == body["model"]
            usage = body["usage"]
            assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
                usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
            assert row["cost_usd"] == pytest.approx(expected_cost(usage))
            assert row["error_code"] is None and row["error_message"] is None
        else:
            assert row["content"] is None
            assert row["prompt_tokens"] is None and row["cost_usd"] is None
            assert row["model"] == "gpt-4o-mini"  # the model the request names
    failed = next(r for r in rows if r["id"] == "a0003")
    assert failed["error_code"] == "context_length_exceeded"
    assert "maximum context length" in failed["error_message"]
    assert "exported 10 rows to stdout: 6 succeeded, 2 failed, 2 pending" in result.stderr


def test_csv_export_has_the_documented_header_and_one_row_per_record(
    job: JobFiles, cli: Any
) -> None:
    path = run_partly(job, cli)
    result = cli("export", path, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == HEADER
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["id"] for r in rows] == [f"a{i:04d}" for i in range(1, 11)]
    assert [r["status"] for r in rows] == ["succeeded", "succeeded", "failed", "succeeded",
                                           "succeeded", "failed", "succeeded", "succeeded",
                                           "pending", "pending"]
    first = rows[0]
    assert first["content"].startswith("[sandbox] Summarize: Article number 1")
    assert first["stale"] == "false"
    assert int(first["total_tokens"]) == int(first["prompt_tokens"]) + int(
        first["completion_tokens"])
    assert float(first["cost_usd"]) > 0
    assert rows[2]["error_code"] == "context_length_exceeded"
    assert rows[8]["content"] == "" and rows[8]["cost_usd"] == ""


def test_json_replies_get_a_column_per_top_level_key(job: JobFiles, cli: Any) -> None:
    path = job.write(articles(4), params={"max_tokens": 80,
                                          "response_format": {"type": "json_object"}})
    assert cli("run", path).exit_code == 0
    result = cli("export", path, "--format", "csv")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split(",")
    assert header[:6] == ["id", "text", "content", "json.sandbox", "json.label",
                          "json.summary"]
    for row in csv.DictReader(io.StringIO(result.stdout)):
        reply = json.loads(row["content"])
        assert row["json.label"] == reply["label"]
        assert row["json.summary"] == reply["summary"]
        assert row["json.sandbox"] == "true"
    rows = jsonl(cli("export", path).stdout)
    assert rows[0]["json.sandbox"] is True  # JSONL keeps the JSON types


def test_no_json_columns_when_the_job_does_not_ask_for_json(job: JobFiles, cli: Any) -> None:
    path = job.write(articles(2))
    assert cli("run", path).exit_code == 0
    rows = jsonl(cli("export", path).stdout)
    assert not [k for k in rows[0] if k.startswith("json.")]


def test_fields_select_and_order_the_columns(job: JobFiles, cli: Any) -> None:
    path = run_partly(job, cli)
    result = cli("export", path, "--format", "csv", "--fields", "status,id,cost_usd")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "status,id,cost_usd"
    assert lines[3] == "failed,a0003,"
    assert lines[10] == "pending,a0010,"
    rows = jsonl(cli("export", path, "--fields", "id,error_code").stdout)
    assert rows[2] == {"id": "a0003", "error_code": "context_length_exceeded"}
    assert rows[9] == {"id": "a0010", "error_code": None}
    assert "left out" not in result.stderr


def test_unknown_field_is_an_error_listing_the_available_ones(job: JobFiles, cli: Any) -> None:
    path = run_partly(job, cli)
    result = cli("export", path, "--fields", "id,stattop", "-o", job.dir / "x.jsonl")
    assert result.exit_code == 2
    assert "unknown field 'stattop'" in result.stderr
    assert ("available: id, text, content, status, stale, error_code, error_message, model, "
            "prompt_tokens, completion_tokens, total_tokens, cost_usd") in result.stderr
    assert result.stdout == ""
    assert not (job.dir / "x.jsonl").exists()


def test_o_replaces_the_file_atomically_and_leaves_no_temporary_file(
    job: JobFiles, cli: Any
) -> None:
    path = run_partly(job, cli)
    dest_dir = job.dir / "exports"
    dest_dir.mkdir()
    dest = dest_dir / "results.csv"
    dest.write_text("previous export\n")
    before = dest.stat().st_ino
    result = cli("export", path, "--format", "csv", "-o", dest)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert dest.read_text().splitlines()[0] == HEADER
    assert len(dest.read_text().splitlines()) == 11
    assert dest.stat().st_ino != before  # a new file renamed over the old one
    assert oct(dest.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert [p.name for p in dest_dir.iterdir()] == ["results.csv"]
    assert f"exported 10 rows to {dest}" in result.stderr

    # a failed export leaves the previous file as it was, and no temporary file
    job.write([*records(10, (3, 6)), "{not json"])
    failed = cli("export", path, "--format", "csv", "-o", dest)
    assert failed.exit_code == 1
    assert "invalid JSON" in failed.stderr
    assert dest.read_text().splitlines()[0] == HEADER
    assert [p.name for p in dest_dir.iterdir()] == ["results.csv"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_writes_nothing_in_the_jobs_folders(job: JobFiles, cli: Any) -> None:
    path = run_partly(job, cli)
    folders = (job.dir / "jobs", job.dir / "data", job.dir / "out")
    before = digest(*folders)
    for fmt in ("jsonl", "csv"):
        assert cli("export", path, "--format", fmt).exit_code == 0
    assert cli("export", path, "--format", "csv", "-o", job.dir / "x.csv").exit_code == 0
    assert digest(*folders) == before


def test_export_before_any_run_lists_every_row_as_pending_and_creates_nothing(
    job: JobFiles, cli: Any
) -> None:
    path = job.write(articles(3))
    result = cli("export", path)
    assert result.exit_code == 0, result.output
    assert [(r["id"], r["status"]) for r in jsonl(result.stdout)] == [
        ("a0001", "pending"), ("a0002", "pending"), ("a0003", "pending")]
    assert not (job.dir / "out").exists()


def test_a_result_for_an_earlier_request_is_exported_and_marked_stale(
    job: JobFiles, cli: Any
) -> None:
    path = job.write(articles(3))
    assert cli("run", path).exit_code == 0
    old = jsonl(cli("export", path).stdout)
    job.write(prompt="Summarize briefly: {text}")
    result = cli("export", path)
    rows = jsonl(result.stdout)
    assert [(r["status"], r["stale"]) for r in rows] == [("succeeded", True)] * 3
    assert [r["content"] for r in rows] == [r["content"] for r in old]
    assert "3 results answer an earlier version of their row's request" in result.stderr


def test_a_changed_row_whose_new_request_failed_shows_both(job: JobFiles, cli: Any) -> None:
    path = job.write(articles(2))
    assert cli("run", path).exit_code == 0
    changed = articles(2)
    changed[1]["text"] = f"{POISON} now."
    job.write(changed)
    assert cli("run", path).exit_code == 3  # the new request fails; the old result stays
    rows = jsonl(cli("export", path).stdout)
    assert rows[0]["stale"] is False
    second = rows[1]
    assert (second["status"], second["stale"], second["error_code"]) == (
        "succeeded", True, "context_length_exceeded")
    assert second["content"].startswith("[sandbox] Summarize: Article number 2")


def test_chat_lines_export_custom_id_and_the_last_user_message(job: JobFiles,
                                                              cli: Any) -> None:
    lines = [{"id": f"c{i}", "messages": [
        {"role": "user", "content": f"First question {i}."},
        {"role": "assistant", "content": "An answer."},
        {"role": "user", "content": f"Second question {i}."}]} for i in range(1, 4)]
    path = job.write(lines)
    job.config.pop("prompt")
    job.write()
    assert cli("run", path).exit_code == 0
    result = cli("export", path, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert result.stdout.splitlines()[0].startswith("custom_id,last_user_message,content,")
    assert [(r["custom_id"], r["last_user_message"]) for r in rows] == [
        (f"c{i}", f"Second question {i}.") for i in range(1, 4)]
    assert rows[0]["content"] == "[sandbox] Second question 1."


def test_record_fields_named_like_export_columns_are_renamed(job: JobFiles,
                                                            cli: Any) -> None:
    recs = [{**a, "status": "draft", "model": "m"} for a in articles(2)]
    path = job.write(recs)
    assert cli("run", path).exit_code == 0
    rows = jsonl(cli("export", path).stdout)
    assert list(rows[0])[:5] == ["id", "text", "input.status", "input.model", "content"]
    assert rows[0]["input.status"] == "draft" and rows[0]["status"] == "succeeded"


def test_every_record_field_keeps_its_value_in_a_column_of_its_own(job: JobFiles,
                                                                   cli: Any) -> None:
    """Renamed fields can't collide with fields already named ``input.<name>``: those are
    renamed too, the same way on every row (a record that lacks ``status`` doesn't shift
    what the ``input.status`` column means)."""
    recs = [{"id": "a1", "text": "Hello. More.", "status": "open", "input.status": "x",
             "input.input.status": "y", "json.k": 1, "input.json.k": 2},
            {"id": "a2", "text": "Hi. More.", "input.status": "only"}]
    path = job.write(recs)
    assert cli("run", path).exit_code == 0
    rows = jsonl(cli("export", path).stdout)
    assert {k: v for k, v in rows[0].items() if k.startswith("input.")} == {
        "input.status": "open", "input.input.status": "x", "input.input.input.status": "y",
        "input.json.k": 1, "input.input.json.k": 2}
    assert rows[0]["status"] == "succeeded"
    assert rows[1]["input.input.status"] == "only" and "input.status" not in rows[1]
    table = list(csv.DictReader(io.StringIO(cli("export", path, "--format", "csv").stdout)))
    assert [(r["input.status"], r["input.input.status"]) for r in table] == [
        ("open", "x"), ("", "only")]


def test_csv_columns_come_from_the_first_rows_and_later_fields_are_dropped_once(
    job: JobFiles, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "LOOKAHEAD", 3)
    recs = articles(6)
    recs[1]["topic"] = "early"  # within the first 3 rows: a column
    recs[4]["late"] = "x"  # after them: left out of CSV, kept in JSONL
    recs[5]["late"] = "y"
    recs[5]["later"] = 1
    path = job.write(recs)
    assert cli("run", path).exit_code == 0
    result = cli("export", path, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("id,text,topic,content,")
    assert result.stderr.count("left out") == 1
    assert "2 fields not in the first 3 rows left out of the CSV columns: 'late' (first on " \
           "line 5), 'later' (first on line 6)" in result.stderr
    rows = jsonl(cli("export", path).stdout)
    assert rows[4]["late"] == "x" and rows[5]["later"] == 1 and "topic" not in rows[0]


def test_o_onto_the_jobs_own_files_is_refused(job: JobFiles, cli: Any) -> None:
    path = job.write(articles(2))
    assert cli("run", path).exit_code == 0
    before = job.output.read_bytes()
    for target in (job.output, job.input, path, job.dir / "out" / "job.state" / "x"):
        result = cli("export", path, "-o", target)
        assert result.exit_code == 1, target
        assert "-o" in result.stderr
    assert job.output.read_bytes() == before


def test_an_output_that_no_longer_matches_its_index_is_refused(job: JobFiles,
                                                              cli: Any) -> None:
    path = job.write(articles(3))
    assert cli("run", path).exit_code == 0
    db = sqlite3.connect(job.dir / "out" / "job.state" / "rows.sqlite")
    db.execute("UPDATE results SET off = off + 1 WHERE custom_id = 'a0002'")
    db.commit()
    db.close()
    dest = job.dir / "x.csv"
    result = cli("export", path, "--format", "csv", "-o", dest)
    assert result.exit_code == 1
    assert "is not the result of 'a0002'" in result.stderr
    assert f"batchgpt run {path}" in result.stderr
    assert not dest.exists()


def test_unknown_format_is_a_usage_error(job: JobFiles, cli: Any) -> None:
    path = job.write(articles(1))
    result = cli("export", path, "--format", "xlsx")
    assert result.exit_code == 2
    assert "--format must be one of jsonl, csv, parquet" in result.stderr


def test_parquet_without_pyarrow_says_how_to_install_it(
    job: JobFiles, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = job.write(articles(2))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow → ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    result = cli("export", path, "--format", "parquet", "-o", job.dir / "x.parquet")
    assert result.exit_code == 1
    assert "pip install 'batchgpt[parquet]'" in result.stderr
    assert not (job.dir / "x.parquet").exists()


def test_parquet_export_in_row_groups(job: JobFiles, cli: Any,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(export_module, "ROW_GROUP", 4)
    path = run_partly(job, cli)
    dest = job.dir / "x.parquet"
    result = cli("export", path, "--format", "parquet", "-o", dest)
    assert result.exit_code == 0, result.output
    meta = pq.ParquetFile(dest).metadata
    assert meta.num_rows == 10 and meta.num_row_groups == 3
    table = pq.read_table(dest)
    assert table.column_names == HEADER.split(",")
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"a{i:04d}" for i in range(1, 11)]
    assert [r["status"] for r in rows][2:4] == ["failed", "succeeded"]
    assert isinstance(rows[0]["prompt_tokens"], int) and rows[0]["stale"] is False
    assert rows[9]["cost_usd"] is None and rows[0]["cost_usd"] > 0


def test_results_the_index_missed_are_exported_without_repairing_anything(
    job: JobFiles, cli: Any
) -> None:
    """A run killed between writing a result and indexing it leaves the index behind the
    output: the export reads the output as a run would take it over (in memory), and
    leaves the repair to the next run."""
    path = job.write(articles(4))
    assert cli("run", path).exit_code == 0
    data = job.output.read_bytes()
    cut = data.rindex(b"\n", 0, len(data) - 1) + 1
    last = json.loads(data[cut:])["custom_id"]
    db = sqlite3.connect(job.dir / "out" / "job.state" / "rows.sqlite")
    with db:
        db.execute("DELETE FROM results WHERE custom_id = ?", (last,))
        db.execute("UPDATE meta SET value = ? WHERE key = 'output_size'", (str(cut),))
        db.execute("UPDATE meta SET value = ? WHERE key = 'output_crc'",
                   (str(zlib.crc32(data[:cut])),))
        db.execute("DELETE FROM meta WHERE key = 'fingerprint'")
    db.close()
    folders = (job.dir / "jobs", job.dir / "data", job.dir / "out")
    before = digest(*folders)
    result = cli("export", path)
    assert result.exit_code == 0, result.output
    rows = jsonl(result.stdout)
    assert [r["status"] for r in rows] == ["succeeded"] * 4
    taken = next(r for r in rows if r["id"] == last)
    assert taken["content"].startswith("[sandbox] ") and taken["stale"] is False
    assert "would take over 1 results" in result.stderr
    assert digest(*folders) == before


def test_after_the_state_was_lost_answers_to_an_older_prompt_are_exported_as_stale(
    job: JobFiles, cli: Any
) -> None:
    """The index is gone and the prompt changed since: each line's answer tag says it
    answers the older request, so the export marks it stale instead of passing it off as
    the answer to today's prompt — and writes nothing while finding out."""
    import shutil

    path = job.write(records(4))
    assert cli("run", path).exit_code == 0
    shutil.rmtree(job.output.with_name("job.state"))
    job.write(prompt="Summarize in one line: {text}")
    before = digest(job.dir)
    result = cli("export", path, "--format", "jsonl")
    assert result.exit_code == 0, result.output
    rows = jsonl(result.stdout)
    assert [r["status"] for r in rows] == ["succeeded"] * 4
    assert all(r["stale"] for r in rows)
    assert digest(job.dir) == before


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_an_export_stopped_by_a_signal_leaves_the_previous_file_and_no_temporary_one(
    job: JobFiles, cli: Any, sig: str, code: int
) -> None:
    """``export -o`` of a large job, stopped by SIGTERM (cron's ``timeout``, systemd) or
    Ctrl-C while it writes: the previous file is kept as it was, the temporary file is
    removed, and one line says so (exit 143 / 130)."""
    import signal
    import subprocess
    import time

    path = job.write(articles(1))
    assert cli("run", path).exit_code == 0
    template = job.results()[0]
    recs = articles(100_000)
    write_jsonl(job.input, recs)
    with job.output.open("w", encoding="utf-8") as fh:  # results another run wrote
        for r in recs:
            template["custom_id"] = r["id"]
            tag = r["id"].encode().hex().ljust(32, "0")  # uuid-like: 13th digit 4
            template["id"] = "batch_req_" + tag[:12] + "4" + tag[13:]
            fh.write(json.dumps(template) + "\n")
    shutil.rmtree(job.output.with_name("job.state"))  # the export takes the output over
    dest = job.dir / "res.csv"
    dest.write_text("the previous export\n", encoding="utf-8")
    cmd = [str(Path(sys.executable).with_name("batchgpt")), "export", str(path), "--format",
           "csv", "-o", str(dest)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(job.dir.glob(".res.csv.*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the export ended before it could be stopped"
        time.sleep(0.005)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert list(job.dir.glob(".res.csv.*")) == []
    assert dest.read_text(encoding="utf-8") == "the previous export\n"
    assert f"interrupted ({sig}) during the export; nothing half-written" in err.decode()
    assert b"Traceback" not in err
