"""Bring the index back in line with the output before anything is planned or sent.

The output is the durable record; the index follows it. On every open, in order of cost:

1. **Trusted as is** — the output's stat fingerprint and size are exactly what the last
   commit recorded: nobody touched it. No read at all.
2. **Prefix intact, tail new** — the output is at least as long as the committed size and
   the CRC-32 of that prefix is the one recorded: what the index points at is byte for
   byte what was written. Only the lines after it are read: complete result lines there
   (written, then the process died before its commit — paid results) are **taken over**;
   a torn final fragment is set aside to a file named in the log, then cut off.
3. **Rebuilt** — anything else (index missing or damaged, output shorter, edited, reordered,
   replaced, an interrupted compaction whose file vanished): every line of the output is
   read, each id's live line chosen (the one the index points at if it is still there,
   else the last one), offsets corrected, ids no longer in the output dropped from the
   index (they will be sent again, and the log says how many), ids the index did not know
   taken over, and duplicate or unreadable lines dropped by a compaction (unreadable
   ones set aside first). When the index itself was lost, the failures file is read
   back too.

A taken-over result has no request hash: the plan adopts it as the result of its row's
current request (see ``Index.adopt``); ``on_change`` applies to changes made after that.

``dry=True`` (dry runs and status) does all of this against an in-memory copy of the
index and touches no file; the report says what a real run would do.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from batchgpt.pricing import Usage
from batchgpt.store.index import SPEND_INSERT, SPEND_UPSERT, Index, NewFailure, NewResult
from batchgpt.store.output_log import (
    Fingerprint,
    OutputLog,
    discard_file,
    parse_result_line,
    tag_of,
)

log = logging.getLogger("batchgpt")

CHUNK = 5_000


@dataclass
class Report:
    """What recovery found and did (or, dry, would do)."""

    taken_over: int = 0
    lost: int = 0
    failures_taken_over: int = 0
    set_aside: list[Path] = field(default_factory=list)
    torn_bytes: int = 0
    unreadable_lines: int = 0
    rebuilt: bool = False

    def messages(self, output: Path, dry: bool) -> Iterator[str]:
        would = "would " if dry else ""
        if self.torn_bytes:
            where = f" to {self.set_aside[0]}" if self.set_aside else ""
            yield (f"{output}: {would}set aside a torn last line ({self.torn_bytes} bytes, "
                   f"an interrupted write){where}")
        if self.unreadable_lines:
            where = f" to {self.set_aside[-1]}" if self.set_aside else ""
            yield (f"{output}: {self.unreadable_lines} lines are not results batchgpt can "
                   f"read; {would}set them aside{where}")
        if self.taken_over:
            yield (f"would take over {self.taken_over} results from {output}" if dry
                   else f"took over {self.taken_over} results from {output}")
        if self.failures_taken_over:
            yield (f"{'would take' if dry else 'took'} over {self.failures_taken_over} failed "
                   "rows from the failures file")
        if self.lost:
            yield (f"{self.lost} results the checkpoint recorded are no longer in {output} "
                   "(removed or edited outside batchgpt); those rows will be sent again")


def trusted(fp: Fingerprint | None, index: Index) -> bool:
    """Tier 1: the output, whose fingerprint is ``fp`` (None: there is none), is exactly
    what the last commit left (no read needed)."""
    return (fp is not None and index.meta("fingerprint") == fp.dumps()
            and index.meta_int("output_size") == fp.size and index.meta("output_crc") is not None
            and not index.meta("compacting"))


BillAs = Callable[[str | None], str | None]


def recover(out: OutputLog, index: Index, failures_path: Path, *, dry: bool,
            index_was_lost: bool, bill_as: BillAs | None = None) -> Report:
    """``bill_as`` maps the model a taken-over line names to the model it is priced as
    (a server alias with no price is billed as the job's model, as a run bills it)."""
    report = Report()
    _finish_compaction(out, index, dry)
    fp = out.fingerprint()
    committed = index.meta_int("output_size")
    crc_text = index.meta("output_crc")
    if fp is None:
        lost = index.result_count()
        if lost:
            report.lost = lost
            with index.transaction() as db:
                db.execute("DELETE FROM results")
                index.set_meta(output_size=0, output_crc=0, fingerprint=None, dead_lines=0)
        out.start(0, 0)
        if index_was_lost:
            _take_over_failures(index, failures_path, report)
        return report
    if not index_was_lost and trusted(fp, index) and crc_text is not None:
        out.start(committed, int(crc_text))
        return report
    if (not index_was_lost and crc_text is not None and fp.size >= committed
            and out.checksum(committed) == int(crc_text)):
        _take_over_tail(out, index, _Scan(out, committed, int(crc_text), bill_as), report,
                        dry)
    else:
        _rebuild(out, index, _Scan(out, 0, 0, bill_as), report, dry, index_was_lost)
        if index_was_lost:
            _take_over_failures(index, failures_path, report)
    return report


# -- tier 2 ---------------------------------------------------------------------------------

def _take_over_tail(out: OutputLog, index: Index, scan: _Scan, report: Report,
                    dry: bool) -> None:
    """A tail line is a newer answer than the index's for its id (the writer only ever
    appends) — unless its tag says it answers the very request the index already has an
    answer for: then it is a copy (`tail -1 out >> out`), dead, and not paid twice."""
    dead = 0
    with index.transaction():
        batch: dict[str, NewResult] = {}

        def commit() -> int:
            copies = index.answered(list(batch.items()))
            for cid in copies:
                del batch[cid]
            index.commit(list(batch.values()), [], None)  # counts what it replaces
            return len(copies)

        for cid, off, length, model, p, c, cached, reasoning, tag in scan.results():
            if cid in batch:
                dead += 1  # an id twice in the tail: the later line wins
            batch[cid] = NewResult(cid, None, off, length, 1, model, Usage.model_construct(
                prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                cached_tokens=cached, reasoning_tokens=reasoning), tag)
            if len(batch) >= CHUNK:
                dead += commit()
                batch = {}
        if batch:
            dead += commit()
        report.taken_over = scan.good - dead
        _settle_file(out, index, scan, report, dry, extra_dead=dead)


# -- tier 3 ---------------------------------------------------------------------------------

def _rebuild(out: OutputLog, index: Index, scan: _Scan, report: Report, dry: bool,
             index_was_lost: bool) -> None:
    """Everything in SQL over a temporary table of the output's lines, so memory stays
    flat whatever the output's size."""
    report.rebuilt = True
    insert = ("INSERT INTO scan (custom_id, off, len, model, p, c, cached, reasoning, tag) "
              "VALUES (?,?,?,?,?,?,?,?,?)")
    with index.transaction() as db:
        db.execute("DROP TABLE IF EXISTS temp.scan")
        db.execute("CREATE TEMP TABLE scan (seq INTEGER PRIMARY KEY, custom_id TEXT NOT NULL, "
                   "off INTEGER, len INTEGER, model TEXT, p INTEGER, c INTEGER, cached INTEGER, "
                   "reasoning INTEGER, tag TEXT)")
        rows = scan.results()
        while chunk := list(itertools.islice(rows, CHUNK)):
            db.executemany(insert, chunk)
        db.execute("CREATE INDEX temp.scan_id ON scan (custom_id, seq)")
        # The live line of each id, in order of preference: the line the index points at,
        # still in place and (if tagged) tagged for the index's request; the last line
        # tagged for the index's request; the id's last line.
        db.execute("DROP TABLE IF EXISTS temp.live")
        db.execute(
            "CREATE TEMP TABLE live AS SELECT s.* FROM scan s WHERE s.seq = COALESCE("
            "(SELECT s2.seq FROM scan s2 JOIN results r ON r.custom_id = s2.custom_id "
            " AND r.off = s2.off AND r.len = s2.len WHERE s2.custom_id = s.custom_id "
            " AND (s2.tag IS NULL OR r.req_hash IS NULL "
            "      OR s2.tag = answer_tag(r.custom_id, r.req_hash))), "
            "(SELECT MAX(s3.seq) FROM scan s3 JOIN results r ON r.custom_id = s3.custom_id "
            " WHERE s3.custom_id = s.custom_id AND r.req_hash IS NOT NULL "
            " AND s3.tag = answer_tag(r.custom_id, r.req_hash)), "
            "(SELECT MAX(s4.seq) FROM scan s4 WHERE s4.custom_id = s.custom_id))"
        )
        db.execute("CREATE UNIQUE INDEX temp.live_id ON live (custom_id)")
        # Spares: an id's other answers, tagged for another request than its live line's.
        # Which one answers the row's request only the next plan can tell (a killed run's
        # unrecorded answer beside an older one, reordered by hand): keep them till then.
        db.execute("DELETE FROM spare")
        db.execute(
            "INSERT OR REPLACE INTO spare SELECT s.custom_id, s.tag, s.off, s.len, s.model, "
            "s.p, s.c, s.cached, s.reasoning FROM scan s JOIN live l "
            "ON l.custom_id = s.custom_id WHERE s.seq != l.seq AND s.tag IS NOT NULL "
            "AND s.tag IS NOT COALESCE(l.tag, '') ORDER BY s.seq")
        spares = db.execute("SELECT COUNT(*) FROM spare").fetchone()[0]
        report.lost = db.execute(
            "SELECT COUNT(*) FROM results WHERE custom_id NOT IN (SELECT custom_id FROM live)"
        ).fetchone()[0]
        db.execute("DELETE FROM results WHERE custom_id NOT IN (SELECT custom_id FROM live)")
        # A result whose live line is not its recorded line and not tagged for its request
        # (an older copy, a reordered file), or that has spares: which request it answers
        # is checked against the row's request at the next plan, by the lines' tags.
        db.execute("UPDATE results SET req_hash = NULL, tag = (SELECT tag FROM live "
                   "WHERE live.custom_id = results.custom_id) WHERE EXISTS (SELECT 1 FROM live "
                   "WHERE live.custom_id = results.custom_id AND (results.req_hash IS NULL "
                   "OR live.tag IS NOT NULL AND live.tag != answer_tag(results.custom_id, "
                   "results.req_hash) OR live.tag IS NULL AND (live.off != results.off "
                   "OR live.len != results.len) OR EXISTS (SELECT 1 FROM spare "
                   "WHERE spare.custom_id = results.custom_id)))")
        db.execute("UPDATE results SET "
                   "off = (SELECT off FROM live WHERE live.custom_id = results.custom_id), "
                   "len = (SELECT len FROM live WHERE live.custom_id = results.custom_id) "
                   "WHERE EXISTS (SELECT 1 FROM live WHERE live.custom_id = results.custom_id "
                   "AND (live.off != results.off OR live.len != results.len))")
        # Taken over: ids the index did not know. Paid for, so they count as spend.
        db.execute("CREATE TEMP TABLE new AS SELECT * FROM live WHERE custom_id NOT IN "
                   "(SELECT custom_id FROM results)")
        report.taken_over = db.execute("SELECT COUNT(*) FROM temp.new").fetchone()[0]
        db.execute("INSERT INTO results SELECT custom_id, NULL, off, len, 1, model, p, c, "
                   "cached, reasoning, NULL, ?, tag FROM temp.new", (time.time(),))
        db.execute("DELETE FROM failures WHERE custom_id IN (SELECT custom_id FROM temp.new)")
        db.execute(f"{SPEND_INSERT} SELECT COALESCE(model, ''), COUNT(*), SUM(p), SUM(c), "
                   "SUM(cached), SUM(reasoning) FROM temp.new WHERE true "
                   f"GROUP BY COALESCE(model, '') {SPEND_UPSERT}")
        if index_was_lost:  # every answer in the output was paid for, spares too
            db.execute(f"{SPEND_INSERT} SELECT COALESCE(model, ''), COUNT(*), "
                       "SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), "
                       "SUM(reasoning_tokens) FROM spare WHERE true "
                       f"GROUP BY COALESCE(model, '') {SPEND_UPSERT}")
        live = db.execute("SELECT COUNT(*) FROM temp.live").fetchone()[0]
        for table in ("new", "live", "scan"):
            db.execute(f"DROP TABLE temp.{table}")
        index.set_meta(dead_lines=0)  # every line of the file is accounted for below
        _settle_file(out, index, scan, report, dry, extra_dead=scan.good - live - spares)


# -- shared -----------------------------------------------------------------------------------

class _Scan:
    """One pass over the output from ``start``: the result lines, counted; unreadable
    lines and a torn fragment noted (not kept: they are re-read to be set aside)."""

    def __init__(self, out: OutputLog, start: int, crc: int, bill_as: BillAs | None) -> None:
        self.out = out
        self.start = start
        self.crc = crc
        self.bill_as = bill_as
        self.good = 0
        self.blank = 0
        self.unreadable: list[tuple[int, int]] = []  # (offset, length)
        self.torn: tuple[int, int] | None = None
        self.needs_newline = False
        self.end = start  # end of the last whole line kept in the file

    def results(self) -> Iterator[tuple[str, int, int, str | None, int, int, int, int,
                                        str | None]]:
        """(custom_id, offset, length, model, prompt, completion, cached, reasoning tokens,
        answer tag) of each result line, in file order."""
        for off, line in self.out.lines(self.start):
            if not line.endswith(b"\n"):
                parsed = parse_result_line(line + b"\n")
                if parsed is None:
                    self.torn = (off, len(line))
                    return
                self.needs_newline = True
                line = line + b"\n"
            else:
                parsed = parse_result_line(line)
            self.crc = zlib.crc32(line, self.crc)
            self.end = off + len(line)
            if parsed is None:
                if line.strip():
                    self.unreadable.append((off, len(line)))
                else:
                    self.blank += 1
                continue
            self.good += 1
            u = Usage.from_response(parsed.usage)
            model = parsed.model if self.bill_as is None else self.bill_as(parsed.model)
            yield (parsed.custom_id, off, len(line), model, u.prompt_tokens,
                   u.completion_tokens, u.cached_tokens, u.reasoning_tokens, parsed.tag)


def _settle_file(out: OutputLog, index: Index, scan: _Scan, report: Report, dry: bool,
                 extra_dead: int) -> None:
    """Set aside what is not a result, cut a torn fragment, and record the new committed
    state. Duplicate, blank and unreadable lines stay in the file, counted as dead, for
    the compaction that follows the open (unreadable ones are set aside first)."""
    if scan.torn is not None:
        off, length = scan.torn
        report.torn_bytes = length
        if not dry:
            report.set_aside.append(out.set_aside("torn", [out.read(off, length)]))
            out.cut(off)
    elif scan.needs_newline and not dry:
        out.add_newline()
    if scan.unreadable:
        report.unreadable_lines = len(scan.unreadable)
        if not dry:
            report.set_aside.append(out.set_aside(
                "unreadable", (out.read(off, length) for off, length in scan.unreadable)))
    dead = index.meta_int("dead_lines") + extra_dead + len(scan.unreadable) + scan.blank
    fp = None if dry else out.fingerprint()
    index.set_meta(output_size=scan.end, output_crc=scan.crc,
                   fingerprint=fp.dumps() if fp is not None else None, dead_lines=dead)
    out.start(scan.end, scan.crc)


def _take_over_failures(index: Index, path: Path, report: Report) -> None:
    """The index was lost: read the failures file back, so rows that failed for good are
    not sent again without --retry-failed (results win over failures)."""
    try:
        fh = path.open("rb")
    except OSError:
        return
    failures: list[NewFailure] = []
    with fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
                continue
            err = obj.get("error")
            if not isinstance(err, dict):
                continue
            attempts = err.get("attempts")
            failures.append(NewFailure(
                obj["custom_id"], None, bool(err.get("retryable")),
                str(err.get("code") or "unknown"),
                attempts if isinstance(attempts, int) and 0 <= attempts < 10**6 else 1,
                line if line.endswith(b"\n") else line + b"\n", tag_of(obj.get("id"))))
    if not failures:
        return
    with index.transaction() as db:
        known = {cid for (cid,) in db.execute("SELECT custom_id FROM results")} if len(
            failures) < 100_000 else None
        keep = [f for f in failures if known is None or f.custom_id not in known]
        index.commit([], keep, None)
        if known is None:
            db.execute("DELETE FROM failures WHERE custom_id IN (SELECT custom_id FROM results)")
    report.failures_taken_over = len(keep)


def _finish_compaction(out: OutputLog, index: Index, dry: bool) -> None:
    """A compaction commits its new offsets with a marker before it renames its file over
    the output: finish or forget it."""
    tmp = out.compact_path
    if index.meta("compacting"):
        if tmp.is_file() and not tmp.is_symlink() and not dry:
            out.swap_in_compacted()
            index.set_meta(compacting=None, fingerprint=None)
        elif not os.path.lexists(tmp):
            index.set_meta(compacting=None)
        return
    if not dry:  # written, never committed: the output is untouched
        discard_file(tmp)
