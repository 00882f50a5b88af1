"""The verified prefix: a resume scans only the lines appended since the input was last
found valid and done.

Planning a million-row resume re-reads, re-validates and re-hashes every line (~5 s on the
project's machine) to learn what the last run already knew: every row is done. After a
writable plan without problems, the index's ``meta`` keeps a record of the longest run
of leading rows that succeeded for their very request:

- ``end``/``lines``/``rows``: where that prefix ends (a line boundary), its lines, rows;
- ``blake3``: the BLAKE3 hash of the input's bytes before ``end`` (a cryptographic hash,
  0.05 s for 231 MB here, against 0.25 s for SHA-256);
- ``settings``: a hash of everything that shapes a row from a line (the job's fields but
  its limits, retry, timeout, api, pricing and on_change; batchgpt's version; Python's
  limits on parsing), so a changed template, model or params is a changed prefix;
- ``epoch``: the index's ``done_epoch``, which SQLite triggers on the results table bump
  whenever a result is deleted, replaced, or changes id or request hash — anything that
  could make a done row not done. New results (inserts of new ids) leave it alone.
- ``form``/``first``: the file's form and its first valid row's line (for the tail's
  mixed-form check).

The next plan trusts the prefix only if all of these match what it finds (and the index
has no taken-over results waiting for their request hash); it then counts the prefix's
rows as done and scans from ``end`` on. A row read there whose id has a result in the
index may be a duplicate of a prefix row (or a row the last run finished): the plan
starts again with the full scan, which tells them apart. Anything else that differs — a
byte of the prefix, a setting, the index (rebuilt, edited, a result replaced), the
triggers gone — means the full scan, exactly as before. The full scan then records a new
prefix. Nothing is trusted that a full scan would not find.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from blake3 import blake3

from batchgpt.source import Form, InputFile, ResumeAt, ScannedRow

if TYPE_CHECKING:
    from batchgpt.config import JobConfig
    from batchgpt.store import Store

log = logging.getLogger("batchgpt")

META_KEY = "verified_prefix"
EPOCH_KEY = "done_epoch"
FORMAT = 3  # 2: BLAKE3 instead of SHA-256; 3: the last run's id
# Job settings that do not shape a row from its line (what is sent, and whether the line
# is valid); a change of any other setting means a full scan.
NOT_ROW_SHAPING = frozenset({"limits", "retry", "timeout_s", "api", "pricing", "on_change"})
_CHUNK = 4 << 20

_BUMP = (f"INSERT INTO meta (key, value) VALUES ('{EPOCH_KEY}', '1') ON CONFLICT(key) "
         "DO UPDATE SET value = CAST(value AS INTEGER) + 1;")
TRIGGERS = {
    "prefix_result_deleted": f"AFTER DELETE ON results BEGIN {_BUMP} END",
    "prefix_result_changed": f"AFTER UPDATE OF custom_id, req_hash ON results BEGIN {_BUMP} END",
    "prefix_result_replaced": ("BEFORE INSERT ON results WHEN EXISTS (SELECT 1 FROM results "
                               f"WHERE custom_id = NEW.custom_id) BEGIN {_BUMP} END"),
}


class Fallback(Exception):
    """The tail holds an id the index has a result for: plan with the full scan."""


@dataclass(frozen=True)
class Record:
    """What a verified prefix is, as kept in the index's meta (see the module doc)."""

    end: int
    lines: int
    rows: int
    form: str
    first: int
    blake3: str
    settings: str
    epoch: str | None
    run: int = 0  # the last run's id when recorded: later results are not the prefix's
    format: int = FORMAT


@dataclass
class Trusted:
    """A prefix found unchanged, and the hash of its bytes (to extend it)."""

    record: Record
    digest: Any  # a blake3 hasher over the input's bytes before record.end

    @property
    def resume(self) -> ResumeAt:
        r = self.record
        form: Form = r.form  # type: ignore[assignment]  # one of the three, as recorded
        return ResumeAt(r.end, r.lines, form, r.first)


class Tracker:
    """Follows a plan's batches to find its leading rows done for their very request."""

    def __init__(self, source: InputFile, trusted: Trusted | None) -> None:
        self.trusted = trusted
        self.rows = trusted.record.rows if trusted else 0
        self.open = True  # every row so far is done
        self.first: ScannedRow | None = None  # the file's first valid row (full scans)
        self.last: ScannedRow | None = None  # the prefix's last row
        self.stop: ScannedRow | None = None  # the first row not done
        self.scanned: ScannedRow | None = None  # the last row the scan read
        self.before = _identity(source)  # the input as the scan starts reading it
        self.epoch: int | None = None  # the index's done_epoch once planned (None: unknown)

    def batch(self, rows: list[ScannedRow], leading_done: int) -> None:
        if self.first is None and self.trusted is None and rows:
            self.first = rows[0]
        if rows:
            self.scanned = rows[-1]
        if not self.open:
            return
        self.rows += leading_done
        if leading_done:
            self.last = rows[leading_done - 1]
        if leading_done < len(rows):
            self.open = False
            self.stop = rows[leading_done]


def _identity(source: InputFile) -> tuple[int, int, int, int] | None:
    """The input's inode, size, mtime and ctime: a file written to between the scan and
    the hashing of what it scanned is not recorded as verified."""
    try:
        st = os.stat(source.path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def settings_key(job: JobConfig) -> str:
    """A hash of what shapes a row from an input line (see :data:`NOT_ROW_SHAPING`)."""
    from batchgpt import __version__

    fields = job.model_dump(mode="json", exclude=set(NOT_ROW_SHAPING))
    get_digits = getattr(sys, "get_int_max_str_digits", None)
    shaping = {"job": fields, "batchgpt": __version__, "python": sys.version,
               "int_digits": get_digits() if get_digits else None,
               "recursion": sys.getrecursionlimit(), "format": FORMAT}
    text = json.dumps(shaping, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _epoch(store: Store) -> str | None:
    return store.index.meta(EPOCH_KEY)


def _has_triggers(store: Store) -> bool:
    names = {name for (name,) in store.index.db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    return names.issuperset(TRIGGERS)


def _read(store: Store) -> Record | None:
    raw = store.index.meta(META_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        record = Record(**data)
    except (ValueError, TypeError):
        return None
    if record.format != FORMAT or record.rows < 1 or record.form not in (
            "batch", "chat", "template"):
        return None
    return record


def _hash_prefix(source: InputFile, end: int) -> Any | None:
    """BLAKE3 of the input's first ``end`` bytes, or None when the file is shorter. Read
    into one reused buffer: mapping the file instead would count its pages in the
    process's peak RSS (231 MB for a million rows)."""
    digest = blake3()
    with open(source.path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < end:
            return None
        if not _feed(digest, fh, end):
            return None
    return digest


def _feed(digest: Any, fh: Any, size: int) -> bool:
    """Hash the next ``size`` bytes of ``fh``; False if the file ends before."""
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    while size > 0:
        got = fh.readinto(view[:min(_CHUNK, size)])
        if not got:
            return False
        digest.update(view[:got])
        size -= got
    return True


def trusted(job: JobConfig, source: InputFile, store: Store) -> Trusted | None:
    """The recorded prefix, if the input, the settings and the index are all as they
    were when it was recorded; else None (the full scan)."""
    record = _read(store)
    if record is None or record.settings != settings_key(job):
        return None
    if record.epoch != _epoch(store) or not _has_triggers(store):
        return None
    try:
        digest = _hash_prefix(source, record.end)
    except OSError:  # the scan reports it
        return None
    if digest is None or digest.hexdigest() != record.blake3:
        return None
    return Trusted(record, digest)


def check_tail(store: Store, record: Record, rows: list[ScannedRow]) -> None:
    """Raise :class:`Fallback` if a row after the prefix has a result in the index that
    was there when the prefix was recorded (or taken over from the output since): it
    may repeat a prefix row's id, which only the full scan can tell. A result a later
    run wrote (its run id is higher) is that row's own: a prefix row's result cannot be
    replaced without moving the epoch."""
    ids = [r.custom_id for r in rows]
    marks = ",".join("?" * len(ids))
    hit = store.index.db.execute(
        f"SELECT 1 FROM results WHERE custom_id IN ({marks}) "
        "AND (run_id IS NULL OR run_id <= ?) LIMIT 1", [*ids, record.run]).fetchone()
    if hit is not None:
        raise Fallback


def remember(job: JobConfig, source: InputFile, store: Store, tracker: Tracker) -> None:
    """After a writable plan without problems: install the triggers that keep the epoch
    (so the run's own changes to the results are counted from here on), note the epoch,
    and record the prefix the plan found when it is new or longer. A speed-up only: if
    the index can't take it, the run goes on without (and the next one reads it all)."""
    try:
        _remember(job, source, store, tracker)
    except (sqlite3.Error, OSError, ValueError) as exc:
        tracker.epoch = None
        log.debug("verified prefix not recorded: %s: %s", type(exc).__name__, exc)


def _remember(job: JobConfig, source: InputFile, store: Store, tracker: Tracker) -> None:
    index = store.index
    with index.transaction() as db:
        for name, body in TRIGGERS.items():
            db.execute(f"CREATE TRIGGER IF NOT EXISTS {name} {body}")
    tracker.epoch = _epoch_number(store)
    old = tracker.trusted
    if tracker.rows < 1 or (old is not None and tracker.rows == old.record.rows):
        return
    assert tracker.last is not None
    _write(job, source, store, tracker, tracker.stop, tracker.last, tracker.rows)


def after_run(job: JobConfig, source: InputFile, store: Store, plan: Any, *, ok: bool,
              succeeded: int, replaced: int) -> None:
    """After a run that sent every row its plan had to send, and each one succeeded: the
    whole input as planned is done, so the prefix extends to its end — the next run
    reads only what is appended after. ``ok``: the run stopped for no reason and every
    result is in the index; ``replaced``: results this run replaced (each moved the
    epoch once, through the trigger). Anything else that moved the epoch meanwhile, a
    changed input, or a row not done, and nothing is recorded."""
    tracker: Tracker | None = getattr(plan, "verified", None)
    if tracker is None or tracker.epoch is None or tracker.scanned is None or not ok:
        return
    try:
        _extend(job, source, store, plan, tracker, succeeded, replaced)
    except (sqlite3.Error, OSError, ValueError) as exc:  # a speed-up only (see remember)
        log.debug("verified prefix not extended: %s: %s", type(exc).__name__, exc)


def _extend(job: JobConfig, source: InputFile, store: Store, plan: Any, tracker: Tracker,
            succeeded: int, replaced: int) -> None:
    if not plan.to_send or succeeded != plan.to_send or plan.changed_kept:
        return
    if plan.done + succeeded != plan.rows or plan.rows < 1:
        return
    epoch, last = tracker.epoch, tracker.scanned
    if epoch is None or last is None or _epoch_number(store) != epoch + replaced:
        return
    _write(job, source, store, tracker, None, last, plan.rows)


def _epoch_number(store: Store) -> int:
    try:
        return int(_epoch(store) or 0)
    except ValueError:
        return -1


def _write(job: JobConfig, source: InputFile, store: Store, tracker: Tracker,
           stop: ScannedRow | None, last: ScannedRow, rows: int) -> None:
    """Record the prefix of ``rows`` rows ending before ``stop`` (or after ``last``'s
    line), if the input did not change since the plan began reading it."""
    try:
        record = _new_record(job, source, tracker, stop, last, rows)
    except OSError:
        return
    if record is None or tracker.before is None or _identity(source) != tracker.before:
        return
    index = store.index
    with index.transaction():
        last_run = index.db.execute("SELECT MAX(id) FROM runs").fetchone()[0]
        record = Record(**{**asdict(record), "epoch": _epoch(store),
                           "run": int(last_run or 0)})
        index.set_meta(**{META_KEY: json.dumps(asdict(record))})


def _new_record(job: JobConfig, source: InputFile, tracker: Tracker,
                stop: ScannedRow | None, last: ScannedRow, rows: int) -> Record | None:
    with open(source.path, "rb") as fh:
        if stop is not None:
            end, lines = stop.offset, stop.line - 1
        else:  # every row done: the prefix ends after the last row's line
            fh.seek(last.offset)
            raw = fh.readline()
            if not raw.endswith(b"\n"):  # an unfinished line may yet grow
                return None
            end, lines = last.offset + len(raw), last.line
        old = tracker.trusted
        if old is not None:
            digest = old.digest.copy()
            fh.seek(old.record.end)
            left = end - old.record.end
            form, first = old.record.form, old.record.first
        else:
            digest = blake3()
            left = end
            assert tracker.first is not None
            fh.seek(tracker.first.offset)
            first = tracker.first.line
            first_line = fh.readline().decode("utf-8")
            if first == 1:
                first_line = first_line.removeprefix("\ufeff")
            found = source.builder.form(json.loads(first_line))
            if found is None:
                return None
            form = found
            fh.seek(0)
        if not _feed(digest, fh, left):
            return None  # cut meanwhile: record nothing
    return Record(end=end, lines=lines, rows=rows, form=form, first=first,
                  blake3=digest.hexdigest(), settings=settings_key(job), epoch=None)
